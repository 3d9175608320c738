"""T5 encoder as a text encoder (the retrieved-caption states of Re-AudioLDM).

transformers' ``T5EncoderModel``. Re-AudioLDM pads/truncates every retrieved caption to 50
tokens (the pipeline passes ``max_tokens = generation.caption_tokens``); without ``max_tokens``
rows are cut at ``max_length`` and padded to the longest in the batch. ``embed`` is the masked
mean of the last hidden states, L2-normalised; ``dim = token_dim = d_model``.

Weights (``pretrained``): a local Hugging Face T5 folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin`` + tokenizer files; a full ``T5ForConditionalGeneration`` folder such as
google/flan-t5-large is fine, its decoder weights are skipped), or its id looked up in the local
cache only; or a folder written by :meth:`T5TextEncoder.save_pretrained`. ``tokenizer=DIR``
overrides the folder's tokenizer.

``random_init: true`` builds random weights (``size``: tiny / small / base / large, the last three
the FLAN-T5 shapes; ``config`` overrides any ``T5Config`` field; ``seed``). Without a ``tokenizer``
a random-init model uses the MiniLM WordPiece tokenizer (bert-base-uncased vocabulary, offline)
and sizes its vocabulary to it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from reaudio_core import Pretrained, ReaudioError, TextEncoder, hookimpl

from . import _encoders as E

DEFAULT_HUB_ID = "google/flan-t5-large"

SIZES: dict[str, dict] = {
    "tiny": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
             "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16},
    "small": {"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
              "feed_forward_proj": "gated-gelu"},
    "base": {"d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12, "num_heads": 12,
             "feed_forward_proj": "gated-gelu"},
    "large": {"d_model": 1024, "d_kv": 64, "d_ff": 2816, "num_layers": 24, "num_heads": 16,
              "feed_forward_proj": "gated-gelu"},
}

# keys of a full encoder-decoder T5 checkpoint that the encoder does not use
_DECODER_KEYS = ("decoder.", "lm_head.")


def _tokenizer(folder):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ReaudioError(f"t5: no usable tokenizer in {folder} ({type(exc).__name__}: {exc}); "
                           "pass tokenizer=DIR, a folder with the T5 tokenizer files") from None


def _load(pretrained, tokenizer, random_init, size, config, seed):
    from transformers import T5Config, T5EncoderModel
    E.random_init_check("t5", random_init, pretrained)
    tok_dir = E.resolve_local(tokenizer, what="t5 tokenizer", param="tokenizer") if tokenizer else None
    if random_init:
        if size not in SIZES:
            raise ReaudioError(f"t5: unknown size {size!r}. Known: {', '.join(SIZES)}")
        tok = _tokenizer(tok_dir) if tok_dir else E.fallback_tokenizer()
        cfg = E.merge_config({**SIZES[size], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}, config)
        with E.seeded(seed):
            model = T5EncoderModel(T5Config(**cfg))
        return model, tok, f"random init (size {size}, seed {seed})", {"ignored": []}
    if not pretrained:
        raise ReaudioError(f"t5: no weights given. Pass pretrained=DIR, a local Hugging Face T5 folder (e.g. "
                           f"{DEFAULT_HUB_ID}), or random_init=true for random weights")
    folder = E.resolve_local(pretrained, what="t5", param="pretrained")
    if (folder / "t5_config.json").is_file():  # written by T5TextEncoder.save_pretrained
        from ._ckpt import load_strict, read_json, read_weights
        model = T5EncoderModel(T5Config.from_dict(read_json(folder / "t5_config.json")))
        load_strict(model, read_weights(folder / E.WEIGHTS_FILE), str(folder / E.WEIGHTS_FILE))
        return model, _tokenizer(tok_dir or folder), f"saved {folder}", {"ignored": []}
    if not (folder / "config.json").is_file():
        raise ReaudioError(f"t5: {folder} is not a Hugging Face T5 folder (config.json missing)")
    try:
        model, info = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                     dtype=torch.float32)
    except Exception as exc:
        raise ReaudioError(f"t5: cannot load a T5 encoder from {folder}: {type(exc).__name__}: {exc}") from None
    stored = _stored_keys(folder)
    extra = set(info.get("unexpected_keys", [])) | (stored - set(model.state_dict()) if stored else set())
    unexpected = sorted(k for k in extra if not k.startswith(_DECODER_KEYS))
    bad = list(info.get("missing_keys", [])) + unexpected + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ReaudioError(f"t5: {folder} does not fit T5EncoderModel: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}")
    tok = _tokenizer(tok_dir or folder)
    ignored = sorted(k for k in extra if k.startswith(_DECODER_KEYS))
    return model, tok, f"T5 {folder}", {"ignored": ignored}


def _stored_keys(folder) -> set[str]:
    """Tensor names in a folder's safetensors weights (sharded or not); empty if it has none."""
    import json
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return set()


class T5TextEncoder(Pretrained, TextEncoder):
    """T5 encoder: masked-mean sentence embedding and per-token states with masks."""

    def __init__(self, *, pretrained, tokenizer, random_init, size, config, seed, device, batch_size, max_length):
        self.device = E.torch_device(device)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        key = dict(pretrained=pretrained, tokenizer=tokenizer, random_init=random_init, size=size, config=config,
                   seed=seed, device=str(self.device), stamp=[E.stamp(pretrained), E.stamp(tokenizer)])

        def build():
            model, tok, origin, report = _load(pretrained, tokenizer, random_init, size, config, int(seed))
            return model.to(self.device).eval(), tok, origin, report
        self._holder = E.shared({"t5": key}, build)
        self.model, self.tokenizer, self.origin, self.load_report = self._holder.value
        self.dim = self.token_dim = int(self.model.config.d_model)
        self._kwargs = dict(pretrained=pretrained, tokenizer=tokenizer, random_init=random_init, size=size,
                            config=config, seed=seed, device=device, batch_size=batch_size, max_length=max_length)

    # -- persistence (Pretrained): config.json, model.safetensors (encoder weights), t5_config.json and the
    # tokenizer files
    weights_param = "pretrained"

    def _config(self) -> dict:
        return {**self._kwargs, "pretrained": None, "tokenizer": None, "random_init": False, "config": None}

    def _state_dict(self) -> dict:
        # clone: the tied input embedding is stored under both of its names
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def _save_extra(self, directory) -> None:
        from ._ckpt import write_json
        write_json(directory / "t5_config.json", self.model.config.to_dict())
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def _pretrained_params(cls, directory, overrides) -> dict:
        return E.read_component_config(cls, cls.kind, "t5", directory, overrides)

    def _run(self, texts, max_tokens):
        length = max_tokens or self.max_length
        for batch in E.chunks(texts, self.batch_size):
            enc = self.tokenizer(batch, padding="max_length" if max_tokens else "longest", truncation=True,
                                 max_length=length, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            yield states.float().cpu(), mask.bool().cpu()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = E.text_list(texts)
        out = [E.normalize(E.masked_mean(s, m)) for s, m in self._run(texts, None)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        texts = E.text_list(texts)
        max_tokens = E.check_max_tokens(max_tokens)
        return E.cat_tokens(list(self._run(texts, max_tokens)), max_tokens, self.token_dim)


@hookimpl
def register_components(register):
    register("text_encoder", "t5", T5TextEncoder,
             tiny={"pretrained": None, "random_init": True, "size": "tiny"})  # random weights, test size

"""CLAP as a text encoder and an audio encoder (both named ``clap``).

transformers' ``ClapModel`` (HTSAT audio tower + RoBERTa text tower, joint space of
``projection_dim`` = 512 for LAION-CLAP). Audio arrives at 16 kHz and is resampled to the
feature extractor's rate (48 kHz) before ``ClapFeatureExtractor`` (64 log-mel bins, 10 s,
``repeatpad`` padding; ``rand_trunc`` or ``fusion`` truncation for longer clips, with its random
crop drawn from a fixed seed so the encoder is deterministic).

Where the weights come from (``pretrained``):

* a Hugging Face ``ClapModel`` folder (``config.json`` + weights + tokenizer/processor files), or
  its id (e.g. ``laion/clap-htsat-unfused``) looked up in the local cache only;
* a LAION-CLAP ``.pt`` checkpoint (``630k-audioset-best.pt`` layout: ``state_dict`` with
  ``module.`` prefixes, ``audio_branch.*`` HTSAT, ``text_branch.*`` RoBERTa, ``text_projection.*``,
  ``audio_projection.*``, ``logit_scale_a/t``) or an AudioLDM ``.ckpt`` (the same keys under
  ``cond_stage_model.model.``): the architecture is read off the tensor shapes and the keys are
  converted into the ``ClapModel`` layout by :func:`laion_to_hf`. The text tokenizer is not in such a
  file: ``processor=DIR`` names a folder holding it (else the locally cached
  ``laion/clap-htsat-unfused`` or ``roberta-base`` is used, if present);
* a folder written by :meth:`save_pretrained` (``config.json``, ``model.safetensors``,
  ``clap_config.json``, tokenizer and ``preprocessor_config.json``);
* the text tower alone: a ``ClapTextModelWithProjection`` folder (the ``text_encoder/`` of a diffusers
  ``AudioLDMPipeline``), its tokenizer from ``processor=DIR``, else from the folder itself, else from the
  sibling ``tokenizer/`` of a diffusers pipeline root; or the pipeline root itself (``model_index.json``
  beside ``text_encoder/`` and ``tokenizer/``). Such a model has no audio tower: the ``clap`` text encoder
  loads it, the audio encoder refuses it.

``random_init: true`` builds random weights (``size``: ``full`` = the LAION-CLAP HTSAT-tiny +
RoBERTa-base architecture, ``tiny`` = a test-size model; ``config`` overrides any ``ClapConfig``
field; ``seed`` makes them reproducible); without a ``processor`` the MiniLM WordPiece tokenizer
stands in (see :func:`reaudio_plugins._encoders.fallback_tokenizer`).

``backend: laion`` runs the optional ``laion-clap`` package instead (``pip install "reaudio[laion]"``),
imported only then; it gives embeddings, not token states.

Loading from all of these (and the LAION-CLAP key conversion) lives in :mod:`reaudio_plugins._clap_ckpt`.

Outputs. Text: ``embed`` = the L2-normalised projected RoBERTa pooler output ([B, 512]);
``encode_tokens`` = the last hidden states ([B, L, 768]). Audio: ``embed`` = the L2-normalised
projected HTSAT embedding ([B, 512]); ``encode_tokens`` = the final HTSAT feature map averaged
over frequency: ``num_tokens`` (32 for HTSAT-tiny) time steps of ``hidden_size`` (768), mask all True.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from reaudio_core import AudioEncoder, Pretrained, ReaudioError, TextEncoder, hookimpl

from . import _encoders as E
from ._clap_ckpt import _LaionBundle, _load
from ._clap_ckpt import DEFAULT_HUB_ID, SIZES, build_config, infer_laion_config, laion_to_hf  # noqa: F401 (re-exported)


# -- components ------------------------------------------------------------------------------------
class _ClapBase(Pretrained):
    _kind = ""

    def __init__(self, *, pretrained, processor, backend, random_init, size, config, seed, device, batch_size,
                 max_length):
        self._kwargs = dict(pretrained=pretrained, processor=processor, backend=backend, random_init=random_init,
                            size=size, config=config, seed=seed, device=device, batch_size=batch_size,
                            max_length=max_length)
        if backend not in ("transformers", "laion"):
            raise ReaudioError(f"clap: unknown backend {backend!r}. Known: transformers, laion")
        self.device = E.torch_device(device)
        self.seed, self.batch_size, self.max_length = int(seed), int(batch_size), int(max_length)
        key = {k: v for k, v in self._kwargs.items() if k not in ("batch_size", "max_length")}
        key.update(device=str(self.device), stamp=[E.stamp(pretrained), E.stamp(processor)])
        if backend == "laion":
            self._holder = E.shared(key, lambda: _LaionBundle(pretrained, config))
        else:
            def build():
                b = _load(pretrained, processor, random_init, size, config, self.seed)
                b.model.to(self.device).eval()
                return b
            self._holder = E.shared(key, build)
        self.bundle = self._holder.value
        if self.bundle.backend == "transformers":
            if self._kind == "audio" and self.bundle.text_only:
                raise ReaudioError(f"clap: {self.bundle.origin} is CLAP's text tower alone; the audio encoder needs "
                                   "a full ClapModel (a folder or checkpoint with the audio tower)")
            self.dim = self.bundle.projection_dim
            self.token_dim = self.bundle.text_width if self._kind == "text" else self.bundle.audio_width
            self.num_tokens = self.bundle.num_tokens
        else:
            self.dim, self.token_dim, self.num_tokens = self.bundle.dim, 0, 0

    @property
    def model(self):
        return self.bundle.model

    @property
    def load_report(self) -> dict:
        """What loading did: ``ignored`` checkpoint keys (unused by the embeddings), ``filled`` buffers."""
        return self.bundle.report

    def _need_transformers(self, what: str):
        if self.bundle.backend != "transformers":
            raise ReaudioError(f"clap backend 'laion' gives embeddings only; {what} needs backend=transformers "
                               "(the same checkpoint, converted)")

    # -- persistence (Pretrained) -------------------------------------------------------------------
    weights_param = "pretrained"

    def save_pretrained(self, directory) -> None:
        """``config.json`` (constructor keywords), ``model.safetensors`` (ClapModel weights),
        ``clap_config.json``, tokenizer and ``preprocessor_config.json``."""
        self._need_transformers("save_pretrained")
        super().save_pretrained(directory)

    def _config(self) -> dict:
        return {**self._kwargs, "pretrained": None, "processor": None, "random_init": False, "config": None}

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    def _save_extra(self, directory) -> None:
        from ._ckpt import write_json
        write_json(directory / "clap_config.json", self.bundle.config.to_dict())
        self.bundle.tokenizer.save_pretrained(str(directory))
        if self.bundle.fe is not None:
            self.bundle.fe.save_pretrained(str(directory))

    @classmethod
    def _pretrained_params(cls, directory, overrides) -> dict:
        return E.read_component_config(cls, cls.kind, "clap", directory, overrides)

    # -- text ---------------------------------------------------------------------------------------
    def _text_batches(self, texts, max_tokens=None):
        tok = self.bundle.tokenizer
        length = max_tokens or self.max_length
        for batch in E.chunks(texts, self.batch_size):
            enc = tok(batch, padding="max_length" if max_tokens else "longest", truncation=True, max_length=length,
                      return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            yield ids, mask

    # -- audio --------------------------------------------------------------------------------------
    def _audio_inputs(self, waves: list[np.ndarray]):
        from reaudio_core.audio import resample
        fe = self.bundle.fe
        feats, longer = [], []
        for w in waves:
            w = resample(w, 16000, fe.sampling_rate).astype(np.float64)
            with E.seeded(self.seed):  # rand_trunc / fusion crops of clips longer than 10 s
                out = fe(w, sampling_rate=fe.sampling_rate, return_tensors="np")
            feats.append(np.asarray(out["input_features"][0], dtype=np.float32))
            # the true flag (the extractor marks a random clip 'longer' when none is, a training trick)
            n, hop, cap = len(w), fe.hop_length, fe.nb_max_samples
            longer.append(bool(n > cap and n // hop != cap // hop))
        x = torch.from_numpy(np.stack(feats)).to(self.device)
        return x, torch.tensor(longer, device=self.device)[:, None]


class ClapTextEncoder(_ClapBase, TextEncoder):
    """CLAP text tower: L2-normalised joint-space embeddings and RoBERTa token states."""

    _kind = "text"

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = E.text_list(texts)
        if self.bundle.backend == "laion":
            if not texts:
                return torch.zeros(0, self.dim)
            with E.seeded(self.seed):
                out = self.bundle.module.get_text_embedding(texts, use_tensor=True)
            return E.normalize(out.detach().cpu())
        out = []
        for ids, mask in self._text_batches(texts):
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            out.append(E.normalize(self.model.text_projection(pooled)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        self._need_transformers("encode_tokens")
        texts = E.text_list(texts)
        max_tokens = E.check_max_tokens(max_tokens)
        parts = []
        for ids, mask in self._text_batches(texts, max_tokens):
            states = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
            parts.append((states.float().cpu(), mask.bool().cpu()))
        return E.cat_tokens(parts, max_tokens, self.token_dim)


class ClapAudioEncoder(_ClapBase, AudioEncoder):
    """CLAP audio tower (HTSAT): L2-normalised joint-space embeddings and time tokens."""

    _kind = "audio"

    def _run(self, waves):
        for batch in E.chunks(waves, self.batch_size):
            x, longer = self._audio_inputs(batch)
            yield self.model.audio_model(input_features=x, is_longer=longer)

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        waves = E.wave_list(waveforms)
        if self.bundle.backend == "laion":
            from reaudio_core.audio import resample
            out = []
            for w in waves:
                with E.seeded(self.seed):
                    x = torch.from_numpy(resample(w, 16000, 48000))[None]
                    out.append(self.bundle.module.get_audio_embedding_from_data(x=x, use_tensor=True).detach().cpu())
            return E.normalize(torch.cat(out)) if out else torch.zeros(0, self.dim)
        out = [E.normalize(self.model.audio_projection(o.pooler_output)).cpu() for o in self._run(waves)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_tokens(self, waveforms: Sequence[np.ndarray]):
        self._need_transformers("encode_tokens")
        waves = E.wave_list(waveforms)
        out = []
        for o in self._run(waves):
            fmap = o.last_hidden_state  # [B, C, freq, time]
            out.append(fmap.mean(2).transpose(1, 2).float().cpu())
        tokens = torch.cat(out) if out else torch.zeros(0, self.num_tokens, self.token_dim)
        if tokens.shape[1] != self.num_tokens:
            raise ReaudioError(f"clap: HTSAT gave {tokens.shape[1]} time tokens, expected {self.num_tokens}")
        return tokens.contiguous(), torch.ones(tokens.shape[:2], dtype=torch.bool)


@hookimpl
def register_components(register):
    tiny = {"pretrained": None, "random_init": True, "size": "tiny"}  # random weights, test size
    register("text_encoder", "clap", ClapTextEncoder, tiny=tiny)
    register("audio_encoder", "clap", ClapAudioEncoder, tiny=tiny)

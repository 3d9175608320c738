"""AudioEncoder ``vae-latent``: retrieved-audio features from a trained mel VAE's encoder.

The variant the paper's first author's own DCASE-2024 code uses in place of AudioMAE: a clip's
features are the latents of the same VAE the LDM works in.

    waveform (16 kHz) -> reference log-mel (normalised to peak 0.5, at most ``max_seconds``,
      padded to a multiple of the VAE compression) -> VAE encoder posterior mean, scaled
      (``[C, T/4, 64/4]``, e.g. [8, T/4, 16]) -> per latent frame a token of C * 64/4 values
      (8 * 16 = 128) -> adaptive average pooling along time to ``num_tokens`` tokens
    embed = L2-normalised mean over the latent frames (``dim = token_dim``).

``weights``: a directory written by the ``vae`` decoder's ``save_pretrained`` (e.g.
``OUT/final/decoder`` of ``reaudio train`` with ``training.stage=vae``), or ``pkg:PACKAGE/PATH`` for one
shipped in a package (the offline preset names its own). ``null`` builds an untrained VAE from the
``vae`` registry defaults overlaid with ``vae`` (tests, shape checks), with a warning; such an encoder
has ``untrained = True`` and ``reaudio index build`` refuses to embed a database with it.
:meth:`VaeLatentEncoder.save_pretrained` writes ``config.json`` + under ``vae/`` the VAE's
``config.json`` and only the weights this encoder runs (``encoder.*``, ``quant_conv.*``:
about 40% of the VAE) as ``encoder.safetensors``, so a saved pipeline is self-contained without
a second full copy of the VAE. Deterministic (posterior mean, no sampling).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reaudio_core import AudioEncoder, Pretrained, ReaudioError, hookimpl
from reaudio_core.mel import N_MELS, seconds_to_samples, waveform_to_mel

CONFIG_FILE = "config.json"
VAE_DIR = "vae"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
POOLS = ("avg", "avg+max")


class VaeLatentEncoder(Pretrained, AudioEncoder):
    def __init__(self, *, weights, vae, num_tokens, pool, max_seconds, device):
        from reaudio_core.registry import get_registry
        from reaudio_core.loading import resolve_path
        spec = get_registry().spec("decoder", "vae")
        self.untrained = not weights
        if weights:
            path = resolve_path(weights)
            if not path.is_dir():
                raise ReaudioError(f"vae-latent: weights={weights} is not a directory; give the VAE folder written by "
                                   "save_pretrained (OUT/final/decoder of `reaudio train` with training.stage=vae)")
            if (path / ENCODER_WEIGHTS).is_file():  # written by save_pretrained below: encoder half only
                self.vae = self._encoder_only(spec.cls, path, device)
            else:
                self.vae = spec.cls.from_pretrained(path, device=device)
        else:
            warnings.warn("vae-latent: no weights given (audio_encoder.params.weights is null): the VAE encoder is "
                          "untrained, so its embeddings and tokens are random projections of the mel; give "
                          "weights=DIR (a trained VAE folder) for real features", stacklevel=2)
            self.vae = get_registry().create("decoder", "vae", **{**dict(vae or {}), "device": device})
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ReaudioError(f"vae-latent: num_tokens must be an integer >= 1, got {num_tokens!r}")
        if pool not in POOLS:
            raise ReaudioError(f"vae-latent: pool must be one of {POOLS}, got {pool!r}")
        if not max_seconds or float(max_seconds) <= 0:
            raise ReaudioError(f"vae-latent: max_seconds must be > 0, got {max_seconds!r}")
        self.num_tokens, self.pool, self.max_seconds = int(num_tokens), pool, float(max_seconds)
        self.device = device
        self._vae_params = dict(vae or {})
        c = self.vae.compression
        self.token_dim = self.dim = self.vae.latent_channels * (N_MELS // c)

    @staticmethod
    def _encoder_only(vae_cls, path: Path, device):
        from reaudio_plugins._ckpt import read_json, read_weights
        params = {**read_json(path / CONFIG_FILE), "checkpoint": None, "device": device}
        vae = vae_cls(**params)
        state = read_weights(path / ENCODER_WEIGHTS)
        wanted = {k for k in vae.model.state_dict() if k.startswith(ENCODER_PREFIXES)}
        if set(state) != wanted:
            missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
            raise ReaudioError(f"vae-latent: {path / ENCODER_WEIGHTS} does not fit the VAE in {path / CONFIG_FILE} "
                               f"(missing {missing[:3]}, unexpected {extra[:3]})")
        vae.model.load_state_dict(state, strict=False)
        return vae

    # -- features -------------------------------------------------------------------------------
    def _mel(self, wav: np.ndarray) -> torch.Tensor:
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0:
            raise ReaudioError("vae-latent: empty waveform")
        wav = wav[:seconds_to_samples(self.max_seconds)]
        c = self.vae.compression
        frames = max(c, -(-(len(wav) // 160) // c) * c)  # whole frames rounded up to the compression
        return waveform_to_mel(wav, frames)

    @torch.inference_mode()
    def latent_frames(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per clip ``[t, C * F]``: one row per latent frame."""
        out = []
        for w in waveforms:
            z = self.vae.encode(self._mel(w), sample=False)[0].float().cpu()  # [C, t, F]
            out.append(z.permute(1, 0, 2).reshape(z.shape[1], -1))
        return out

    def _pool(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.T.unsqueeze(0)  # [1, D, t]
        avg = torch.nn.functional.adaptive_avg_pool1d(x, self.num_tokens)
        if self.pool == "avg+max":
            avg = (avg + torch.nn.functional.adaptive_max_pool1d(x, self.num_tokens)) / 2
        return avg[0].T  # [num_tokens, D]

    def embed(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        frames = self.latent_frames(waveforms)
        if not frames:
            return torch.zeros(0, self.dim)
        return torch.nn.functional.normalize(torch.stack([f.mean(0) for f in frames]), dim=-1)

    def encode_tokens(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        frames = self.latent_frames(waveforms)
        if not frames:
            return torch.zeros(0, self.num_tokens, self.token_dim), torch.zeros(0, self.num_tokens, dtype=torch.bool)
        tokens = torch.stack([self._pool(f) for f in frames])
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def to(self, device) -> "VaeLatentEncoder":
        """Run the encoder on ``device`` (tokens still come back on the CPU)."""
        self.vae.to(device)
        self.device = str(device)
        return self

    # -- persistence -----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"weights": None, "vae": self._vae_params, "num_tokens": self.num_tokens, "pool": self.pool,
                "max_seconds": self.max_seconds, "device": "cpu"}

    # save_pretrained (Pretrained): config.json (constructor keywords) + vae/config.json and
    # vae/encoder.safetensors; no model.safetensors of its own
    weights_param = "weights"

    def _config(self) -> dict:
        return self.config()

    def _save_extra(self, directory: Path) -> None:
        from reaudio_plugins._ckpt import write_json, write_safetensors
        state = {k: v for k, v in self.vae.model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        write_safetensors(directory / VAE_DIR / ENCODER_WEIGHTS, state)
        write_json(directory / VAE_DIR / CONFIG_FILE, self.vae.config())

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        if not (directory / CONFIG_FILE).is_file() or not (directory / VAE_DIR).is_dir():
            raise ReaudioError(f"{directory}: not a vae-latent folder (expected {CONFIG_FILE} and {VAE_DIR}/ written "
                               "by save_pretrained)")
        return {**super()._pretrained_params(directory, overrides), "weights": str(directory / VAE_DIR)}


@hookimpl
def register_components(register):
    from .vae import TINY
    # an untrained tiny VAE, 4 tokens of 8 * 16 = 128 values
    register("audio_encoder", "vae-latent", VaeLatentEncoder, tiny={"vae": TINY, "num_tokens": 4})

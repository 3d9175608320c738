"""Vocoder ``vocos``: a Vocos-style vocoder (Siuzdak 2023, "Vocos: Closing the gap between time-domain and
Fourier-based neural vocoders for audio synthesis", arXiv:2306.00531). ``mel [B, T, 64]`` (natural-log
magnitude) -> ``[B, T * 160]``.

Instead of upsampling 160x in the time domain as HiFi-GAN does, the network stays at the mel frame rate and
predicts one STFT frame per mel frame, and an inverse STFT makes the waveform:

    log-mel [B, T, 64] -> (last frame repeated once: T + 1 frames)
      -> Conv1d(64, dim, 7) -> LayerNorm -> num_layers x ConvNeXt block -> LayerNorm
      -> Linear(dim, n_fft + 2) = log-magnitude m and phase p, n_fft / 2 + 1 bins each
      -> S = min(exp(m), 100) * (cos p + i sin p)
      -> torch.istft(S, n_fft, hop 160, Hann window of n_fft, center=True) -> exactly T * 160 samples

A ConvNeXt block (Liu et al. 2022, adapted to 1-D as in Vocos): depthwise Conv1d(dim, 7) -> LayerNorm ->
Linear(dim, intermediate_dim) -> GELU -> Linear(intermediate_dim, dim) -> per-channel layer scale
(initialised to 1 / num_layers) -> residual. The phase is one unconstrained output per bin mapped onto the
unit circle through cos / sin, as in the paper (no phase wrapping problem in the loss). With ``center=True``
the inverse STFT's frame ``t`` is centred on sample ``160 t``; T + 1 frames span exactly ``T * 160``
samples, so no trimming or padding of the output is needed. The reference mel centres frame ``t`` on
``160 t + 80``: the half-hop offset is a linear phase, which the phase head learns in training.

The waveform is clamped to [-1, 1]. Weights (``checkpoint``): a :meth:`Vocos.save_pretrained` folder, whose
``config.json`` then defines the sizes (as hifigan's), or a bare ``model.safetensors`` of the given sizes.
Trains with ``reaudio train`` (``training.stage: vocoder``; mel L1 + multi-resolution STFT, no
discriminator), e.g. configs/offline-vocos.yaml.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from reaudio_core import Pretrained, ReaudioError, SAMPLE_RATE, Vocoder, hookimpl
from reaudio_core.mel import HOP_LENGTH, N_MELS

from ._ckpt import load_strict, read_json, read_weights

log = logging.getLogger("reaudio")

ARCH_KEYS = ("dim", "intermediate_dim", "num_layers", "n_fft")
PARAMS = (*ARCH_KEYS, "checkpoint", "device")
KERNEL = 7
MAX_MAGNITUDE = 100.0  #: exp(log-magnitude) is clipped here (the paper's 1e2)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, KERNEL, padding=KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, dim, T]
        h = self.dwconv(x).transpose(1, 2)  # [B, T, dim]
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h)))) * self.gamma
        return x + h.transpose(1, 2)


class VocosNet(nn.Module):
    """Backbone + STFT head: ``log-mel [B, T, 64]`` -> waveform ``[B, T * 160]``."""

    def __init__(self, dim: int, intermediate_dim: int, num_layers: int, n_fft: int):
        super().__init__()
        self.n_fft = n_fft
        self.embed = nn.Conv1d(N_MELS, dim, KERNEL, padding=KERNEL // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1.0 / num_layers) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel [B, T, 64]`` -> complex STFT ``[B, n_fft / 2 + 1, T + 1]``."""
        x = torch.cat([mel, mel[:, -1:]], dim=1).transpose(1, 2)  # [B, 64, T + 1]
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        h = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)  # [B, n_fft + 2, T + 1]
        log_mag, phase = h.chunk(2, dim=1)
        mag = torch.exp(log_mag).clamp(max=MAX_MAGNITUDE)
        return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        spec = self.spectrum(mel)
        return torch.istft(spec, self.n_fft, HOP_LENGTH, self.n_fft, self.window, center=True,
                           length=mel.shape[1] * HOP_LENGTH)


class Vocos(Pretrained, Vocoder):
    """Vocos-style vocoder. The paper's base size: dim 512, intermediate_dim 1536, 8 layers (13.5 M parameters
    at n_fft 640)."""

    sample_rate = SAMPLE_RATE
    hop_length = HOP_LENGTH

    def __init__(self, *, dim, intermediate_dim, num_layers, n_fft, checkpoint, device):
        arch = {"dim": int(dim), "intermediate_dim": int(intermediate_dim), "num_layers": int(num_layers),
                "n_fft": int(n_fft)}
        if min(arch["dim"], arch["intermediate_dim"], arch["num_layers"]) < 1:
            raise ReaudioError(f"vocos: dim, intermediate_dim and num_layers must be >= 1, got {arch}")
        if arch["n_fft"] < 2 * HOP_LENGTH or arch["n_fft"] % 2:
            raise ReaudioError(f"vocos: n_fft must be even and at least twice the hop ({2 * HOP_LENGTH}) so the "
                               f"Hann windows overlap-add without gaps, got {n_fft}")
        weights = None
        if checkpoint:
            path = Path(checkpoint)
            weights = path / WEIGHTS_FILE if path.is_dir() else path
            if not weights.exists():
                raise ReaudioError(f"vocos checkpoint not found: {weights} (a folder written by save_pretrained / "
                                   "`reaudio train`, e.g. OUT/final/vocoder)")
            if path.is_dir() and (path / CONFIG_FILE).exists():  # a saved folder states its own sizes (as hifigan)
                saved = {k: int(v) for k, v in read_json(path / CONFIG_FILE).items() if k in ARCH_KEYS}
                changed = {k: v for k, v in saved.items() if arch[k] != v}
                if changed:
                    log.info("vocos: architecture taken from %s: %s", checkpoint, changed)
                arch.update(saved)
        self.arch = arch
        self.model = VocosNet(**arch)
        if weights is not None:
            load_strict(self.model, read_weights(weights), f"vocos weights {checkpoint}",
                        hint="Set vocoder.params (dim, intermediate_dim, num_layers, n_fft) to the checkpoint's sizes.")
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel [B, T, 64]`` log-mel -> waveform ``[B, T * 160]`` float32 in [-1, 1]."""
        if not torch.is_tensor(mel) or mel.ndim != 3 or mel.shape[-1] != N_MELS or mel.shape[1] == 0:
            raise ReaudioError(f"vocos: mel must be a tensor [B, T, {N_MELS}] with T > 0, got "
                               f"{tuple(mel.shape) if torch.is_tensor(mel) else type(mel).__name__}")
        wav = self.model(mel.to(self.device, torch.float32))
        return wav.clamp(-1.0, 1.0).to(mel.device)

    def config(self) -> dict:
        return {**self.arch, "checkpoint": None, "device": "cpu"}

    def _config(self) -> dict:
        return self.config()

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    @classmethod
    def _pretrained_params(cls, directory, overrides: dict) -> dict:
        params = super()._pretrained_params(directory, overrides)
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ReaudioError(f"vocos: unknown parameter(s) {sorted(unknown)} in {directory}/config.json")
        return params

    def to(self, device) -> "Vocos":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


@hookimpl
def register_components(register):
    register("vocoder", "vocos", Vocos, tiny={"dim": 16, "intermediate_dim": 32, "num_layers": 2})

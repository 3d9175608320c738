"""Vocoder ``hifigan``: HiFi-GAN v1 for 16 kHz / hop 160 / 64 mels (reference section 2) on
transformers' SpeechT5HifiGan. ``mel [B, T, 64]`` (natural-log magnitude) -> ``[B, T * 160]``.

Weights (``checkpoint``, or :meth:`HiFiGAN.from_pretrained`) may come from

* a directory written by :meth:`HiFiGAN.save_pretrained` (``config.json`` = constructor keywords,
  ``model.safetensors``);
* a diffusers pipeline root (``model_index.json`` + ``vocoder/``) or its ``vocoder/`` folder
  (transformers ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``); its config
  defines the architecture;
* an original AudioLDM Lightning ``.ckpt`` (``state_dict`` with ``first_stage_model.vocoder.*``);
* a standalone HiFi-GAN generator checkpoint in the layout of jik876/hifi-gan
  (``{"generator": state_dict}``, weight-normalised ``weight_g`` / ``weight_v``), or a bare
  generator state dict.

Original HiFi-GAN names (``conv_pre``, ``ups.N``, ``resblocks.N.convs1/2.M``, ``conv_post``) are
converted by :func:`convert_hifigan_state_dict`, which folds weight normalisation into plain
weights. Loading never executes code.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from reaudio_core import Pretrained, ReaudioError, SAMPLE_RATE, Vocoder, hookimpl
from reaudio_core.mel import HOP_LENGTH, N_MELS

from ._ckpt import lightning_state_dict, load_strict, read_json, read_weights, sub_state_dict

log = logging.getLogger("reaudio")

ARCH_KEYS = ("upsample_initial_channel", "upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
             "resblock_dilation_sizes", "normalize_before")
PARAMS = (*ARCH_KEYS, "checkpoint", "device")
LDM_PREFIX = "first_stage_model.vocoder."
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def build_hifigan(*, upsample_initial_channel, upsample_rates, upsample_kernel_sizes, resblock_kernel_sizes,
                  resblock_dilation_sizes, normalize_before):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig
    rates = [int(r) for r in upsample_rates]
    kernels = [int(k) for k in upsample_kernel_sizes]
    if len(rates) != len(kernels) or not rates:
        raise ReaudioError(f"hifigan: upsample_rates {rates} and upsample_kernel_sizes {kernels} must be "
                           "non-empty lists of the same length")
    if math.prod(rates) != HOP_LENGTH:
        raise ReaudioError(f"hifigan: upsample_rates {rates} multiply to {math.prod(rates)}; they must multiply to "
                           f"the mel hop of {HOP_LENGTH} samples")
    if int(upsample_initial_channel) % (2 ** len(rates)):
        raise ReaudioError(f"hifigan: upsample_initial_channel {upsample_initial_channel} must be divisible by "
                           f"2^{len(rates)} (it halves at every upsampling)")
    if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
        raise ReaudioError("hifigan: resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
    config = SpeechT5HifiGanConfig(
        model_in_dim=N_MELS, sampling_rate=SAMPLE_RATE, upsample_initial_channel=int(upsample_initial_channel),
        upsample_rates=rates, upsample_kernel_sizes=kernels,
        resblock_kernel_sizes=[int(k) for k in resblock_kernel_sizes],
        resblock_dilation_sizes=[[int(d) for d in ds] for ds in resblock_dilation_sizes],
        normalize_before=bool(normalize_before))
    return SpeechT5HifiGan(config)


# -- key conversion: original HiFi-GAN naming -> SpeechT5HifiGan ----------------------------------
def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``weight = g * v / ||v||``, the norm taken over every axis where ``g`` has size 1
    (``torch.nn.utils.weight_norm``'s ``weight_g`` / ``weight_v`` -> the plain weight)."""
    if g.ndim != v.ndim:
        g = g.reshape([-1] + [1] * (v.ndim - 1)) if g.numel() == v.shape[0] else g.reshape([1] * v.ndim)
    axes = [i for i in range(v.ndim) if g.shape[i] == 1]
    norm = v.float().pow(2).sum(dim=axes, keepdim=True).sqrt() if axes else v.float().abs()
    return (v.float() * (g.float() / norm)).to(v.dtype)


def convert_hifigan_state_dict(sd: dict, model_in_dim: int = N_MELS) -> dict:
    """Original HiFi-GAN generator keys -> SpeechT5HifiGan keys: ``ups.N`` -> ``upsampler.N``, weight
    norm (``weight_g``/``weight_v``, or ``parametrizations.weight.original0/1``) folded into ``weight``,
    and the unused ``mean``/``scale`` buffers filled with 0/1 when absent. Already-converted keys pass."""
    pairs = {}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+)\.(weight_g|weight_v|parametrizations\.weight\.original[01])", key)
        if m:
            slot = "g" if m[2] in ("weight_g", "parametrizations.weight.original0") else "v"
            pairs.setdefault(m[1], {})[slot] = value
        else:
            out[key] = value
    for base, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise ReaudioError(f"hifigan checkpoint: weight-norm pair of '{base}' is incomplete (has {sorted(gv)})")
        out[f"{base}.weight"] = fold_weight_norm(gv["g"], gv["v"])
    renamed = {}
    for key, value in out.items():
        key = re.sub(r"^ups\.(\d+)\.", r"upsampler.\1.", key)
        renamed[key] = value
    renamed.setdefault("mean", torch.zeros(model_in_dim))
    renamed.setdefault("scale", torch.ones(model_in_dim))
    return renamed


def _transformers_folder(path: Path) -> Path | None:
    if (path / "vocoder").is_dir() and ((path / "model_index.json").exists()
                                         or (path / "vocoder" / CONFIG_FILE).exists()):
        return path / "vocoder"
    cfg = path / CONFIG_FILE
    if cfg.exists():
        data = read_json(cfg)
        if data.get("model_type") == "speecht5_hifigan" or "SpeechT5HifiGan" in (data.get("architectures") or []):
            return path
    return None


def read_vocoder_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """Any supported HiFi-GAN weight source -> ``(SpeechT5HifiGan state dict, architecture or None)``."""
    path = Path(path)
    if not path.exists():
        raise ReaudioError(f"hifigan checkpoint not found: {path}")
    if path.is_dir():
        folder = _transformers_folder(path)
        if folder is not None:
            cfg = read_json(folder / CONFIG_FILE)
            if cfg.get("model_in_dim", N_MELS) != N_MELS or cfg.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
                raise ReaudioError(f"{folder}: a HiFi-GAN for {cfg.get('model_in_dim')} mels at "
                                   f"{cfg.get('sampling_rate')} Hz; this front end is {N_MELS} mels at "
                                   f"{SAMPLE_RATE} Hz")
            weights = next((folder / f for f in TRANSFORMERS_WEIGHTS if (folder / f).exists()), None)
            if weights is None:
                raise ReaudioError(f"{folder}: no weights ({' or '.join(TRANSFORMERS_WEIGHTS)})")
            arch = {k: cfg[k] for k in ARCH_KEYS if k in cfg}
            return convert_hifigan_state_dict(read_weights(weights)), arch
        if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
            cfg = read_json(path / CONFIG_FILE)
            return read_weights(path / WEIGHTS_FILE), {k: cfg[k] for k in ARCH_KEYS if k in cfg}
        raise ReaudioError(f"{path}: not a vocoder directory (expected {CONFIG_FILE} + {WEIGHTS_FILE} written by "
                           "save_pretrained, or a diffusers folder with model_index.json and vocoder/)")
    obj = read_weights(path)
    if isinstance(obj.get("generator"), dict):  # jik876/hifi-gan g_XXXXXXXX
        sd = obj["generator"]
    else:
        sd = lightning_state_dict(obj)
        if any(k.startswith(LDM_PREFIX) for k in sd):
            sd = sub_state_dict(sd, LDM_PREFIX)
    if not any(k.startswith("conv_pre.") for k in sd):
        raise ReaudioError(f"{path}: no HiFi-GAN generator weights found (expected 'generator' / "
                           "'first_stage_model.vocoder.*' / 'conv_pre.*' keys)")
    return convert_hifigan_state_dict(sd), None


class HiFiGAN(Pretrained, Vocoder):
    """HiFi-GAN v1 generator. Reference sizes: upsample_initial_channel 1024, upsample_rates [5, 4, 2, 2, 2],
    upsample_kernel_sizes [16, 16, 8, 4, 4], resblock kernels [3, 7, 11], dilations [[1, 3, 5]] x 3."""

    sample_rate = SAMPLE_RATE
    hop_length = HOP_LENGTH

    def __init__(self, *, upsample_initial_channel, upsample_rates, upsample_kernel_sizes, resblock_kernel_sizes,
                 resblock_dilation_sizes, normalize_before, checkpoint, device):
        arch = {"upsample_initial_channel": int(upsample_initial_channel),
                "upsample_rates": [int(r) for r in upsample_rates],
                "upsample_kernel_sizes": [int(k) for k in upsample_kernel_sizes],
                "resblock_kernel_sizes": [int(k) for k in resblock_kernel_sizes],
                "resblock_dilation_sizes": [[int(d) for d in ds] for ds in resblock_dilation_sizes],
                "normalize_before": bool(normalize_before)}
        state = None
        if checkpoint:
            state, source_arch = read_vocoder_checkpoint(checkpoint)
            if source_arch:
                changed = {k: v for k, v in source_arch.items() if arch.get(k) != v}
                if changed:
                    log.info("hifigan: architecture taken from %s: %s", checkpoint, changed)
                arch.update(source_arch)
        self.arch = arch
        self.model = build_hifigan(**arch)
        if state is not None:
            load_strict(self.model, state, f"hifigan weights {checkpoint}",
                        hint="Set vocoder.params (upsample_initial_channel, upsample_rates, upsample_kernel_sizes, "
                             "resblock_kernel_sizes, resblock_dilation_sizes) to the checkpoint's sizes.")
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel [B, T, 64]`` log-mel -> waveform ``[B, T * 160]`` float32 in [-1, 1]."""
        if not torch.is_tensor(mel) or mel.ndim != 3 or mel.shape[-1] != N_MELS or mel.shape[1] == 0:
            raise ReaudioError(f"hifigan: mel must be a tensor [B, T, {N_MELS}] with T > 0, got "
                               f"{tuple(mel.shape) if torch.is_tensor(mel) else type(mel).__name__}")
        wav = self.model(mel.to(self.device, torch.float32))
        # odd (kernel - stride) upsamplers add a few samples at the end: keep exactly T * hop
        return wav.reshape(mel.shape[0], -1)[:, :mel.shape[1] * self.hop_length].to(mel.device)

    def config(self) -> dict:
        return {**self.arch, "checkpoint": None, "device": "cpu"}

    # save_pretrained (Pretrained): config.json (constructor keywords) + model.safetensors (SpeechT5HifiGan)
    def _config(self) -> dict:
        return self.config()

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        """A :meth:`save_pretrained` directory as saved; any other supported source (diffusers folder,
        AudioLDM ``.ckpt``, HiFi-GAN generator file) is read with the registry defaults."""
        cfg_file = directory / CONFIG_FILE
        if directory.is_dir() and cfg_file.exists() and _transformers_folder(directory) is None:
            params = super()._pretrained_params(directory, overrides)
        else:
            from reaudio_core.registry import get_registry
            params = {**get_registry().resolve_params("vocoder", "hifigan", {}), **overrides,
                      "checkpoint": str(directory)}
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ReaudioError(f"hifigan: unknown parameter(s) {sorted(unknown)} in {cfg_file}")
        return params

    def to(self, device) -> "HiFiGAN":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


@hookimpl
def register_components(register):
    # the reference upsampling (x160) with narrow channels and one resblock kernel
    register("vocoder", "hifigan", HiFiGAN, tiny={"upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                                                  "resblock_dilation_sizes": [[1, 3, 5]]})

"""Decoder ``vae``: the AudioLDM mel autoencoder (reference section 2) on diffusers' AutoencoderKL.

``mel [B, T, 64]`` -> ``[B, 1, T, 64]`` -> encoder -> posterior (8 channels, x4 smaller in time
and frequency) -> latents ``[B, 8, T/4, 16]`` multiplied by ``scale_factor`` (= 1/std(z),
measured on training data: :func:`measure_scale_factor`); :meth:`VAE.decode` divides by it.

Weights (``checkpoint``, or :meth:`VAE.from_pretrained`) may come from

* a directory written by :meth:`VAE.save_pretrained` (``config.json`` = constructor keywords
  including ``scale_factor``, ``model.safetensors`` = the AutoencoderKL state dict);
* a diffusers folder: a pipeline root holding ``model_index.json`` and ``vae/``, or the ``vae/``
  folder itself (``config.json`` with ``_class_name: AutoencoderKL``, its ``scaling_factor`` and
  ``diffusion_pytorch_model.safetensors`` / ``.bin``); its config defines the architecture;
* an original AudioLDM Lightning ``.ckpt`` (``state_dict`` with ``first_stage_model.encoder.*``,
  ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` and the ``scale_factor`` buffer),
  converted by :func:`convert_ldm_vae_state_dict`; or a bare state dict in either naming.

Loading never executes code (safetensors, or ``torch.load(weights_only=True)``).
``scale_factor: null`` takes the value stored with the weights (1.0 for random weights).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from reaudio_core import Decoder, Pretrained, ReaudioError, hookimpl
from reaudio_core.mel import N_MELS

from ._ckpt import lightning_state_dict, load_strict, read_json, read_weights, sub_state_dict

log = logging.getLogger("reaudio")

ARCH_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
LDM_PREFIX = "first_stage_model."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def build_autoencoder(*, block_out_channels, layers_per_block, latent_channels, norm_num_groups,
                      scaling_factor: float = 1.0):
    """A diffusers AutoencoderKL for 1-channel mels; ``len(block_out_channels) - 1`` x2 stages."""
    from diffusers import AutoencoderKL
    chans = [int(c) for c in block_out_channels]
    if not chans:
        raise ReaudioError("vae: block_out_channels must list at least one width")
    bad = [c for c in chans if c % int(norm_num_groups)]
    if bad:
        raise ReaudioError(f"vae: every block_out_channels entry must be a multiple of norm_num_groups="
                           f"{norm_num_groups}; {bad} are not")
    compression = 2 ** (len(chans) - 1)
    if N_MELS % compression:
        raise ReaudioError(f"vae: {len(chans)} levels compress x{compression}, which does not divide {N_MELS} mel bins")
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * len(chans),
                         up_block_types=["UpDecoderBlock2D"] * len(chans), block_out_channels=chans,
                         layers_per_block=int(layers_per_block), latent_channels=int(latent_channels),
                         norm_num_groups=int(norm_num_groups), scaling_factor=float(scaling_factor))


# -- key conversion: original LDM / AudioLDM naming -> diffusers AutoencoderKL ---------------------
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _resnet(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut")


def convert_ldm_vae_state_dict(sd: dict) -> dict:
    """Original AudioLDM/LDM VAE keys (``encoder.down.0.block.1.conv1.weight``, ``decoder.up.2.upsample...``,
    ``*.mid.attn_1.q`` 1x1 convs, ...) -> diffusers AutoencoderKL keys. Keys it does not recognise are
    passed through unchanged (the strict load that follows names them)."""
    levels = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
            new = f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}"
            if m[2] != "norm" and m[3] == "weight" and value.ndim == 4:  # 1x1 conv -> linear
                value = value[:, :, 0, 0]
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        out[new] = value
    return out


def _upgrade_diffusers_keys(sd: dict) -> dict:
    """Diffusers folders saved before its attention refactor name the mid attention query/key/value/proj_attn."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)", key)
        if m:
            key = f"{m[1]}.{_OLD_DIFFUSERS_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _diffusers_folder(path: Path) -> Path | None:
    """The ``vae/`` folder of a diffusers pipeline root, or ``path`` itself when it is one."""
    if (path / "vae").is_dir() and ((path / "model_index.json").exists() or (path / "vae" / CONFIG_FILE).exists()):
        return path / "vae"
    cfg = path / CONFIG_FILE
    if cfg.exists() and "_class_name" in read_json(cfg):
        return path
    return None


def read_vae_checkpoint(path: str | Path) -> tuple[dict, float | None, dict | None]:
    """Read any supported VAE weight source -> ``(diffusers state dict, stored scale factor or None,
    architecture from the source's config or None)``. ``pkg:PACKAGE/PATH`` names a folder shipped in a package."""
    from reaudio_core.loading import resolve_path
    path = resolve_path(path)
    if not path.exists():
        raise ReaudioError(f"vae checkpoint not found: {path}")
    if path.is_dir():
        folder = _diffusers_folder(path)
        if folder is not None:
            cfg = read_json(folder / CONFIG_FILE)
            if cfg.get("_class_name") != "AutoencoderKL":
                raise ReaudioError(f"{folder}: config.json describes a {cfg.get('_class_name')}, not an AutoencoderKL")
            if cfg.get("in_channels", 1) != 1 or cfg.get("out_channels", 1) != 1:
                raise ReaudioError(f"{folder}: an AutoencoderKL with {cfg.get('in_channels')} input channels is "
                                   "not a mel VAE (AudioLDM's has 1)")
            weights = next((folder / f for f in DIFFUSERS_WEIGHTS if (folder / f).exists()), None)
            if weights is None:
                raise ReaudioError(f"{folder}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
            arch = {k: cfg[k] for k in ARCH_KEYS if k in cfg}
            arch.setdefault("norm_num_groups", 32)
            return _upgrade_diffusers_keys(read_weights(weights)), cfg.get("scaling_factor"), arch
        if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
            cfg = read_json(path / CONFIG_FILE)
            arch = {k: cfg[k] for k in ARCH_KEYS if k in cfg}
            return read_weights(path / WEIGHTS_FILE), cfg.get("scale_factor"), arch
        raise ReaudioError(f"{path}: not a VAE directory (expected {CONFIG_FILE} + {WEIGHTS_FILE} written by "
                           "save_pretrained, or a diffusers folder with model_index.json and vae/)")
    sd = lightning_state_dict(read_weights(path))
    scale = sd.get("scale_factor")
    if any(k.startswith(LDM_PREFIX) for k in sd):
        sub = {k: v for k, v in sub_state_dict(sd, LDM_PREFIX).items()
               if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
        if not sub:
            raise ReaudioError(f"{path}: no first_stage_model.encoder/decoder weights in this checkpoint")
    elif any(k.startswith(("encoder.", "decoder.")) for k in sd):
        sub = {k: v for k, v in sd.items() if k != "scale_factor"}
    else:
        raise ReaudioError(f"{path}: no VAE weights found (expected AudioLDM 'first_stage_model.*' keys, or "
                           "encoder.*/decoder.* keys)")
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.", k) or ".mid.block_" in k for k in sub):
        sub = convert_ldm_vae_state_dict(sub)
    else:
        sub = _upgrade_diffusers_keys(sub)
    return sub, (float(scale) if torch.is_tensor(scale) or isinstance(scale, (int, float)) else None), None


class VAE(Pretrained, Decoder):
    """AudioLDM's mel VAE. Reference sizes: block_out_channels [128, 256, 512], layers_per_block 2,
    latent_channels 8, norm_num_groups 32 -> [B, 1024, 64] mel <-> [B, 8, 256, 16] latents."""

    def __init__(self, *, block_out_channels, layers_per_block, latent_channels, norm_num_groups, scale_factor,
                 checkpoint, device):
        arch = {"block_out_channels": [int(c) for c in block_out_channels], "layers_per_block": int(layers_per_block),
                "latent_channels": int(latent_channels), "norm_num_groups": int(norm_num_groups)}
        state, stored_scale = None, None
        if checkpoint:
            state, stored_scale, source_arch = read_vae_checkpoint(checkpoint)
            if source_arch:
                changed = {k: v for k, v in source_arch.items() if arch.get(k) != v}
                if changed:
                    log.info("vae: architecture taken from %s: %s", checkpoint, changed)
                arch.update(source_arch)
        self.arch = arch
        self.model = build_autoencoder(**arch)
        if state is not None:
            load_strict(self.model, state, f"vae weights {checkpoint}",
                        hint="Set decoder.params (block_out_channels, layers_per_block, latent_channels, "
                             "norm_num_groups) to the checkpoint's sizes.")
        if scale_factor is None:
            scale_factor = stored_scale if stored_scale is not None else 1.0
        scale_factor = float(scale_factor)
        if not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ReaudioError(f"vae: scale_factor must be a positive number, got {scale_factor}")
        self.scale_factor = scale_factor
        self.latent_channels = arch["latent_channels"]
        self.compression = 2 ** (len(arch["block_out_channels"]) - 1)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    # -- the Decoder contract ------------------------------------------------------------------
    def _check_mel(self, mel: torch.Tensor) -> None:
        if not torch.is_tensor(mel) or mel.ndim != 3 or mel.shape[-1] != N_MELS:
            raise ReaudioError(f"vae: mel must be a tensor [B, T, {N_MELS}], got "
                               f"{tuple(mel.shape) if torch.is_tensor(mel) else type(mel).__name__}")
        if mel.shape[1] == 0 or mel.shape[1] % self.compression:
            raise ReaudioError(f"vae: {mel.shape[1]} mel frames is not a positive multiple of the compression "
                               f"{self.compression}; pad or crop with reaudio_core.mel.pad_or_crop")

    def posterior(self, mel: torch.Tensor):
        """Unscaled diagonal-Gaussian posterior of ``mel [B, T, 64]`` (diffusers DiagonalGaussianDistribution);
        for training (``.kl()``) and :func:`measure_scale_factor`."""
        self._check_mel(mel)
        return self.model.encode(mel.to(self.device, torch.float32).unsqueeze(1)).latent_dist

    def encode(self, mel: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mel [B, T, 64]`` -> ``scale_factor * z``, ``[B, C, T/4, 16]`` (posterior mean, or a sample)."""
        dist = self.posterior(mel)
        z = dist.sample(generator) if sample else dist.mode()
        return (z * self.scale_factor).to(mel.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, t, 64/compression]`` -> log-mel ``[B, t * compression, 64]``."""
        if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != self.latent_channels \
                or latents.shape[3] * self.compression != N_MELS:
            raise ReaudioError(f"vae: latents must be [B, {self.latent_channels}, t, {N_MELS // self.compression}], "
                               f"got {tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
        z = latents.to(self.device, torch.float32) / self.scale_factor
        return self.model.decode(z).sample.squeeze(1).to(latents.device)

    # -- persistence -----------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor keywords that rebuild this component (weights apart)."""
        return {**self.arch, "scale_factor": self.scale_factor, "checkpoint": None, "device": "cpu"}

    # save_pretrained (Pretrained): config.json (constructor keywords, with scale_factor) + model.safetensors
    def _config(self) -> dict:
        return self.config()

    def _state_dict(self) -> dict:
        return self.model.state_dict()

    def save_diffusers(self, directory: str | Path) -> None:
        """Write a diffusers ``AutoencoderKL`` folder (``scaling_factor`` = this scale factor)."""
        self.model.register_to_config(scaling_factor=self.scale_factor)
        self.model.save_pretrained(str(directory), safe_serialization=True)

    @classmethod
    def _pretrained_params(cls, directory: Path, overrides: dict) -> dict:
        """A :meth:`save_pretrained` directory as saved; a diffusers folder or an AudioLDM ``.ckpt`` is
        read with the registry defaults. ``overrides`` replace constructor keywords (e.g. ``device``)."""
        cfg_file = directory / CONFIG_FILE
        if directory.is_dir() and cfg_file.exists() and "_class_name" not in read_json(cfg_file):
            params = super()._pretrained_params(directory, overrides)
        else:
            from reaudio_core.registry import get_registry
            params = {**get_registry().resolve_params("decoder", "vae", {}), **overrides,
                      "checkpoint": str(directory)}
        unknown = set(params) - {*ARCH_KEYS, "scale_factor", "checkpoint", "device"}
        if unknown:
            raise ReaudioError(f"vae: unknown parameter(s) {sorted(unknown)} in {cfg_file}")
        return params

    def to(self, device) -> "VAE":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


@torch.no_grad()
def measure_scale_factor(vae: VAE, mels, sample: bool = True, generator: torch.Generator | None = None,
                         batch_size: int = 8) -> float:
    """``1 / std(z)`` over every element of the (unscaled) latents of ``mels`` (a ``[B, T, 64]`` tensor or
    a list of them), as AudioLDM does on its first training batch. Does not change ``vae``: assign
    ``vae.scale_factor = measure_scale_factor(vae, mels)`` to use it."""
    from tqdm.auto import tqdm
    batches = [mels] if torch.is_tensor(mels) else list(mels)
    chunks = [b[i:i + batch_size] for b in batches for i in range(0, len(b), batch_size)]
    zs = []
    for chunk in tqdm(chunks, desc="vae scale factor", disable=len(chunks) < 4, leave=False):
        dist = vae.posterior(chunk)
        zs.append((dist.sample(generator) if sample else dist.mode()).flatten().cpu())
    if not zs:
        raise ReaudioError("measure_scale_factor needs at least one mel")
    std = torch.cat(zs).std()
    if not torch.isfinite(std) or std <= 0:
        raise ReaudioError(f"latent std is {float(std)}: cannot derive a scale factor")
    return float(1.0 / std)


#: test size: 3 levels (x4), GroupNorm(4), random weights
TINY = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8, "norm_num_groups": 4}


@hookimpl
def register_components(register):
    register("decoder", "vae", VAE, tiny=TINY)

"""Access to the components a stage trains: their torch modules, weights fingerprints and devices."""
from __future__ import annotations

import json

import torch
from torch import nn

from ..config import build
from ..registry import ReaudioError


def torch_module(component, what: str) -> nn.Module:
    """The ``nn.Module`` holding a component's trainable weights."""
    if isinstance(component, nn.Module):
        return component
    for attr in ("model", "module", "unet", "vae", "net"):
        m = getattr(component, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise ReaudioError(f"{what} {type(component).__name__} exposes no torch module to train (a component made of "
                       "others trains one part at a time: name that part's component in the config; docs/training.md)")


def load_or_build(cfg: dict, slot: str):
    """The component in ``slot``, built from its entry. Weights come through the component's own
    parameters (``checkpoint: DIR`` for vae, hifigan, unet-ldm; ``weights: DIR`` for vae-latent), e.g.
    ``decoder: {name: vae, params: {checkpoint: runs/offline-vae/final/decoder}}``."""
    return build(cfg, slot) if cfg.get(slot) is not None else None


def component_fingerprint(component) -> str:
    """SHA-1 over the weights of every torch module a component holds (its attributes, one level deep),
    plus its class name: identifies cached features computed by these exact weights."""
    import hashlib
    h = hashlib.sha1(type(component).__name__.encode())
    modules = [component] if isinstance(component, nn.Module) else []
    for name in sorted(vars(component)) if not isinstance(component, nn.Module) else []:
        value = getattr(component, name)
        if isinstance(value, nn.Module):
            modules.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):  # e.g. a wrapped VAE component
            modules += [v for _, v in sorted(vars(value).items()) if isinstance(v, nn.Module)]
    for module in modules:
        for key, tensor in module.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def feature_info(db, key: str) -> dict:
    """The ``info`` a feature cache was saved with (``features/NAME/meta.json``), or {}."""
    try:
        return json.loads((db.version_dir / "features" / key / "meta.json").read_text(encoding="utf-8")).get("info") or {}
    except (OSError, ValueError):
        return {}


def move_component(component, device: torch.device) -> None:
    """Put a component's weights (and its notion of its device) on ``device``."""
    if component is None:
        return
    if hasattr(component, "to") and not isinstance(component, nn.Module):
        component.to(device)
    elif isinstance(component, nn.Module):
        component.to(device)

"""Reading and writing weight files without executing code (shared by the weighted plugins).

Weights are read only from safetensors or with ``torch.load(..., weights_only=True)``; a
pickle that holds anything other than tensors and plain containers is refused. Writes are
atomic (temporary file in the same folder, then ``os.replace``); the folder readers/writers
(``read_json``, ``write_json``, ``write_safetensors``) live in :mod:`reaudio_core.pretrained`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from reaudio_core import ReaudioError
from reaudio_core.pretrained import read_json, write_json, write_safetensors  # noqa: F401  (re-exported)


def read_weights(path: str | Path) -> dict:
    """Everything stored in a weight file: a safetensors file or a torch pickle (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise ReaudioError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ReaudioError(f"{path}: not a readable safetensors file ({exc}); the weights are damaged or "
                               "incomplete: re-save or re-copy them") from None
    import zipfile
    try:  # mmap (zip-format files only): a multi-GB Lightning checkpoint is not read whole into memory
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ReaudioError(f"{path}: refused to load (it holds Python objects other than tensors, and loading "
                           f"never executes code; save just the state dict, or convert it to safetensors). "
                           f"{first}") from None
    except Exception as exc:
        raise ReaudioError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ReaudioError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def lightning_state_dict(obj: dict) -> dict:
    """The model weights of a (Lightning) checkpoint: ``obj["state_dict"]`` when present."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ReaudioError(f"checkpoint 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    return sd


def sub_state_dict(sd: dict, prefix: str) -> dict:
    """Entries under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(module: torch.nn.Module, state_dict: dict, what: str, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with an actionable message on missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
        raise ReaudioError(f"{what} does not fit this model: {'; '.join(parts)}.{(' ' + hint) if hint else ''}")
    module.load_state_dict(state_dict, strict=True)

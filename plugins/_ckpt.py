"""Reading and writing weight files without executing code (shared by the weighted plugins).

Weights are read only from safetensors or with ``torch.load(..., weights_only=True)``; a
pickle that holds anything other than tensors and plain containers is refused. A safetensors file may hold
the 4-bit difference from another weight file (:func:`write_delta`; the offline-fast student against its
teacher), which :func:`read_weights` adds back. Writes are
atomic (temporary file in the same folder, then ``os.replace``); the folder readers/writers
(``read_json``, ``write_json``, ``write_safetensors``) live in :mod:`reaudio_core.pretrained`.
"""
from __future__ import annotations

import hashlib
import os
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
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:  # one opening: the tensors and the metadata (a delta's base)
                state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as exc:
            raise ReaudioError(f"{path}: not a readable safetensors file ({exc}); the weights are damaged or "
                               "incomplete: re-save or re-copy them") from None
        return _add_base(path, state, meta) if DELTA_OF in meta else state
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


DELTA_OF = "reaudio_delta_of"  #: safetensors metadata of a delta file: its base file, relative to the delta's folder
DELTA_SHA = "reaudio_delta_sha256"  #: ... and that base file's sha256, checked before it is used
DELTA_SCALE = ".int4_scale"  #: suffix of the per-group scales stored beside a packed 4-bit delta
GROUP = 64  #: delta values per scale


def write_delta(path: str | Path, state: dict, base_file: str | Path) -> None:
    """Store ``state`` as its difference from the weights in ``base_file`` (a safetensors file beside it: the
    offline-fast student against its teacher, about a quarter of half precision's size): every floating tensor
    the base has with the same shape becomes a 4-bit delta (symmetric, values -7..7, two per byte) with a
    float16 scale per :data:`GROUP` values (``max |delta| / 7``); the rest is stored in half precision.
    :func:`read_weights` adds the base back, after checking that the base file is the one written against
    (sha256 in the metadata)."""
    path, base_file = Path(path), Path(base_file)
    base = read_weights(base_file)
    out = {}
    for k, w in state.items():
        b = base.get(k)
        if not w.is_floating_point() or b is None or b.shape != w.shape or w.numel() < GROUP:
            out[k] = w.half() if w.is_floating_point() else w
            continue
        d = (w.float() - b.float()).reshape(-1)
        d = torch.cat([d, d.new_zeros(-len(d) % GROUP)]).view(-1, GROUP)
        scale = (d.abs().amax(1, keepdim=True) / 7).half()
        q = (torch.round(d / scale.float().clamp(min=1e-12)).clamp(-7, 7) + 8).to(torch.uint8)
        out[k] = q[:, 0::2] | (q[:, 1::2] << 4)
        out[k + DELTA_SCALE] = scale
    from safetensors.torch import save_file
    rel = os.path.relpath(base_file.resolve(), path.resolve().parent)
    meta = {"format": "pt", DELTA_OF: rel.replace(os.sep, "/"),
            DELTA_SHA: hashlib.sha256(base_file.read_bytes()).hexdigest()}
    tensors = {k: v.contiguous() for k, v in out.items()}
    from reaudio_core.io import atomic_write
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _add_base(path: Path, state: dict, meta: dict) -> dict:
    """The weights of a file written by :func:`write_delta`: its base plus the unpacked deltas."""
    ref = meta[DELTA_OF]
    base_file = (path.parent / ref).resolve()
    if Path(ref).is_absolute() or not base_file.is_file():
        raise ReaudioError(f"{path}: stored as a difference from {ref} (relative to its folder), which is not "
                           "there; install or copy the weights with the folder they come with")
    data = base_file.read_bytes()  # read once: checked, then parsed
    if hashlib.sha256(data).hexdigest() != meta.get(DELTA_SHA):
        raise ReaudioError(f"{path}: stored as a difference from {base_file}, which has changed since (sha256 "
                           "differs); these weights need the base file they were written against")
    from safetensors.torch import load
    base = load(data)
    out = {}
    for k, v in state.items():
        if k.endswith(DELTA_SCALE):
            continue
        scale = state.get(k + DELTA_SCALE)
        if scale is None:
            out[k] = v.float() if v.is_floating_point() else v
            continue
        b = base.get(k)
        if b is None or v.dtype != torch.uint8 or v.shape != (-(-b.numel() // GROUP), GROUP // 2) \
                or scale.shape[0] != v.shape[0]:
            raise ReaudioError(f"{path}: delta '{k}' does not match its scale or its base; the weights are damaged")
        q = torch.stack([v & 15, v >> 4], -1).reshape(v.shape[0], GROUP).float() - 8
        out[k] = b.float() + (q * scale.float()).reshape(-1)[:b.numel()].view(b.shape)
    return out


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

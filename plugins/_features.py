"""Helpers shared by the evaluation feature models (vggish, panns-cnn14, esc50-classifier, clap)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from reaudio_core.registry import ReaudioError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def state_fingerprint(state: dict[str, torch.Tensor], version: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) plus a preprocessing ``version`` tag."""
    h = hashlib.sha256(version.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict(path: str | Path, what: str, nested: Iterable[str] = ("model", "state_dict")) -> dict:
    """Read a checkpoint without executing code: ``.safetensors`` or ``torch.load(weights_only=True)``.

    A checkpoint that wraps the state dict (``{'model': {...}}``) is unwrapped through ``nested``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ReaudioError(f"{what} checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReaudioError(f"{what}: cannot read {path} as a weights-only torch checkpoint "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    for key in nested:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ReaudioError(f"{what}: {path} does not hold a state dict of tensors")
    return obj


def check_keys(module: torch.nn.Module, state: dict, what: str, path, ignore: Sequence[str] = ()) -> None:
    """Error naming the missing / unexpected / mis-shaped keys, so a wrong file is obvious."""
    own = module.state_dict()
    keys = {k for k in state if not any(k.startswith(p) for p in ignore)}
    missing = sorted(set(own) - keys)
    unexpected = sorted(keys - set(own))
    shape = sorted(k for k in keys & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:4])})")
        raise ReaudioError(f"{path} is not a {what} checkpoint: " + "; ".join(parts))


def by_length(wavs: Sequence[np.ndarray], batch_size: int):
    """Yield ``(indices, [B, L] float32 tensor)`` batches of equal-length clips, in input order per length."""
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(wavs):
        groups.setdefault(len(w), []).append(i)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            yield chunk, torch.from_numpy(np.stack([np.asarray(wavs[i], dtype=np.float32) for i in chunk]))


def pad_to(wav: np.ndarray, n: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    return wav if len(wav) >= n else np.pad(wav, (0, n - len(wav)))


def find_default(candidates: Sequence[str | Path]) -> Path | None:
    for c in candidates:
        p = Path(c).expanduser()
        if p.exists():
            return p
    return None

"""Helpers shared by built-in plugins (not part of the public contract)."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from reaudio_core.optional import is_tensor
from reaudio_core.io import atomic_write  # noqa: F401  (the retrievers' writer, re-exported)
from reaudio_core.registry import ReaudioError


class ParamError(ReaudioError, ValueError):
    """A bad component parameter or a saved index that does not match the requested one."""


def as_matrix(x, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[N, dim]`` array, with a clear error on a wrong shape."""
    if is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what} must be [N, dim] with dim >= 1, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index holds dimension {dim}")
    return x


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[Q, k']`` results to ``[Q, k]`` with -inf / -1 (faiss pads with -1 ids already)."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if ids.shape[1] < k:
        q = ids.shape[0]
        scores = np.concatenate([scores, np.full((q, k - ids.shape[1]), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((q, k - ids.shape[1]), -1, np.int64)], 1)
    return scores, ids


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads (for splitting GIL-free scans across cores)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"reaudio-scan{workers}")
        return pool


def write_meta(directory: Path, **meta) -> None:
    """Write ``retriever.json`` atomically; savers write it last, so it marks a complete save."""
    text = json.dumps(meta, indent=2)
    atomic_write(Path(directory) / "retriever.json", lambda tmp: Path(tmp).write_text(text))


def read_meta(directory: Path) -> dict:
    path = Path(directory) / "retriever.json"
    if not path.exists():
        raise FileNotFoundError(f"no retriever.json in {directory}: not a saved index")
    return json.loads(path.read_text())


def load_params(directory, name: str, params: dict, build_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """Validate ``load(directory, **params)`` of a retriever saved by :func:`write_meta`.

    Returns ``(meta, constructor_params)``: the saved parameters overlaid with ``params``.
    Build-time keys (``build_keys``) must be ``None`` or equal to the saved value.
    """
    meta = read_meta(Path(directory))
    if meta.get("name") != name:
        raise ParamError(f"{directory} holds a '{meta.get('name')}' index, not '{name}'")
    saved = dict(meta.get("params") or {})
    unknown = sorted(set(params) - set(saved))
    if unknown:
        raise ParamError(f"{name} retriever has no parameter(s) {unknown}; known: {sorted(saved)}")
    for key in build_keys:
        if params.get(key) is not None and saved.get(key) is not None and params[key] != saved[key]:
            raise ParamError(f"the index in {directory} was built with {key}={saved.get(key)!r}, not "
                             f"{params[key]!r}; rebuild the index to change it")
    merged = {**saved, **{k: v for k, v in params.items() if k not in build_keys}}
    return meta, merged


def check_params(name: str, **ints) -> None:
    """Raise a clear error unless every given value is an integer >= its stated minimum.

    ``ints`` maps a parameter name to ``(value, minimum)``; ``None`` values are skipped.
    """
    for key, (value, minimum) in ints.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ParamError(f"{name}: {key} must be an integer >= {minimum}, got {value!r}")

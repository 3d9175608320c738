"""Determinism and atomic checkpoints of a training run.

* :func:`step_seed`: every random draw of a step comes from a seed derived from ``(seed, step, rank, slot)``.
* :func:`rng_state` / :func:`set_rng_state`: the global RNG states, saved in a checkpoint and restored.
* ``OUT/checkpoints/step-N.pt``: written atomically (:func:`reaudio_core.io.atomic_save`), listed, loaded
  (never executing code) and pruned to the newest ``keep``.
"""
from __future__ import annotations

import logging

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_save
from ..registry import ReaudioError

log = logging.getLogger("reaudio")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "reaudio-train-checkpoint"
CHECKPOINT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# determinism helpers
# ---------------------------------------------------------------------------------------------
GLOBAL_SLOT = 1 << 30  #: step_seed slot of the global torch RNG (slots 1..batch are the items' crops)


def step_seed(seed: int, step: int, rank: int = 0, slot: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, step, rank, slot)``."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(slot)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) global RNG states as tensors (loadable with weights_only)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python_version": int(version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint file in ``out/checkpoints``, oldest first."""
    directory = Path(out) / CHECKPOINT_DIR
    found = []
    if directory.is_dir():
        for p in directory.glob("step-*.pt"):
            try:
                found.append((int(p.stem.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(found)


def save_checkpoint(out: str | Path, state: dict, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-N.pt``; then prune to the newest ``keep``.

    Older checkpoints are deleted only after the new one is complete on disk.
    """
    path = atomic_save(state, checkpoint_path(out, state["step"]))
    if keep > 0:
        for _, old in list_checkpoints(out)[:-keep]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (never executes code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReaudioError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ReaudioError(f"{path} is not a reaudio training checkpoint")
    return state


def latest_checkpoint(out: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; unreadable newer files are reported and passed over."""
    for step, path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path)
        except ReaudioError as exc:
            log.warning(f"{exc}; trying an older checkpoint")
    return None

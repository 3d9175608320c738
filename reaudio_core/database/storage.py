"""How a database lies on disk: versioned folders, the ``CURRENT`` pointer, the writer lock, atomic
replacement, reading its JSON files, writing a complete version, and cleaning up after failed builds.

Layout on disk
--------------
::

    DIR/CURRENT            one line, the name of the live version ("v0002")
    DIR/v0002/meta.json    format, sizes, encoders and dimensions, neighbour settings
              config.yaml  the resolved configuration the database was built with
              items.jsonl  one JSON object per item: id, path (absolute), file (as written
                           in the manifest), caption, label, duration (s), manifest
              text.npy     [N, d_text] float32 caption embeddings (L2-normalised)
              audio.npy    [N, d_audio] float32 clip embeddings (only with an audio_encoder)
              index/       the configured retriever, saved with Retriever.save
              neighbours_ids.npy / neighbours_scores.npy   [N, K] top-K per item, the item
                           itself excluded, exact search; padded with -1 / -inf
              report.json  what the build or add did, skipped rows with their reasons
              features/NAME/*.npy  per-item feature arrays cached later (save_features)

Atomicity: a build or an add writes a complete new version into a temporary folder, fsyncs it,
renames it to ``vNNNN`` and only then replaces ``CURRENT`` (``os.replace``). A build killed at
any moment leaves either the previous version live or, for a first build, no ``CURRENT`` at all,
which :meth:`Database.open` refuses with a clear error. Leftovers of interrupted builds are
removed by the next build or add. One writer at a time (a lock file); the version that was live
before a commit is kept so readers that opened it keep working.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..config import save_config
from ..io import atomic_write_text, fsync_path, fsync_tree
from ..registry import ReaudioError
from .neighbours import _modal, exact_neighbours

log = logging.getLogger("reaudio")

if TYPE_CHECKING:
    from .build import Report

FORMAT = "reaudio-db"
FORMAT_VERSION = 1
POINTER = "CURRENT"
LOCK = ".lock"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
#: testing hook: when set to a stage name ("batch", "written", "renamed") the writer prints
#: "reaudio-db: paused at STAGE" on stderr and sleeps there (the kill -9 tests use it)
PAUSE_ENV = "REAUDIO_DB_PAUSE_AT"


# -- reading, locking, versions ----------------------------------------------------------
def _read_json(path: Path, lines: bool = False):
    """A JSON file (or, with ``lines``, a JSON-lines file) of a database version; anything unreadable is a
    :class:`ReaudioError` naming the file and saying what to do."""
    try:
        text = path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReaudioError(f"{path}: unreadable ({exc}); the database is damaged: rebuild it with "
                           "`reaudio index build` (or restore the file from a copy)") from None


def _pause(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        log.warning("reaudio-db: paused at %s", stage)
        time.sleep(3600)


class _Lock:
    """Exclusive writer lock on ``DIR/.lock`` (released by the OS if the process dies)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.fd = None

    def __enter__(self):
        import fcntl
        self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ReaudioError(f"another build or add is writing {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _versions(directory: Path) -> list[str]:
    out = []
    for p in directory.iterdir() if directory.is_dir() else []:
        if _VERSION_RE.match(p.name) and p.is_dir():
            out.append(p.name)
    return sorted(out, key=lambda n: int(n[1:]))


def _current(directory: Path) -> str | None:
    pointer = directory / POINTER
    if not pointer.exists():
        return None
    return pointer.read_text(encoding="utf-8").strip() or None


def _clean_stale(directory: Path, keep: Iterable[str]) -> None:
    """Remove interrupted writes and versions other than ``keep`` (call with the lock held)."""
    keep = set(keep)
    for p in directory.iterdir():
        if p.name.startswith(".tmp-") or (p.name.startswith(f".{POINTER}.tmp-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif _VERSION_RE.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _check_out_dir(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ReaudioError(f"--out {directory} exists and is not a directory")
    foreign = [p.name for p in directory.iterdir()
               if not (p.name in (POINTER, LOCK) or _VERSION_RE.match(p.name) or p.name.startswith(".tmp-")
                       or p.name.startswith(f".{POINTER}.tmp-"))]
    if foreign:
        raise ReaudioError(f"--out {directory} is not empty and is not a reaudio database (it holds "
                           f"{', '.join(sorted(foreign)[:5])}{' ...' if len(foreign) > 5 else ''}); "
                           "choose a new or empty directory")


# -- writing a version, cleaning up ------------------------------------------------------
def _write_version(root: Path, cfg: dict, items: list[dict], text: np.ndarray, audio: np.ndarray | None,
                   index, report: Report, progress: bool, previous: str | None) -> str:
    """Write a complete version beside the live one and switch ``CURRENT`` to it atomically."""
    db = cfg["database"]
    used = [int(v[1:]) for v in _versions(root)]
    version = f"v{(max(used) + 1 if used else 1):04d}"
    tmp = root / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        q_mod, k_mod = db["neighbour_modality"].split("->")
        n_ids, n_scores = exact_neighbours(_modal(text, audio, q_mod), _modal(text, audio, k_mod),
                                           db["neighbours"], progress)
        np.save(tmp / "text.npy", text, allow_pickle=False)
        if audio is not None:
            np.save(tmp / "audio.npy", audio, allow_pickle=False)
        np.save(tmp / "neighbours_ids.npy", n_ids, allow_pickle=False)
        np.save(tmp / "neighbours_scores.npy", n_scores, allow_pickle=False)
        index.save(tmp / "index")
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for i, item in enumerate(items):
                row = {"id": i, **{k: v for k, v in item.items() if k != "id"}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        save_config(cfg, tmp)
        report.version = version
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": version, "previous": previous,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "size": len(items), "key": db["key"],
            "index": {"name": cfg["retriever"]["name"], "dim": int(index.dim), "metric": index.metric},
            "text": {"encoder": cfg["text_encoder"], "dim": int(text.shape[1])},
            "audio": None if audio is None else {"encoder": cfg["audio_encoder"], "dim": int(audio.shape[1])},
            "neighbours": {"k": db["neighbours"], "modality": db["neighbour_modality"], "exact": True,
                           "self_excluded": True},
            "sample_rate": db["sample_rate"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        fsync_tree(tmp)
        _pause("written")
        os.rename(tmp, root / version)
        fsync_path(root)
        _pause("renamed")
        atomic_write_text(root / POINTER, version + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _clean_stale(root, keep={version, previous} - {None})
    return version


def _missing_dirs(root: Path) -> list[Path]:
    """The folders ``root.mkdir(parents=True)`` would create, deepest first."""
    out, p = [], root.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _undo_failed_build(root: Path, made: list[Path], had_lock: bool) -> None:
    """After a failed build: unless a database is live in ``root`` (it is never touched), remove the lock
    file this build created and the folders it created, when they are empty (nothing else was put there)."""
    try:
        with _Lock(root):
            if _current(root) is not None:
                return
            if not had_lock:
                (root / LOCK).unlink(missing_ok=True)
    except (ReaudioError, OSError):  # another build holds the lock (or the folder is gone): leave it all alone
        return
    for d in made:
        try:
            d.rmdir()
        except OSError:  # not empty (e.g. an interrupted version kept for the next build to clean): keep it
            break

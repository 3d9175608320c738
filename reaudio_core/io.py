"""Atomic and versioned writes: the one place that knows how to replace a file or a folder safely.

Contract of every writer here: a reader, or a process killed mid-write (kill -9, full disk, an
exception), sees either the previous content of the target or the complete new one, never a half;
on failure the temporary sibling is removed (after kill -9 it stays behind as a dot-file named
``.{name}.tmp-...`` that the owner may sweep). Temporary files live in the target's own folder so
the final ``os.replace`` is a rename within one filesystem.

* :func:`atomic_write` (a callback fills the temporary file), :func:`atomic_write_text`,
  :func:`atomic_save` (``torch.save``): one file.
* :func:`atomic_dir`: a whole folder (``save_pretrained`` of a component).
* :func:`replace_dir`: switch a finished temporary folder in for another (versioned data).
* :func:`fsync_path`, :func:`fsync_dir`, :func:`fsync_tree`: durability of what was written.
* :func:`check_writable`: that an output can be written, checked before any work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .registry import ReaudioError

__all__ = ["atomic_dir", "atomic_save", "atomic_write", "atomic_write_text", "check_writable", "fsync_dir", "fsync_path",
           "fsync_tree", "replace_dir", "temp_name"]


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder; an ``OSError`` propagates."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Best-effort fsync of a folder (after a rename in it); a filesystem that refuses is ignored."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included); an ``OSError`` propagates."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` used by the writers here: ``.{name}.tmp-{pid}-{thread}``
    (unique per process and thread, so concurrent writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path`` (``tmp`` is a str path without
    ``path``'s suffix, so pass the format explicitly to writers that guess it from the name), fsync
    it, then ``os.replace`` it over ``path`` and fsync the folder. Creates missing parent folders.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """:func:`atomic_write` of ``torch.save(obj)``."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, write)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the finished folder ``tmp`` (a sibling of ``final``) in place of ``final``: fsync its tree,
    move an existing ``final`` aside, rename ``tmp`` to ``final``, fsync the parent, then delete the old
    one. Between the two renames a kill leaves ``final`` missing and the old copy beside it as
    ``.{name}.old-{pid}``; callers that cannot accept that window write versioned folders and switch a
    pointer file with :func:`atomic_write_text` instead."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    moved = final.exists()
    if moved:
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a new temporary sibling folder of ``directory``; when the block ends without an error it
    replaces ``directory`` (:func:`replace_dir`); on an error it is deleted and ``directory`` is untouched.
    The folder gets a plain ``mkdir``'s permissions (the umask's), not ``mkdtemp``'s owner-only 0700."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path, what: str, folder: bool) -> None:
    """Raise :class:`ReaudioError` unless ``path`` can be written: a ``folder`` (or a file) that exists and is
    writable, or one that can be created (its nearest existing ancestor is a writable folder). Called before
    any work, so an unwritable output fails in a second, not after minutes of embedding or sampling."""
    p = Path(path).expanduser().absolute()
    if p.exists() and folder and not p.is_dir():
        raise ReaudioError(f"{what} {path} exists and is not a folder; choose a folder")
    if p.exists() and not folder and p.is_dir():
        raise ReaudioError(f"{what} {path} is a folder; give a file name")
    base = p if p.is_dir() else p.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ReaudioError(f"cannot write {what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK) or (p.is_file() and not os.access(p, os.W_OK)):
        raise ReaudioError(f"cannot write {what} {path}: {p if p.is_file() else base} is not writable "
                           "(permissions or a read-only file system); choose another location")
    try:  # root passes os.access everywhere: a real write finds read-only and pseudo file systems (/proc)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise ReaudioError(f"cannot write {what} {path}: {base} does not take new files ({exc.strerror or exc}); "
                           "choose another location") from None

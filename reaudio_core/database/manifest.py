"""Manifests: the CSV files a database is built from (:func:`read_manifest`), and merging dataset
CSVs into one (:func:`write_manifest`, ``reaudio manifest``).

Manifest
--------
A UTF-8 CSV with a header. Columns (case-insensitive; the first alias present wins):

* audio path: ``path`` | ``file`` | ``audio`` — relative to the CSV's folder, or absolute;
* caption: ``caption`` | ``caption_1`` — a Clotho-style file with ``caption_1..caption_5`` gives
  **one item per clip, with ``caption_1``** (the other captions are ignored);
* label (optional): ``label`` | ``category``.

ESC-50's ``metadata.csv`` and Clotho's ``captions.csv`` work as they are. Rows that cannot be
used (missing, unreadable, empty, silent or too-short audio; an empty caption; a caption or path
that is not valid UTF-8; a duplicate of an item already stored) are skipped and listed in the
report; they never stop the build. A manifest without a path or caption column is an error.
"""
from __future__ import annotations

import csv
import logging
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..registry import ReaudioError
from ..io import atomic_write_text

log = logging.getLogger("reaudio")

PATH_COLUMNS = ("path", "file", "audio")
CAPTION_COLUMNS = ("caption", "caption_1")
LABEL_COLUMNS = ("label", "category")


@dataclass
class _Row:
    manifest: str
    line: int
    file: str  #: as written in the manifest
    path: str  #: absolute
    caption: str
    label: str | None


def _bad_bytes(text: str) -> bytes | None:
    """The undecodable bytes of a cell read with ``surrogateescape``, or None when it is clean UTF-8."""
    bad = [ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF]
    return bytes(bad) if bad else None


def _pick(header: list[str], aliases: Sequence[str]) -> int | None:
    lowered = [h.strip().lower().lstrip("\ufeff") for h in header]
    for name in aliases:
        if name in lowered:
            return lowered.index(name)
    return None


def read_manifest(path: str | Path) -> tuple[list[_Row], list[dict], int]:
    """Parse one manifest: ``(usable rows, skipped rows, rows read)``. Missing columns are errors."""
    path = Path(path)
    if path.is_dir():
        raise ReaudioError(f"manifest {path} is a folder; give a CSV file (reaudio manifest writes one)")
    if not path.is_file():
        raise ReaudioError(f"manifest not found: {path}")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ReaudioError(f"manifest {path} is empty: it needs a header row with an audio path column "
                           f"({' | '.join(PATH_COLUMNS)}) and a caption column "
                           f"({' | '.join(CAPTION_COLUMNS)})") from None
    except csv.Error as exc:
        raise ReaudioError(f"manifest {path}: not a readable CSV ({exc})") from None
    if _bad_bytes(",".join(header)):
        raise ReaudioError(f"manifest {path}: the header is not valid UTF-8; save the file as UTF-8")
    i_path, i_cap, i_label = _pick(header, PATH_COLUMNS), _pick(header, CAPTION_COLUMNS), _pick(header, LABEL_COLUMNS)
    missing = [f"an audio path column ({' | '.join(PATH_COLUMNS)})" if i_path is None else None,
               f"a caption column ({' | '.join(CAPTION_COLUMNS)})" if i_cap is None else None]
    missing = [m for m in missing if m]
    if missing:
        raise ReaudioError(f"manifest {path} lacks {' and '.join(missing)}; its columns are: "
                           f"{', '.join(h.strip() for h in header) or '(none)'}")
    base = path.resolve().parent
    rows, skipped, n = [], [], 0
    line = 1
    try:
        for record in reader:
            line = reader.line_num
            if not any(c.strip() for c in record):
                continue  # blank line
            n += 1
            cell = lambda i: record[i].strip() if i is not None and i < len(record) else ""  # noqa: E731
            file, caption, label = cell(i_path), cell(i_cap), cell(i_label)
            skip = None
            if _bad_bytes(file) is not None:
                skip = f"path is not valid UTF-8 (bytes {_bad_bytes(file)!r}); save the manifest as UTF-8"
                file = file.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            elif not file:
                skip = "empty audio path"
            elif _bad_bytes(caption) is not None:
                skip = f"caption is not valid UTF-8 (bytes {_bad_bytes(caption)!r}); save the manifest as UTF-8"
            elif not caption:
                skip = "empty caption"
            if skip is None and _bad_bytes(label) is not None:
                label = label.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if skip:
                shown = caption.encode("utf-8", "surrogateescape").decode("utf-8", "replace") or None
                skipped.append({"manifest": str(path), "line": line, "path": file, "caption": shown, "reason": skip})
                continue
            p = Path(os.path.expanduser(file))
            full = p if p.is_absolute() else base / p
            rows.append(_Row(os.path.abspath(path), line, file, os.path.abspath(full), caption, label or None))
    except csv.Error as exc:
        raise ReaudioError(f"manifest {path}, line {line}: not a readable CSV ({exc})") from None
    return rows, skipped, n


def write_manifest(input_csvs: Sequence[str | Path], out_csv: str | Path) -> int:
    """Merge dataset CSVs (ESC-50 ``metadata.csv``, Clotho ``captions.csv``, other manifests) into one
    manifest ``path,caption,label`` with paths relative to ``out_csv``'s folder. Returns the row count.

    Rows a build would skip for their text (empty or non-UTF-8 caption/path) are left out and
    named on stderr; audio is not opened here (``reaudio index build`` checks it).
    """
    out = Path(out_csv)
    out_dir = out.resolve().parent
    rows: list[_Row] = []
    for src in input_csvs:
        good, bad, _ = read_manifest(src)
        rows += good
        for s in bad:
            log.warning("reaudio manifest: skipped %s:%s %s: %s", s["manifest"], s["line"], s["path"], s["reason"])
    if not rows:
        raise ReaudioError(f"no usable rows in {', '.join(map(str, input_csvs))}")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "caption", "label"])
    for r in rows:
        try:
            rel = os.path.relpath(r.path, out_dir)
        except ValueError:  # another drive (Windows)
            rel = r.path
        writer.writerow([rel, r.caption, r.label or ""])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.resolve(), buf.getvalue())
    return len(rows)

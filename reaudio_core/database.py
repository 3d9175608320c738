"""The retrieval database: text-audio pairs, their embeddings, an index and a neighbour table.

Build one with ``reaudio index build --manifest CSV --out DIR`` (:func:`build_database`),
extend it with ``reaudio index add`` (:func:`add_to_database`), query it with
``reaudio retrieve`` (:meth:`Database.retrieve`).

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

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import AudioProblem, load_audio
from .config import compose, load_config, save_config
from .registry import ReaudioError, closest, get_registry

log = logging.getLogger("reaudio")

FORMAT = "reaudio-db"
FORMAT_VERSION = 1
POINTER = "CURRENT"
LOCK = ".lock"
KEYS = ("text", "audio")
MODALITIES = ("text->text", "text->audio", "audio->audio")
PATH_COLUMNS = ("path", "file", "audio")
CAPTION_COLUMNS = ("caption", "caption_1")
LABEL_COLUMNS = ("label", "category")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_FEATURE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: testing hook: when set to a stage name ("batch", "written", "renamed") the writer prints
#: "reaudio-db: paused at STAGE" on stderr and sleeps there (the kill -9 tests use it)
PAUSE_ENV = "REAUDIO_DB_PAUSE_AT"


# -- report ------------------------------------------------------------------------------
@dataclass
class Report:
    """What one build or add did. Saved as ``report.json`` in the version it produced."""
    operation: str  #: "build" or "add"
    database: str
    version: str | None
    manifests: list[str]
    rows: int = 0  #: manifest rows read
    added: int = 0  #: items added by this operation
    total: int = 0  #: items in the database afterwards
    skipped: list[dict] = field(default_factory=list)  #: {manifest, line, path, caption, reason}
    seconds: float = 0.0
    key: str = "text"
    modality: str = "text->text"
    neighbours: int = 0
    text_encoder: str | None = None
    audio_encoder: str | None = None
    retriever: str | None = None
    dims: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, max_skipped: int = 20) -> str:
        verb = "built" if self.operation == "build" else "extended"
        if self.operation == "add" and self.added == 0:
            head = f"{self.database}: nothing added ({self.rows} rows read); database unchanged ({self.version})"
        else:
            head = (f"{verb} {self.database} ({self.version}): +{self.added} items, {self.total} in all, "
                    f"from {self.rows} rows in {len(self.manifests)} manifest(s); {len(self.skipped)} skipped; "
                    f"{self.seconds:.1f} s")
        lines = [head]
        if self.added or self.operation == "build":
            audio = f", audio_encoder {self.audio_encoder} ({self.dims.get('audio')}-d)" if self.audio_encoder else ""
            lines.append(f"  index: {self.retriever} over {self.key} embeddings; text_encoder {self.text_encoder} "
                         f"({self.dims.get('text')}-d){audio}; neighbour table: top-{self.neighbours} "
                         f"{self.modality}, self excluded")
        for s in self.skipped[:max_skipped]:
            lines.append(f"  skipped {Path(s['manifest']).name}:{s['line']} {s['path']}: {s['reason']}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped} more (all listed in report.json)")
        return "\n".join(lines)


class Neighbours(NamedTuple):
    """The neighbour table: for item i, ``ids[i]`` (best first) and their ``scores[i]``."""
    ids: np.ndarray  #: [N, K] int64, -1 = padding
    scores: np.ndarray  #: [N, K] float32, -inf = padding
    modality: str  #: "text->text" | "text->audio" | "audio->audio"


# -- small filesystem helpers ------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


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


# -- manifests ---------------------------------------------------------------------------
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
    _write_text_atomic(out.resolve(), buf.getvalue())
    return len(rows)


# -- components --------------------------------------------------------------------------
_COMPONENTS: dict[str, object] = {}


def audio_encoder_entry(cfg: dict) -> dict | None:
    """The audio encoder a database embeds clips with: the configured one, unless
    ``database.embed_audio`` is false and nothing (key, neighbour modality) needs audio embeddings."""
    db = cfg.get("database") or {}
    needs = db.get("key") == "audio" or "audio" in str(db.get("neighbour_modality", ""))
    return cfg.get("audio_encoder") if db.get("embed_audio", True) or needs else None


def _component(kind: str, entry: dict | None):
    """Build (once per process) the registered component an entry ``{name, params}`` names."""
    if entry is None:
        return None
    key = json.dumps([kind, entry], sort_keys=True, default=str)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = get_registry().create(kind, entry["name"], **(entry.get("params") or {}))
    return _COMPONENTS[key]


def _refuse_untrained(cfg: dict, audio_enc) -> None:
    """A database is never embedded by an encoder that says it is untrained (``untrained = True``, e.g.
    ``vae-latent`` without weights): its vectors would be random projections, and neighbours chosen by them
    meaningless. (Random weights asked for explicitly, such as ``random_init: true``, are not flagged.)"""
    if getattr(audio_enc, "untrained", False):
        name = cfg["audio_encoder"]["name"]
        raise ReaudioError(f"audio_encoder {name!r} has no trained weights, and a database would store its random "
                           f"embeddings: give them (audio_encoder.params.weights=DIR for {name}), or embed no audio "
                           "(database.embed_audio=false with database.key=text and neighbour_modality=text->text)")


def _describe(entry: dict | None) -> str | None:
    return None if entry is None else entry["name"]


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _check_settings(cfg: dict) -> dict:
    db = cfg["database"]
    if db["key"] not in KEYS:
        raise ReaudioError(f"database.key must be one of {', '.join(KEYS)}, got {db['key']!r}")
    if db["neighbour_modality"] not in MODALITIES:
        raise ReaudioError(f"database.neighbour_modality must be one of {', '.join(MODALITIES)}, got "
                           f"{db['neighbour_modality']!r}. {closest(str(db['neighbour_modality']), MODALITIES)}")
    if not isinstance(db["neighbours"], int) or db["neighbours"] < 0:
        raise ReaudioError(f"database.neighbours must be an integer >= 0, got {db['neighbours']!r}")
    if not isinstance(db["batch_size"], int) or db["batch_size"] < 1:
        raise ReaudioError(f"database.batch_size must be an integer >= 1, got {db['batch_size']!r}")
    needs_audio = db["key"] == "audio" or "audio" in db["neighbour_modality"]
    if needs_audio and cfg.get("audio_encoder") is None:
        what = ("database.key=audio" if db["key"] == "audio"
                else f"database.neighbour_modality={db['neighbour_modality']}")
        names = get_registry().names("audio_encoder")
        raise ReaudioError(f"{what} needs audio embeddings, but no audio_encoder is configured; add one "
                           f"(e.g. audio_encoder={names[0] if names else 'clap'}; available: "
                           f"{', '.join(names) or 'none'}) or use key=text and neighbour_modality=text->text")
    return db


# -- the database ------------------------------------------------------------------------
class Database:
    """A built database, opened read-only at its live version. ``Database.open(DIR)``."""

    def __init__(self, root: Path, version: str, meta: dict, config: dict, items: list[dict],
                 index, text_encoder=None):
        self.root = root
        self.version = version
        self.version_dir = root / version
        self.meta = meta
        self.config = config
        self.items = items
        self.index = index
        self._text_encoder = text_encoder
        self._neighbours: Neighbours | None = None
        self._embeddings: dict[str, np.ndarray] = {}

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, text_encoder=None) -> "Database":
        """Open the live version of ``directory``.

        ``text_encoder``: what the caller will query with. A TextEncoder instance is checked for its
        embedding dimension against the index; a config entry (``{name, params}`` or a name) is checked
        against the encoder the database was built with. A mismatch is a :class:`ReaudioError`.
        """
        root = Path(directory)
        if not root.exists():
            raise ReaudioError(f"no database at {root}: build one with "
                               f"`reaudio index build --manifest CSV --out {root}`")
        if not root.is_dir():
            raise ReaudioError(f"{root} is a file; a database is the folder `reaudio index build --out DIR` writes")
        version = _current(root)
        if version is None:
            if _versions(root) or any(p.name.startswith(".tmp-") for p in root.iterdir()):
                raise ReaudioError(f"{root} holds no complete database: its first build was interrupted before it "
                                   "finished (no CURRENT pointer). Run `reaudio index build` again.")
            raise ReaudioError(f"{root} is not a reaudio database (no {POINTER} file); "
                               "build one with `reaudio index build --manifest CSV --out DIR`")
        vdir = root / version
        if not _VERSION_RE.match(version) or not (vdir / "meta.json").is_file():
            raise ReaudioError(f"{root} is damaged: {POINTER} names '{version}', which is missing or incomplete. "
                               "Rebuild it with `reaudio index build`.")
        meta = _read_json(vdir / "meta.json")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
            raise ReaudioError(f"{vdir / 'meta.json'} was written by an unknown or newer format "
                               f"({meta.get('format') if isinstance(meta, dict) else type(meta).__name__} "
                               f"v{meta.get('format_version') if isinstance(meta, dict) else '?'}); this reaudio "
                               f"reads {FORMAT} v{FORMAT_VERSION}. Rebuild it with `reaudio index build`.")
        missing = [k for k in ("size", "key", "index", "text", "neighbours") if k not in meta]
        if missing:
            raise ReaudioError(f"{vdir / 'meta.json'} lacks {', '.join(missing)}; the database is damaged: rebuild it "
                               "with `reaudio index build`")
        try:
            config = load_config(vdir)
            if not all(isinstance(config.get(slot), dict) for slot in ("text_encoder", "retriever", "database")):
                raise ReaudioError(f"{vdir / 'config.yaml'}: not a database configuration (no text_encoder, "
                                   "retriever and database sections)")
        except ReaudioError as exc:
            raise ReaudioError(f"{exc}; the database is damaged: rebuild it with `reaudio index build`") from None
        items = _read_json(vdir / "items.jsonl", lines=True)
        index = cls._load_index(vdir, meta)
        n = meta["size"]
        if len(items) != n or len(index) != n:
            raise ReaudioError(f"{vdir} is inconsistent: meta says {n} items, items.jsonl has {len(items)}, "
                               f"the index {len(index)}. Rebuild it with `reaudio index build`.")
        if index.dim != meta["index"]["dim"]:
            raise ReaudioError(f"{vdir}: the index holds {index.dim}-d vectors, meta.json says {meta['index']['dim']}")
        db = cls(root, version, meta, config, items, index)
        if text_encoder is not None:
            db.check_query_encoder(text_encoder)
        return db

    @staticmethod
    def _load_index(vdir: Path, meta: dict):
        name = meta["index"]["name"]
        spec = get_registry().spec("retriever", name)
        try:
            return spec.cls.load(vdir / "index")
        except (OSError, ValueError, RuntimeError) as exc:
            raise ReaudioError(f"cannot load the {name} index in {vdir / 'index'}: {exc}") from None

    def check_query_encoder(self, encoder) -> None:
        """Raise :class:`ReaudioError` unless ``encoder`` can query this database (see :meth:`open`)."""
        built = self.config.get("text_encoder")
        if isinstance(encoder, (str, dict)):
            entry = {"name": encoder} if isinstance(encoder, str) else encoder
            params = entry.get("params")
            if entry.get("name") != built["name"] or (params is not None and params != built["params"]):
                raise ReaudioError(
                    f"{self.root} was embedded with text_encoder {built['name']!r} {built['params']}; the configured "
                    f"query encoder is {entry.get('name')!r} {params or ''}. Rebuild the database with that encoder "
                    "or query with the database's own.")
            return
        dim = getattr(encoder, "dim", None)
        if dim != self.dim:
            raise ReaudioError(
                f"embedding dimension mismatch: {self.root} holds {self.dim}-d {self.key} embeddings "
                f"(text_encoder {built['name']!r}, {self.meta['text']['dim']}-d), the query encoder "
                f"{type(encoder).__name__} gives {dim}-d vectors. Rebuild the database with the query encoder "
                f"(`reaudio index build ... text_encoder=NAME`) or query with {built['name']!r}.")

    # -- what it holds --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"Database({str(self.root)!r}, {self.version}, {len(self)} items, {self.key} index "
                f"{self.meta['index']['name']} {self.dim}-d)")

    @property
    def key(self) -> str:
        """Which embeddings the index holds: "text" or "audio"."""
        return self.meta["key"]

    @property
    def dim(self) -> int:
        """Dimension of the vectors in the index (the query dimension)."""
        return self.meta["index"]["dim"]

    def modalities(self) -> list[str]:
        return [m for m in KEYS if self.meta.get(m)]

    def embeddings(self, modality: str = "text") -> np.ndarray:
        """``[N, d]`` float32 (read-only, memory-mapped) embeddings of ``modality`` ("text" | "audio")."""
        if modality not in KEYS:
            raise ReaudioError(f"modality must be one of {', '.join(KEYS)}, got {modality!r}")
        if not self.meta.get(modality):
            raise ReaudioError(f"{self.root} has no {modality} embeddings: it was built without an "
                               f"{modality}_encoder (configure one and rebuild)")
        if modality not in self._embeddings:
            self._embeddings[modality] = np.load(self.version_dir / f"{modality}.npy", mmap_mode="r",
                                                 allow_pickle=False)
        return self._embeddings[modality]

    @property
    def neighbours(self) -> Neighbours:
        """Top-K neighbours of every item (the item itself excluded), exact, best first."""
        if self._neighbours is None:
            ids = np.load(self.version_dir / "neighbours_ids.npy", allow_pickle=False)
            scores = np.load(self.version_dir / "neighbours_scores.npy", allow_pickle=False)
            self._neighbours = Neighbours(ids, scores, self.meta["neighbours"]["modality"])
        return self._neighbours

    def report(self) -> dict:
        """The saved report of the build or add that produced this version."""
        return _read_json(self.version_dir / "report.json")

    # -- querying ---------------------------------------------------------------------------
    @property
    def text_encoder(self):
        """The text encoder the database was built with (rebuilt from its saved configuration)."""
        if self._text_encoder is None:
            enc = _component("text_encoder", self.config["text_encoder"])
            self.check_query_encoder(enc)
            self._text_encoder = enc
        return self._text_encoder

    def search(self, query_vectors, k: int, exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each of ``query_vectors`` ``[Q, dim]`` (L2-normalised).

        ``exclude_ids``: per query, an id or a collection of ids never to return (e.g. the training
        item itself); -1/None = nothing. Returns ``(scores [Q, k] float32, ids [Q, k] int64)``, best
        first, padded with -inf / -1 when fewer items qualify.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ReaudioError(f"k must be an integer >= 1, got {k!r}")
        q = _as_numpy(query_vectors)
        if not q.flags.writeable:  # e.g. a row of the memory-mapped embeddings
            q = q.copy()
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ReaudioError(f"query vectors of shape {tuple(q.shape)} do not fit {self.root}: it holds "
                               f"{self.dim}-d {self.key} embeddings (text_encoder "
                               f"{self.config['text_encoder']['name']!r}); rebuild it with your encoder")
        if exclude_ids is None:
            return self.index.search(q, int(k))
        if len(exclude_ids) != len(q):
            raise ReaudioError(f"exclude_ids has {len(exclude_ids)} entries for {len(q)} queries")
        excl = [set() if e is None else {int(e)} if np.isscalar(e) else {int(x) for x in e} for e in exclude_ids]
        extra = max(len(e) for e in excl) if excl else 0
        scores, ids = self.index.search(q, int(min(k + extra, max(len(self), 1))))
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            keep = [(s, i) for s, i in zip(scores[r], ids[r]) if i >= 0 and int(i) not in excl[r]][:k]
            for c, (s, i) in enumerate(keep):
                out_s[r, c], out_i[r, c] = s, i
        return out_s, out_i

    def retrieve(self, prompt: str, k: int = 5) -> list[dict]:
        """The ``k`` nearest items to a text prompt: dicts with caption, path, label, score, id (and
        file, duration), best first."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ReaudioError(f"empty prompt {prompt!r}: describe the sound to look for")
        if not isinstance(k, int) or k < 1:
            raise ReaudioError(f"k must be an integer >= 1, got {k!r}")
        query = self.text_encoder.embed([" ".join(prompt.split())])
        scores, ids = self.search(query, min(k, len(self)))
        return [{**self.items[i], "id": int(i), "score": float(s)} for s, i in zip(scores[0], ids[0]) if i >= 0]

    # -- cached per-item features --------------------------------------------------------------
    def features(self, name: str) -> dict[str, np.ndarray] | None:
        """Arrays saved with :meth:`save_features` under ``name`` (memory-mapped, row i = item i), or
        None when there are none (never cached, or dropped by an ``add``)."""
        d = self.version_dir / "features" / name
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        meta = _read_json(meta_path)
        if meta.get("size") != len(self):
            return None
        return {k: np.load(d / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in meta["arrays"]}

    def feature_names(self) -> list[str]:
        d = self.version_dir / "features"
        return sorted(p.name for p in d.iterdir()
                      if not p.name.startswith(".") and (p / "meta.json").is_file()) if d.is_dir() else []

    def save_features(self, name: str, arrays, info: dict | None = None) -> None:
        """Cache per-item arrays (e.g. caption states and masks of a caption encoder) under ``name``.

        ``arrays``: one array or a dict of arrays, each with first dimension ``len(db)`` (row i = item i).
        Written atomically into the live version; replaces an earlier cache of the same name.
        ``reaudio index add`` does not carry caches over (new items would lack rows): recompute them.
        """
        if not isinstance(name, str) or not _FEATURE_NAME_RE.match(name):
            raise ReaudioError(f"feature name {name!r}: use letters, digits and . _ + -")
        if not isinstance(arrays, dict):
            arrays = {"data": arrays}
        clean = {}
        for key, a in arrays.items():
            if not _FEATURE_NAME_RE.match(str(key)):
                raise ReaudioError(f"feature array name {key!r}: use letters, digits and . _ + -")
            a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
            if a.ndim < 1 or len(a) != len(self):
                raise ReaudioError(f"feature array '{key}' has shape {a.shape}; "
                                   f"it needs one row per item ({len(self)})")
            clean[str(key)] = np.ascontiguousarray(a)
        base = self.version_dir / "features"
        base.mkdir(exist_ok=True)
        tmp = base / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key, a in clean.items():
            np.save(tmp / f"{key}.npy", a, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({"size": len(self), "arrays": sorted(clean),
                                                   "shapes": {k: list(a.shape) for k, a in clean.items()},
                                                   "info": info or {}, "created": time.time()}, indent=2))
        _fsync_tree(tmp)
        final = base / name
        old = base / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(base)
        shutil.rmtree(old, ignore_errors=True)


# -- building ----------------------------------------------------------------------------
def _embed_rows(rows: list[_Row], cfg: dict, text_enc, audio_enc, seen: dict, progress: bool, desc: str,
                captions: dict[str, np.ndarray] | None = None):
    """Load, check and embed ``rows`` in batches; returns (items, text [n, d], audio [n, d] | None, skipped).

    ``seen``: (path, caption) -> description of items already taken (duplicates are skipped).
    ``captions``: caption -> embedding already computed; each distinct caption is embedded once
    (ESC-50 has 50 distinct captions for 400 clips; AudioCaps repeats many word for word), which
    also gives identical captions bit-identical vectors.
    """
    db = cfg["database"]
    items, texts, audios, skipped = [], [], [], []
    captions = {} if captions is None else captions

    def load(row: _Row):
        try:
            return load_audio(row.path, sample_rate=db["sample_rate"], min_duration=db["min_duration"],
                              silence_db=db["silence_db"])
        except AudioProblem as exc:
            return exc
        except Exception as exc:  # never let one clip stop the build
            return AudioProblem(f"{type(exc).__name__}: {exc}")

    bar = tqdm(total=len(rows), desc=desc, unit="clip", disable=not progress)
    workers = max(1, min(4, os.cpu_count() or 1))
    paused = False
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(rows), db["batch_size"]):
            batch = rows[start:start + db["batch_size"]]
            fresh = []
            for row in batch:
                dup = seen.get((row.path, row.caption))
                if dup is not None:
                    skipped.append({"manifest": row.manifest, "line": row.line, "path": row.file,
                                    "caption": row.caption, "reason": f"duplicate of {dup} (same audio and caption)"})
                else:
                    seen[(row.path, row.caption)] = f"{Path(row.manifest).name}:{row.line}"
                    fresh.append(row)
            ok_rows, waves = [], []
            for row, wav in zip(fresh, pool.map(load, fresh)):
                if isinstance(wav, AudioProblem):
                    seen.pop((row.path, row.caption), None)
                    skipped.append({"manifest": row.manifest, "line": row.line, "path": row.file,
                                    "caption": row.caption, "reason": str(wav)})
                else:
                    ok_rows.append(row)
                    waves.append(wav)
            if ok_rows:
                todo = list(dict.fromkeys(r.caption for r in ok_rows if r.caption not in captions))
                if todo:
                    t = _as_numpy(text_enc.embed(todo))
                    if t.shape != (len(todo), text_enc.dim) or not np.isfinite(t).all():
                        raise ReaudioError(f"text_encoder {cfg['text_encoder']['name']!r} returned {t.shape} "
                                           f"(finite: {np.isfinite(t).all()}) for {len(todo)} captions")
                    captions.update(zip(todo, t))
                texts.append(np.stack([captions[r.caption] for r in ok_rows]))
                if audio_enc is not None:
                    a = _as_numpy(audio_enc.embed(waves))
                    if a.shape != (len(ok_rows), audio_enc.dim) or not np.isfinite(a).all():
                        raise ReaudioError(f"audio_encoder {cfg['audio_encoder']['name']!r} returned {a.shape} "
                                           f"(finite: {np.isfinite(a).all()}) for {len(ok_rows)} clips")
                    audios.append(a)
                for row, wav in zip(ok_rows, waves):
                    items.append({"path": row.path, "file": row.file, "caption": row.caption, "label": row.label,
                                  "duration": round(len(wav) / db["sample_rate"], 4), "manifest": row.manifest})
            bar.update(len(batch))
            if not paused:
                paused = True
                _pause("batch")
    bar.close()
    d_text = text_enc.dim
    text = np.concatenate(texts) if texts else np.zeros((0, d_text), np.float32)
    audio = None
    if audio_enc is not None:
        audio = np.concatenate(audios) if audios else np.zeros((0, audio_enc.dim), np.float32)
    return items, text, audio, skipped


def exact_neighbours(queries: np.ndarray, keys: np.ndarray, k: int,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``keys`` for every row of ``queries`` (row i is item i), item i itself
    excluded (by id, so an identical duplicate still counts as a neighbour). Ties: lower id first.
    Returns ``(ids [N, k] int64, scores [N, k] float32)`` padded with -1 / -inf."""
    n = len(queries)
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    kk = min(k, len(keys) - 1)
    if kk <= 0 or n == 0:
        return ids, scores
    kt = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))
    chunk = int(max(1, min(1024, (64 << 20) // max(len(keys), 1))))
    with torch.inference_mode():
        for s in tqdm(range(0, n, chunk), desc="neighbours", unit="chunk", disable=not progress, leave=False):
            q = torch.from_numpy(np.ascontiguousarray(queries[s:s + chunk], dtype=np.float32))
            sim = q @ kt.T
            rows = torch.arange(len(q))
            sim[rows, rows + s] = -torch.inf
            top, idx = torch.topk(sim, kk, dim=1)
            top, idx = top.numpy(), idx.numpy()
            order = np.lexsort((idx, -top), axis=1)
            ids[s:s + len(q), :kk] = np.take_along_axis(idx, order, 1)
            scores[s:s + len(q), :kk] = np.take_along_axis(top, order, 1)
    return ids, scores


def _modal(text: np.ndarray, audio: np.ndarray | None, which: str) -> np.ndarray:
    return text if which == "text" else audio


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
        _fsync_tree(tmp)
        _pause("written")
        os.rename(tmp, root / version)
        _fsync_path(root)
        _pause("renamed")
        _write_text_atomic(root / POINTER, version + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _clean_stale(root, keep={version, previous} - {None})
    return version


def build_database(manifests: Sequence[str | Path], out: str | Path, cfg: dict, progress: bool = True,
                   embedded: tuple | None = None) -> Report:
    """Build a database in ``out`` from one or more manifests with the resolved configuration ``cfg``.

    ``embedded``: ``(items, text, audio, skipped)`` already computed for the manifests' rows, as
    :func:`_embed_rows` returns them (the distributed build, :mod:`reaudio_core.distributed`).

    An existing database in ``out`` stays live until the new one is complete (then replaces it).
    """
    t0 = time.time()
    preset = cfg.get("preset")
    cfg = compose(None, base={k: v for k, v in cfg.items() if k != "preset"})  # validate, fill defaults
    cfg["preset"] = preset
    if cfg.get("text_encoder") is None:
        raise ReaudioError("a database needs a text_encoder (e.g. text_encoder=minilm)")
    if cfg.get("retriever") is None:
        raise ReaudioError("a database needs a retriever (e.g. retriever=faiss)")
    db = _check_settings(cfg)
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    rows, skipped, n_rows = [], [], 0
    for m in manifests:
        r, s, n = read_manifest(m)
        rows, skipped, n_rows = rows + r, skipped + s, n_rows + n
    root = Path(out)
    _check_out_dir(root)
    text_enc = _component("text_encoder", cfg["text_encoder"])
    audio_enc = _component("audio_encoder", audio_encoder_entry(cfg))
    _refuse_untrained(cfg, audio_enc)
    if db["key"] == "audio" and audio_enc.dim != text_enc.dim:
        raise ReaudioError(f"database.key=audio: prompts are embedded by text_encoder {cfg['text_encoder']['name']!r} "
                           f"({text_enc.dim}-d) and must share a space with audio_encoder "
                           f"{cfg['audio_encoder']['name']!r} ({audio_enc.dim}-d); use a joint model such as clap")
    if db["neighbour_modality"] == "text->audio" and audio_enc.dim != text_enc.dim:
        raise ReaudioError(f"neighbour_modality text->audio needs a joint text-audio space; text_encoder is "
                           f"{text_enc.dim}-d, audio_encoder {audio_enc.dim}-d")
    index = get_registry().create("retriever", cfg["retriever"]["name"], **cfg["retriever"]["params"])
    made = _missing_dirs(root)
    had_lock = (root / LOCK).exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = _build_locked(root, cfg, db, rows, skipped, n_rows, manifests, text_enc, audio_enc, index,
                               embedded, progress, t0)
    except BaseException:
        _undo_failed_build(root, made, had_lock)
        raise
    report.seconds = time.time() - t0
    return report


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


def _build_locked(root, cfg, db, rows, skipped, n_rows, manifests, text_enc, audio_enc, index, embedded,
                  progress, t0) -> Report:
    with _Lock(root):
        previous = _current(root)
        _clean_stale(root, keep={previous} - {None})
        items, text, audio, more = (embedded if embedded is not None else
                                    _embed_rows(rows, cfg, text_enc, audio_enc, {}, progress, "embedding"))
        skipped += more
        report = _report("build", root, None, manifests, n_rows, cfg, text_enc, audio_enc, skipped)
        if not items:
            reasons = "; ".join(f"{Path(s['manifest']).name}:{s['line']} {s['reason']}" for s in skipped[:5])
            raise ReaudioError(f"no usable items: all {n_rows} manifest rows were skipped ({reasons}"
                               f"{' ...' if len(skipped) > 5 else ''}); nothing was written")
        index.add(_modal(text, audio, db["key"]))
        report.added = report.total = len(items)
        report.seconds = time.time() - t0
        _write_version(root, cfg, items, text, audio, index, report, progress, previous)
    return report


def _report(op, root, version, manifests, n_rows, cfg, text_enc, audio_enc, skipped) -> Report:
    db = cfg["database"]
    dims = {"text": text_enc.dim, **({"audio": audio_enc.dim} if audio_enc is not None else {})}
    return Report(op, str(root), version, [str(m) for m in manifests], rows=n_rows, skipped=skipped, key=db["key"],
                  modality=db["neighbour_modality"], neighbours=db["neighbours"],
                  text_encoder=_describe(cfg["text_encoder"]), audio_encoder=_describe(audio_encoder_entry(cfg)),
                  retriever=_describe(cfg["retriever"]), dims=dims)


def add_to_database(db_dir: str | Path, manifests: Sequence[str | Path], progress: bool = True) -> Report:
    """Embed the rows of ``manifests`` that are not in the database yet (same audio and caption) and
    write a new version: old embeddings are reused, the saved index is extended with the new vectors,
    the neighbour table is recomputed over everything. Cached features are not carried over."""
    t0 = time.time()
    root = Path(db_dir)
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    old = Database.open(root)
    cfg = old.config
    _check_settings(cfg)
    rows, skipped, n_rows = [], [], 0
    for m in manifests:
        r, s, n = read_manifest(m)
        rows, skipped, n_rows = rows + r, skipped + s, n_rows + n
    text_enc = _component("text_encoder", cfg["text_encoder"])
    audio_enc = _component("audio_encoder", audio_encoder_entry(cfg))
    _refuse_untrained(cfg, audio_enc)
    if text_enc.dim != old.meta["text"]["dim"]:
        raise ReaudioError(f"text_encoder {cfg['text_encoder']['name']!r} now gives {text_enc.dim}-d embeddings; "
                           f"{root} holds {old.meta['text']['dim']}-d ones. Rebuild with `reaudio index build`.")
    with _Lock(root):
        if _current(root) != old.version:
            raise ReaudioError(f"{root} changed while adding (another build?); run the add again")
        _clean_stale(root, keep={old.version} | ({old.meta.get("previous")} - {None}))
        seen = {(it["path"], it["caption"]): f"item {i}" for i, it in enumerate(old.items)}
        known = dict(zip((it["caption"] for it in old.items), np.asarray(old.embeddings("text"))))
        new_items, text, audio, more = _embed_rows(rows, cfg, text_enc, audio_enc, seen, progress, "adding", known)
        skipped += more
        report = _report("add", root, old.version, manifests, n_rows, cfg, text_enc, audio_enc, skipped)
        report.total = len(old)
        if not new_items:
            report.seconds = time.time() - t0
            return report
        all_text = np.concatenate([np.asarray(old.embeddings("text")), text])
        all_audio = None if audio is None else np.concatenate([np.asarray(old.embeddings("audio")), audio])
        index = old.index
        index.add(_modal(text, audio, old.key))
        report.added = len(new_items)
        report.total = len(old) + len(new_items)
        report.seconds = time.time() - t0
        _write_version(root, cfg, old.items + new_items, all_text, all_audio, index, report, progress, old.version)
    report.seconds = time.time() - t0
    return report

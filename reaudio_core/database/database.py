"""The :class:`Database` class: a built database opened read-only at its live version; search,
retrieve, embeddings, neighbour table and cached per-item features."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..registry import ReaudioError, get_registry
from .neighbours import Neighbours
from ..io import replace_dir
from .storage import FORMAT, FORMAT_VERSION, POINTER, _VERSION_RE, _current, _read_json, _versions

KEYS = ("text", "audio")
_FEATURE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# -- components --------------------------------------------------------------------------
_COMPONENTS: dict[str, object] = {}


def _component(kind: str, entry: dict | None):
    """Build (once per process) the registered component an entry ``{name, params}`` names."""
    if entry is None:
        return None
    key = json.dumps([kind, entry], sort_keys=True, default=str)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = get_registry().create(kind, entry["name"], **(entry.get("params") or {}))
    return _COMPONENTS[key]


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


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
        self.retriever_entry = config.get("retriever")  #: the retriever searched (see open)
        self._text_encoder = text_encoder
        self._neighbours: Neighbours | None = None
        self._embeddings: dict[str, np.ndarray] = {}

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, text_encoder=None, retriever=None) -> "Database":
        """Open the live version of ``directory``.

        ``text_encoder``: what the caller will query with. A TextEncoder instance is checked for its
        embedding dimension against the index; a config entry (``{name, params}`` or a name) is checked
        against the encoder the database was built with. A mismatch is a :class:`ReaudioError`.

        The database decides its retriever: the one it was built with. ``retriever``: changes asked of it,
        ``{name, params}`` (either may be absent) or a name. A search-time parameter (``ef_search``,
        ``nprobe``, ``threads``) is applied; another retriever or a build-time parameter (index layout,
        ``m``, ``nlist``, ...) is a :class:`ReaudioError` giving the ``reaudio index build`` command that makes
        a database with it. :attr:`retriever_entry` is the retriever searched: ``{name, params}`` as saved in
        the database's ``config.yaml``, with the applied changes.
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
        change = {"name": retriever} if isinstance(retriever, str) else dict(retriever or {})
        index = cls._load_index(vdir, meta, change, lambda: _rebuild_hint(items, change, meta["index"]["name"]))
        n = meta["size"]
        if len(items) != n or len(index) != n:
            raise ReaudioError(f"{vdir} is inconsistent: meta says {n} items, items.jsonl has {len(items)}, "
                               f"the index {len(index)}. Rebuild it with `reaudio index build`.")
        if index.dim != meta["index"]["dim"]:
            raise ReaudioError(f"{vdir}: the index holds {index.dim}-d vectors, meta.json says {meta['index']['dim']}")
        db = cls(root, version, meta, config, items, index)
        saved = config.get("retriever") or {}
        db.retriever_entry = {"name": meta["index"]["name"],
                              "params": {**(saved.get("params") or {}), **(change.get("params") or {})}}
        if text_encoder is not None:
            db.check_query_encoder(text_encoder)
        return db

    @staticmethod
    def _load_index(vdir: Path, meta: dict, change: dict | None = None, hint=None):
        name = meta["index"]["name"]
        change = change or {}
        if change.get("name") not in (None, name):
            raise ReaudioError(f"{vdir.parent} was built with the {name} retriever and cannot be searched with "
                               f"retriever={change['name']}; build a database for it: {hint()}")
        spec = get_registry().spec("retriever", name)
        params = dict(change.get("params") or {})
        try:
            return get_registry().wrap("retriever", name, spec.cls.load(vdir / "index", **params))
        except (OSError, ValueError, RuntimeError, ReaudioError) as exc:
            if params and not isinstance(exc, OSError):
                raise ReaudioError(f"{vdir.parent}: retriever {params} cannot be applied to its {name} index ({exc}); "
                                   f"only search-time parameters change after a build. Build a database with them: "
                                   f"{hint()}") from None
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
        replace_dir(tmp, base / name)


def _rebuild_hint(items: list[dict], change: dict, name: str) -> str:
    """The ``reaudio index build`` command that makes a database of ``items``' manifests with ``change``."""
    manifests = list(dict.fromkeys(str(it.get("manifest")) for it in items if it.get("manifest")))
    args = [f"--manifest {m}" for m in manifests] or ["--manifest CSV"]
    sets = [f"retriever={change.get('name') or name}"]
    sets += [f"retriever.params.{k}={json.dumps(v) if not isinstance(v, str) else v}"
             for k, v in (change.get("params") or {}).items()]
    return f"`reaudio index build {' '.join(args)} --out NEWDB {' '.join(sets)}`"

"""Building a database (:func:`build_database`, ``reaudio index build``) and extending one
(:func:`add_to_database`, ``reaudio index add``): read manifests, load and embed clips, index them,
write a new version."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..audio import AudioProblem, load_audio
from ..config import compose
from ..registry import ReaudioError, closest, get_registry
from .database import KEYS, Database, _as_numpy, _component
from .manifest import _Row, read_manifest
from .neighbours import MODALITIES, _modal
from .storage import (LOCK, _check_out_dir, _clean_stale, _current, _Lock, _missing_dirs, _pause,
                      _undo_failed_build, _write_version)


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


# -- components and settings -------------------------------------------------------------
def audio_encoder_entry(cfg: dict) -> dict | None:
    """The audio encoder a database embeds clips with: the configured one, unless
    ``database.embed_audio`` is false and nothing (key, neighbour modality) needs audio embeddings."""
    db = cfg.get("database") or {}
    needs = db.get("key") == "audio" or "audio" in str(db.get("neighbour_modality", ""))
    return cfg.get("audio_encoder") if db.get("embed_audio", True) or needs else None


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

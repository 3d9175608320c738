"""The plan of an experiment: variants x seeds, the trainings they need, the training subset,
the prompts and the reference clips (:func:`build_plan`)."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import ReaudioError, closest
from .spec import RETRIEVALS, VARIANT_KEYS, _hash, _listify


# -- the plan -------------------------------------------------------------------------------------------
@dataclass
class Training:
    key: str
    dir: Path
    cfg: dict
    slug: str

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def done(self) -> bool:
        return (self.final / "config.yaml").is_file()


@dataclass
class Variant:
    name: str
    group: str
    retrieval: str
    k: int
    model: str | None = None        # a pretrained pipeline directory (no training)
    preset: str | None = None
    config: list = field(default_factory=list)
    overrides: list = field(default_factory=list)
    trainings: dict = field(default_factory=dict)  # seed -> Training

    @property
    def trained(self) -> bool:
        return self.model is None


@dataclass
class Prompt:
    name: str      # file stem of the generated clip (= its reference clip's, for KL pairs)
    text: str
    labels: list


@dataclass
class Plan:
    spec: dict
    out: Path
    variants: list
    trainings: dict           # key -> Training
    prepare: list             # [(cfg, out Path)]
    items: list               # database items (or manifest rows before the database exists)
    items_source: str
    subset_ids: list | None
    prompts: list
    reference: list           # [(name, path)] or a folder
    reference_dir: Path | None
    label_counts: dict
    label_note: str | None
    buckets: Any
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _items_from_manifest(manifest: str) -> list[dict]:
    from ..database import read_manifest
    out = []
    for m in _listify(manifest):
        rows, _, _ = read_manifest(m)
        out += [{"path": r.path, "file": r.file, "caption": r.caption, "label": r.label} for r in rows]
    return out


def _labels_of(items: list[dict]) -> list[str]:
    return sorted({it["label"] for it in items if it.get("label")})


def select_subset(items: list[dict], rule: dict | None) -> tuple[list[int] | None, dict]:
    """Database ids to train on and the per-label counts.

    ``rule``: ``{per_label: [8, 4, 2, 1, 0] | N | {label: N}, labels: [..] | null, seed: 0}``. A list is
    dealt over the labels in a seeded shuffled order (label i gets ``per_label[i % len]`` clips); labels
    outside ``labels`` get 0; within a label, which clips are taken is a seeded shuffle too.
    """
    if rule is None:
        return None, {}
    unknown = set(rule) - {"per_label", "labels", "seed"}
    if unknown:
        raise ReaudioError(f"subset: unknown key(s) {sorted(unknown)}; a subset has per_label, labels, seed")
    by_label: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.get("label"):
            by_label.setdefault(it["label"], []).append(i)
    if not by_label:
        raise ReaudioError("subset.per_label needs labelled items (a label / category column in the manifest)")
    rng = random.Random(int(rule.get("seed", 0)))
    chosen = sorted(by_label) if rule.get("labels") is None else list(rule["labels"])
    missing = [label for label in chosen if label not in by_label]
    if missing:
        raise ReaudioError(f"subset.labels: {missing[:5]} are not labels of the data. {closest(missing[0], by_label)}")
    per = rule.get("per_label")
    if isinstance(per, dict):
        counts = {str(label): int(n) for label, n in per.items()}
        bad = [label for label in counts if label not in by_label]
        if bad:
            raise ReaudioError(f"subset.per_label: {bad[:5]} are not labels of the data. {closest(bad[0], by_label)}")
    elif isinstance(per, int):
        counts = {label: per for label in chosen}
    elif isinstance(per, list) and per and all(isinstance(n, int) for n in per):
        order = list(chosen)
        rng.shuffle(order)
        counts = {label: per[i % len(per)] for i, label in enumerate(order)}
    else:
        raise ReaudioError(f"subset.per_label must be a list of counts, a count or a mapping label -> count; got {per!r}")
    ids = []
    for label in sorted(by_label):
        n = counts.get(label, 0)
        pool = list(by_label[label])
        if n < 0 or n > len(pool):
            raise ReaudioError(f"subset: label '{label}' has {len(pool)} clip(s), cannot take {n}")
        random.Random(f"{rule.get('seed', 0)}:{label}").shuffle(pool)
        ids += pool[:n]
    return sorted(ids), {label: counts.get(label, 0) for label in sorted(by_label)}


def _matcher(spec: dict):
    from ..longtail import AudioSetMatcher
    lt = spec["longtail"]
    if not lt.get("audioset"):
        raise ReaudioError("labels_from: audioset needs longtail.audioset: the folder with ontology.json "
                           "(e.g. ../shared/data/audioset)")
    return AudioSetMatcher.from_dir(lt["audioset"], lt.get("audioset_source") or "ontology")


def select_prompts(spec: dict, items: list[dict], subset_counts: dict, matcher=None) -> list[Prompt]:
    """One prompt per generated clip: per label from the database items, or rows of a CSV."""
    p = spec["prompts"]
    if p.get("csv"):
        from ..longtail import _csv_rows
        rows, cols = _csv_rows(p["csv"])

        def col(name, aliases):
            c = cols.get((name or "").lower()) or next((cols[a] for a in aliases if a in cols), None)
            if c is None:
                raise ReaudioError(f"prompts.csv {p['csv']}: no {name or '/'.join(aliases)} column; columns: "
                                   f"{', '.join(cols)}")
            return c
        ncol = col(p.get("name_column"), ("file", "name", "youtube_id", "audiocap_id"))
        ccol = col(p.get("caption_column"), ("caption", "prompt", "text", "caption_1"))
        lcol = col(p.get("label_column"), ()) if p.get("label_column") else None
        seen, out = set(), []
        for r in rows:
            name = Path((r.get(ncol) or "").strip()).stem
            text = (r.get(ccol) or "").strip()
            if not name or not text or (p.get("first_per_name", True) and name in seen):
                continue
            seen.add(name)
            if lcol:
                labels = [r[lcol].strip()] if (r.get(lcol) or "").strip() else []
            elif p.get("labels_from") == "audioset":
                labels = matcher.labels(text)
            else:
                labels = []
            out.append(Prompt(name, text, labels))
        if not out:
            raise ReaudioError(f"prompts.csv {p['csv']}: no row with a name and a caption")
        return out
    per = p.get("per_label")
    if not isinstance(per, int) or per < 1:
        raise ReaudioError(f"prompts.per_label must be a positive integer (or give prompts.csv), got {per!r}")
    labels = _labels_of(items)
    if not labels:
        raise ReaudioError("prompts.per_label needs labelled database items (label / category column)")
    want = p.get("labels", "all")
    if want == "subset":
        rule = spec.get("subset") or {}
        want = list(rule.get("labels") or labels)
    elif want == "all":
        want = labels
    missing = [label for label in _listify(want) if label not in labels]
    if missing:
        raise ReaudioError(f"prompts.labels: {missing[:5]} are not labels of the data. {closest(missing[0], labels)}")
    out = []
    for label in _listify(want):
        mine = [it for it in items if it.get("label") == label][:per]
        for it in mine:
            out.append(Prompt(Path(it["file"]).stem, it["caption"], [label]))
    names = [pr.name for pr in out]
    if len(set(names)) != len(names):
        raise ReaudioError("prompts: two prompt clips share a file name; names must be unique (they pair with the "
                           "reference clips for KL)")
    return out


def _expand_variants(spec: dict, base_k: int) -> list[Variant]:
    entries = spec["variants"]
    if isinstance(entries, dict):
        entries = [entries]
    if not entries:
        raise ReaudioError("variants: the experiment lists no variant (e.g. variants: [{retrieval: [none, audio+text], "
                           "k: [1, 3]}])")
    out: list[Variant] = []
    for e in entries:
        if not isinstance(e, dict):
            raise ReaudioError(f"variants: each entry is a mapping, got {e!r}")
        unknown = set(e) - VARIANT_KEYS
        if unknown:
            raise ReaudioError(f"variants: unknown key(s) {sorted(unknown)}. Known: {', '.join(sorted(VARIANT_KEYS))}")
        retrievals = _listify(e.get("retrieval", "audio+text"))
        ks = [int(k) for k in _listify(e.get("k"))] or [base_k]
        for r in retrievals:
            if r not in RETRIEVALS:
                raise ReaudioError(f"variants: retrieval '{r}' is not one of {', '.join(RETRIEVALS)}")
            for k in (ks if r != "none" else ks[:1]):
                if k < 1:
                    raise ReaudioError(f"variants: k must be >= 1, got {k}")
                default = "none" if r == "none" else f"{r}-k{k}"
                name = str(e["name"]).format(retrieval=r, k=k) if e.get("name") else default
                out.append(Variant(name=name, group=str(e.get("group") or r).format(retrieval=r, k=k), retrieval=r,
                                   k=int(spec["train_k"]) if r == "none" and isinstance(spec["train_k"], int) else k,
                                   model=e.get("model"), preset=e.get("preset"), config=_listify(e.get("config")),
                                   overrides=[str(o) for o in _listify(e.get("overrides"))]))
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ReaudioError(f"variants: names {dup} occur more than once; give each entry a distinct name")
    for v in out:
        if any(c in v.name for c in "/\\") or v.name.startswith("."):
            raise ReaudioError(f"variant name {v.name!r}: no slashes, no leading dot (it names a folder)")
    return out


def _training_cfg(spec: dict, v: Variant, seed: int, db_dir: Path, ids: list | None) -> dict:
    from ..config import compose
    cfg = compose(v.preset, [*spec["base"], *v.config], [*spec["overrides"], *v.overrides])
    t = cfg["training"]
    if t["stage"] != "ldm":
        raise ReaudioError(f"the base training config of variant {v.name} has training.stage={t['stage']}; an "
                           "experiment trains the LDM (training.stage: ldm)")
    cfg["generation"]["retrieval"] = v.retrieval
    cfg["generation"]["k"] = v.k if spec["train_k"] == "per-variant" else int(spec["train_k"])
    cfg["generation"]["database"] = str(db_dir)
    cfg["generation"]["model"] = None
    t["database"] = str(db_dir)
    t["include_ids"] = None if ids is None else list(ids)
    t["out"] = None
    if spec["train_per_seed"]:
        t["seed"] = int(seed)
    return cfg


def _training_key(cfg: dict) -> str:
    c = copy.deepcopy(cfg)
    for key in ("out", "threads", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"):
        c["training"].pop(key, None)
    return _hash(c)


def build_plan(spec: dict) -> Plan:
    """Everything the run will do, from files only (no model is built, nothing is computed)."""
    from ..config import compose
    from ..longtail import Buckets
    out = Path(spec["out"])
    problems: list[str] = []
    notes: list[str] = []
    # data ----------------------------------------------------------------------------------------------
    data = spec["data"]
    db_dir = Path(data["database"]).expanduser().resolve() if data.get("database") else out / "db"
    items, source = [], ""
    if (db_dir / "CURRENT").is_file():
        from ..database import Database
        db = Database.open(db_dir)
        items, source = db.items, f"database {db_dir} ({len(db)} items)"
    elif data.get("manifest"):
        try:
            items = _items_from_manifest(data["manifest"])
            source = f"manifest {', '.join(map(str, _listify(data['manifest'])))} ({len(items)} rows; database to build in {db_dir})"
            absent = [it["path"] for it in items if not Path(it["path"]).exists()]
            if absent:
                problems.append(f"{len(absent)} of {len(items)} audio files named by the manifest are missing "
                                f"(first: {absent[0]})")
        except ReaudioError as exc:
            problems.append(f"data.manifest: {exc}")
    elif data.get("database"):
        problems.append(f"data.database {db_dir} holds no database (build it with `reaudio index build`, or give "
                        "data.manifest to build it here)")
    else:
        problems.append("data: give data.manifest (CSV of the retrieval database's clips) or data.database (DIR)")
    # the grid ---------------------------------------------------------------------------------------------
    base_k = 3
    if spec["base"] or any(isinstance(e, dict) and e.get("model") is None for e in _listify(spec["variants"])):
        try:
            base_k = int(compose(None, spec["base"], spec["overrides"])["generation"]["k"])
        except ReaudioError as exc:
            problems.append(f"base config: {exc}")
    variants = _expand_variants(spec, base_k)
    ids, subset_counts = None, {}
    if items:
        try:
            ids, subset_counts = select_subset(items, spec["subset"])
        except ReaudioError as exc:
            problems.append(str(exc))
    elif spec["subset"] is not None:
        problems.append("subset: no data to select from")
    trainings: dict[str, Training] = {}
    for v in variants:
        if not v.trained:
            continue
        for seed in (spec["seeds"] if spec["train_per_seed"] else spec["seeds"][:1]):
            try:
                cfg = _training_cfg(spec, v, seed, db_dir, ids)
            except ReaudioError as exc:
                problems.append(f"variant {v.name}: {exc}")
                break
            key = _training_key(cfg)
            slug = f"{v.retrieval}-k{cfg['generation']['k']}" + (f"-seed{seed}" if spec["train_per_seed"] else "")
            tr = trainings.setdefault(key, Training(key, out / "train" / f"{slug}-{key[:8]}", cfg, slug))
            for s in (spec["seeds"] if not spec["train_per_seed"] else [seed]):
                v.trainings[s] = tr
    prepare = []
    for i, p in enumerate(_listify(spec["prepare"])):
        if not isinstance(p, dict) or "out" not in p or "config" not in p:
            problems.append(f"prepare[{i}]: needs config (file(s)) and out (directory)")
            continue
        try:
            prepare.append((compose(None, _listify(p["config"]), [str(o) for o in _listify(p.get("overrides"))]),
                            Path(p["out"]).expanduser().resolve()))
        except ReaudioError as exc:
            problems.append(f"prepare[{i}]: {exc}")
    # prompts, labels, reference --------------------------------------------------------------------------
    lt = spec["longtail"]
    matcher, label_note = None, None
    needs_matcher = spec["prompts"].get("labels_from") == "audioset" or (
        isinstance(lt.get("train_labels"), dict) and lt["train_labels"].get("labels_from") == "audioset")
    if needs_matcher:
        try:
            matcher = _matcher(spec)
            label_note = matcher.description
        except ReaudioError as exc:
            problems.append(str(exc))
    prompts: list[Prompt] = []
    if items or spec["prompts"].get("csv"):
        try:
            prompts = select_prompts(spec, items, subset_counts, matcher)
        except ReaudioError as exc:
            problems.append(str(exc))
    counts: dict = {}
    tl = lt.get("train_labels", "subset")
    if tl == "subset":
        if items:
            from ..longtail import count_labels
            chosen = range(len(items)) if ids is None else ids
            counts = {label: 0 for label in _labels_of(items)}  # every class, unseen ones with 0
            counts.update(count_labels([items[i].get("label")] for i in chosen))
    elif isinstance(tl, dict):
        from ..longtail import count_labels, labels_from_manifest
        try:
            counts = dict(count_labels(labels_from_manifest(
                tl["csv"], label_column=tl.get("label_column"), caption_column=tl.get("caption_column"),
                matcher=matcher if tl.get("labels_from") == "audioset" else None)))
        except (ReaudioError, KeyError) as exc:
            problems.append(f"longtail.train_labels: {exc}")
    elif tl is not None:
        problems.append(f"longtail.train_labels must be subset, null or {{csv, ...}}; got {tl!r}")
    try:
        buckets = Buckets(tuple(lt["buckets"]))
    except (ReaudioError, TypeError) as exc:
        problems.append(f"longtail.buckets: {exc}")
        buckets = Buckets()
    reference, ref_dir = [], None
    r = spec["reference"]
    if r.get("dir"):
        ref_dir = Path(r["dir"]).expanduser().resolve()
        if not ref_dir.is_dir():
            problems.append(f"reference.dir {ref_dir} does not exist (the reference clips, named like the prompts)")
        else:
            from ..evaluation import AUDIO_SUFFIXES
            found = {p.stem for p in ref_dir.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES}
            paired = sum(pr.name in found for pr in prompts)
            reference = sorted(found)
            if prompts and paired < len(prompts):
                problems.append(f"reference.dir {ref_dir}: {len(prompts) - paired} of {len(prompts)} prompts have no "
                                f"reference clip of the same name (e.g. {next(pr.name for pr in prompts if pr.name not in found)})")
    elif r.get("from") == "database":
        want = r.get("labels", "all")
        prompted = {label for pr in prompts for label in pr.labels}
        reference = [(Path(it["file"]).stem, it["path"]) for it in items
                     if want == "all" or (want == "prompted" and it.get("label") in prompted)]
        if want not in ("all", "prompted"):
            problems.append(f"reference.labels must be all or prompted, got {want!r}")
        ref_dir = out / "reference"
    else:
        problems.append("reference: give reference.dir (a folder of reference clips) or reference.from: database")
    plan = Plan(spec, out, variants, trainings, prepare, items, source, ids, prompts, reference, ref_dir, counts,
                label_note, buckets, problems, notes)
    plan.db_dir = db_dir  # type: ignore[attr-defined]
    return plan

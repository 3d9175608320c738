"""``reaudio experiment --config FILE``: train, generate and evaluate a grid of variants (the paper's
Table 1, Fig. 3 and Fig. 4 protocol), resumably.

One run, top to bottom (:func:`run_experiment`):

    experiment YAML -> plan (variants x seeds; which trainings they need)
        -> prepare (e.g. the VAE, reused when its final/ exists) -> retrieval database (OUT/db)
        -> training subset (long-tailed per-class counts -> training.include_ids)
        -> one LDM training per distinct training config (OUT/train/<slug>-<hash>/)
        -> generation per variant and seed (OUT/gen/<variant>/<seed>/<name>.wav)
        -> evaluation per cell (OUT/eval/<variant>/seed-<seed>.json; reaudio_core.evaluation)
        -> OUT/results.json, OUT/table.md, OUT/k_sweep.png, OUT/longtail-<score>.png

Every cell is keyed by a hash of everything it depends on; a rerun skips cells whose key matches
(trainings resume from their last checkpoint, generation keeps every clip already written, each
write is atomic), so an interrupted run loses at most the clip or training steps in flight.
``--dry-run`` checks the configuration, data files and weights and prints the plan without computing.

The experiment file format is documented in docs/experiments.md; shipped examples are in
configs/experiments/. Paths are relative to the working directory (run from the repository root, as
for ``reaudio train``); ``{out}`` in any string is replaced by the output directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .registry import ReaudioError, closest

RETRIEVALS = ("none", "audio", "text", "audio+text")
METRICS = (("fad", "FAD", False), ("kl", "KL", False), ("is", "IS", True), ("clap_score", "CLAP", True),
           ("top1", "top-1", True))
BUCKET_SCORES = (("kl", "KL", False), ("hit", "classifier top-1", True), ("clap_cosine", "CLAP cosine", True))

#: the experiment file's keys and their defaults (not component defaults: those live in registry.yaml)
DEFAULTS: dict[str, Any] = {
    "name": None,               # default: the file's stem
    "description": "",
    "out": None,                # output directory; default runs/experiments/<name> (or --out)
    "base": [],                 # training config file(s) of the trained variants (as `reaudio train --config`)
    "overrides": [],            # key=value applied to the base
    "prepare": [],              # trainings run first when OUT/final is missing: {config, out, overrides}
    "data": {"manifest": None, "database": None, "database_config": None},
    "subset": None,             # training subset rule (null = every database item)
    "prompts": {"per_label": 1, "labels": "all", "csv": None, "name_column": None, "caption_column": None,
                "label_column": None, "first_per_name": True, "labels_from": None},
    "reference": {"from": "database", "labels": "all", "dir": None},
    "variants": [],
    "train_k": "per-variant",   # per-variant: each k trains its own model; an int: one model per retrieval type
    "seeds": [0],
    "train_per_seed": False,    # true: every seed trains its own model (training.seed = seed)
    "training_procs": 1,        # >1: trainings run under torchrun with this many processes
    "generation": {},           # generation-section overrides used at generation time (steps, guidance, ...)
    "generate_batch": 10,       # prompts per pipeline call
    "evaluation": {"features": None, "classifier": None, "clap": "auto", "is_splits": None},
    "longtail": {"buckets": [0, 1, 11, 101, 1001], "multi_label": "min", "train_labels": "subset",
                 "audioset": None, "audioset_source": "ontology", "plot_k": None},
    "threads": 1,               # torch threads for generation and evaluation (training: training.threads)
    "device": "cpu",            # cpu | cuda | auto: where generation runs
    "requires": {"gpu": False},
}
VARIANT_KEYS = {"name", "group", "retrieval", "k", "model", "preset", "config", "overrides"}


# -- small helpers -------------------------------------------------------------------------------------
def _hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _listify(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _atomic_text(path: Path, text: str) -> None:
    from .database import _write_text_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, text)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _subst(value, out: str):
    if isinstance(value, str):
        return value.replace("{out}", out)
    if isinstance(value, list):
        return [_subst(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, out) for k, v in value.items()}
    return value


def _merge_defaults(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ReaudioError(f"unknown key '{where}{key}' in the experiment file. {closest(key, defaults)}")
        if isinstance(defaults[key], dict) and defaults[key] and isinstance(value, dict):
            out[key] = _merge_defaults(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotlist(section: str, values: dict) -> list[str]:
    import yaml
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n...") or text.endswith(" ..."):
            text = text.rsplit("...", 1)[0].strip()
        out.append(f"{section}.{key}={text}")
    return out


# -- loading --------------------------------------------------------------------------------------------
def load_experiment(path: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None) -> dict:
    """The experiment file with ``key=value`` overrides applied, defaults filled, ``{out}`` substituted."""
    import yaml
    from omegaconf import OmegaConf
    from .config import _load_file
    path = Path(path)
    data = _load_file(path)
    for item in overrides:
        if "=" not in item:
            raise ReaudioError(f"override '{item}' is not of the form key=value")
    if overrides:
        data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides))),
                                      resolve=True)
    spec = _merge_defaults(DEFAULTS, data, "")
    spec["name"] = spec["name"] or path.stem
    spec["config_file"] = str(path)
    spec["cli_overrides"] = list(overrides)
    spec["cli_out"] = str(out) if out else None
    out_dir = Path(out or spec["out"] or Path("runs") / "experiments" / spec["name"]).expanduser()
    spec["out"] = str(out_dir.resolve())
    for key in ("base", "overrides", "prepare", "data", "subset", "prompts", "reference", "variants", "generation",
                "longtail"):
        spec[key] = _subst(spec[key], spec["out"])
    spec["base"] = _listify(spec["base"])
    spec["overrides"] = [str(o) for o in _listify(spec["overrides"])]
    spec["seeds"] = [int(s) for s in _listify(spec["seeds"])]
    if not spec["seeds"]:
        raise ReaudioError("seeds: give at least one seed, e.g. seeds: [0, 1, 2]")
    if spec["train_k"] != "per-variant" and not (isinstance(spec["train_k"], int) and spec["train_k"] >= 1):
        raise ReaudioError(f"train_k must be 'per-variant' or a positive integer, got {spec['train_k']!r}")
    if spec["device"] not in ("cpu", "cuda", "auto"):
        raise ReaudioError(f"device must be cpu, cuda or auto, got {spec['device']!r}")
    if not isinstance(spec["generate_batch"], int) or spec["generate_batch"] < 1:
        raise ReaudioError(f"generate_batch must be a positive integer, got {spec['generate_batch']!r}")
    return spec


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
    from .database import read_manifest
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
    from .longtail import AudioSetMatcher
    lt = spec["longtail"]
    if not lt.get("audioset"):
        raise ReaudioError("labels_from: audioset needs longtail.audioset: the folder with ontology.json "
                           "(e.g. ../shared/data/audioset)")
    return AudioSetMatcher.from_dir(lt["audioset"], lt.get("audioset_source") or "ontology")


def select_prompts(spec: dict, items: list[dict], subset_counts: dict, matcher=None) -> list[Prompt]:
    """One prompt per generated clip: per label from the database items, or rows of a CSV."""
    p = spec["prompts"]
    if p.get("csv"):
        from .longtail import _csv_rows
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
    from .config import compose
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
    from .config import compose
    from .longtail import Buckets
    out = Path(spec["out"])
    problems: list[str] = []
    notes: list[str] = []
    # data ----------------------------------------------------------------------------------------------
    data = spec["data"]
    db_dir = Path(data["database"]).expanduser().resolve() if data.get("database") else out / "db"
    items, source = [], ""
    if (db_dir / "CURRENT").is_file():
        from .database import Database
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
            from .longtail import count_labels
            chosen = range(len(items)) if ids is None else ids
            counts = {label: 0 for label in _labels_of(items)}  # every class, unseen ones with 0
            counts.update(count_labels([items[i].get("label")] for i in chosen))
    elif isinstance(tl, dict):
        from .longtail import count_labels, labels_from_manifest
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
            from .evaluation import AUDIO_SUFFIXES
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


# -- checks (dry run) -----------------------------------------------------------------------------------
WEIGHT_PARAMS = ("checkpoint", "weights", "pretrained", "model_path")


def _weight_problem(value: str, produced: Sequence[Path]) -> str | None:
    """None when ``value`` (a component's weights parameter) is usable here; else what is missing."""
    from .pipeline import resolve_path
    try:
        p = resolve_path(str(value))  # a path, or pkg:PACKAGE/PATH (the offline preset's shipped weights)
    except ReaudioError as exc:
        return str(exc)
    if p.exists():
        return None
    full = p.resolve()
    if any(full == d or d in full.parents for d in produced):
        return None  # made by a prepare step or a training of this experiment
    text = str(value)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text.split("/")[0]).exists():
        try:  # a hub id: usable only from the local cache (no network here)
            from huggingface_hub import try_to_load_from_cache
            for fname in ("config.json", "model.safetensors", "open_clip_config.json"):
                hit = try_to_load_from_cache(text, fname)
                if isinstance(hit, str):
                    return None
        except Exception:
            pass
        return (f"'{text}' is neither a local path nor a model in the local Hugging Face cache (nothing is "
                "downloaded)")
    return f"{value} does not exist"


def _component_weights(cfg: dict) -> list[tuple[str, str]]:
    from .config import SLOTS
    out = []
    for slot in SLOTS:
        entry = cfg.get(slot)
        if not entry:
            continue
        for key in WEIGHT_PARAMS:
            value = (entry.get("params") or {}).get(key)
            if isinstance(value, str) and value:
                out.append((f"{slot}.params.{key}", value))
    return out


def _pipeline_slots(model: Path) -> list[str]:
    from .config import load_config
    from .pipeline import WEIGHTED_SLOTS
    try:
        cfg = load_config(model)
    except ReaudioError:
        return []
    return [s for s in WEIGHTED_SLOTS if cfg.get(s) and s != "audio_encoder"]


def check_plan(plan: Plan, build_feature_models: bool = True) -> list[str]:
    """Problems that would stop the run: missing data, weights, feature models, GPU."""
    spec, problems = plan.spec, list(plan.problems)
    produced = [d for _, d in plan.prepare] + [t.dir for t in plan.trainings.values()]
    seen = set()
    for tr in plan.trainings.values():
        for where, value in _component_weights(tr.cfg):
            if (where, value) in seen:
                continue
            seen.add((where, value))
            why = _weight_problem(value, produced)
            if why:
                problems.append(f"training weights {where}: {why}")
    found: dict[str, list[str]] = {}  # problem -> variants it concerns (one line per problem)
    for v in plan.variants:
        if v.trained:
            continue
        model = Path(v.model).expanduser()
        has_model = (model / "config.yaml").is_file()
        if not has_model:
            found.setdefault(f"model {model} missing (a pipeline directory with config.yaml and weights, written by "
                             "save_pretrained / `reaudio train`)", []).append(v.name)
        for slot in _pipeline_slots(model) if has_model else []:
            if not (model / slot).is_dir():
                found.setdefault(f"{model}/{slot}/ weights missing", []).append(v.name)
        if v.preset:
            from .config import compose
            try:
                cfg = compose(v.preset, v.config, v.overrides)
            except ReaudioError as exc:
                found.setdefault(str(exc), []).append(v.name)
                continue
            for where, value in _component_weights(cfg):
                slot = where.split(".")[0]
                if slot in ("denoiser", "decoder", "vocoder") or (has_model and (model / slot).is_dir()):
                    continue  # these weights come from the model directory
                why = _weight_problem(value, produced)
                if why:
                    found.setdefault(f"weights {where}: {why}", []).append(v.name)
    db_dir = plan.db_dir  # type: ignore[attr-defined]
    dc = spec["data"].get("database_config")
    if dc and not (db_dir / "CURRENT").is_file():
        from .config import compose
        try:
            cfg = compose(dc.get("preset"), _listify(dc.get("config")), [str(o) for o in _listify(dc.get("overrides"))])
            for where, value in _component_weights(cfg):
                if where.startswith(("text_encoder", "retriever")):
                    why = _weight_problem(value, produced)
                    if why:
                        found.setdefault(f"weights {where}: {why}", []).append("the database build")
        except ReaudioError as exc:
            problems.append(f"data.database_config: {exc}")
    for what, names in found.items():
        problems.append(f"{what} (needed by {', '.join(names)})")
    if spec["requires"].get("gpu") or spec["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            problems.append("a CUDA GPU is required (requires.gpu / device: cuda) and none is available here")
    if build_feature_models:
        from .cli import _model_spec
        from .registry import create
        s = _evaluation_settings(spec)
        roles = [("features", s["features"]), ("classifier", s["classifier"])]
        if s["clap"] not in (None, False, "off", "none", "auto"):
            roles.append(("clap", s["clap"]))
        for role, text in roles:
            if not text:
                continue
            try:
                name, params = _model_spec(str(text))
                create("feature_model", name, **params)
            except (ReaudioError, OSError, ValueError) as exc:
                problems.append(f"evaluation.{role} '{text}' cannot be built here: {str(exc).splitlines()[0][:300]}")
    return problems


# -- running --------------------------------------------------------------------------------------------
def _evaluation_settings(spec: dict) -> dict:
    from .registry import get_registry
    d = get_registry().defaults.get("evaluation", {}) or {}
    e = spec["evaluation"]
    return {"features": e.get("features") or d.get("features", "esc50-classifier"),
            "classifier": e.get("classifier") if e.get("classifier") is not None else d.get("classifier"),
            "clap": e.get("clap", "auto"), "is_splits": int(e.get("is_splits") or d.get("is_splits", 10)),
            "silence_db": float(d.get("silence_db", -70.0))}


def _feature_models(spec: dict) -> dict:
    """Build the evaluation feature models once: ``{fad, classifier, clap, clap_reason, settings}``."""
    from .cli import _model_spec
    from .registry import create, get_registry
    s = _evaluation_settings(spec)
    name, params = _model_spec(s["features"])
    fad = create("feature_model", name, **params)
    cls = None
    if s["classifier"]:
        cname, cparams = _model_spec(s["classifier"])
        cls = create("feature_model", cname, **cparams)
    clap, reason = None, None
    if s["clap"] in (None, False, "off", "none"):
        reason = "CLAP score switched off (evaluation.clap)"
    elif s["clap"] == "auto":
        if "clap" in get_registry().names("feature_model"):
            try:
                clap = create("feature_model", "clap")
            except (ReaudioError, OSError, ValueError) as exc:
                reason = f"the clap feature model could not be built here: {str(exc).splitlines()[0][:200]}"
        else:
            reason = "no clap feature model is registered"
    else:
        cname, cparams = _model_spec(str(s["clap"]))
        clap = create("feature_model", cname, **cparams)
    return {"fad": fad, "classifier": cls, "clap": clap, "clap_reason": reason, "settings": s}


def _ensure_database(plan: Plan, progress: bool, log) -> Any:
    from .database import Database, build_database
    db_dir = plan.db_dir  # type: ignore[attr-defined]
    if (db_dir / "CURRENT").is_file():
        return Database.open(db_dir)
    spec = plan.spec
    if not spec["data"].get("manifest"):
        raise ReaudioError(f"no database at {db_dir} and no data.manifest to build it from")
    from .config import compose
    dc = spec["data"].get("database_config") or {}
    cfg = compose(dc.get("preset"), _listify(dc.get("config")) or spec["base"],
                  [str(o) for o in _listify(dc.get("overrides"))] or spec["overrides"])
    cfg["audio_encoder"] = None  # the index holds caption embeddings; audio tokens are cached per model later
    log(f"building the retrieval database {db_dir} from {spec['data']['manifest']}")
    report = build_database(_listify(spec["data"]["manifest"]), db_dir, cfg, progress=progress)
    log(report.summary().splitlines()[0])
    return Database.open(db_dir)


def _ensure_reference(plan: Plan) -> Path:
    if plan.spec["reference"].get("dir"):
        return plan.reference_dir
    ref = plan.reference_dir
    want = sorted(plan.reference)
    key = _hash(want)
    marker = ref / ".reference.json"
    if (_read_json(marker) or {}).get("key") == key:
        return ref
    tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = set()
    for name, path in want:
        if name in names:
            raise ReaudioError(f"reference: two database clips are both named {name}; file stems must be unique")
        names.add(name)
        dest = tmp / f"{name}{Path(path).suffix}"
        try:
            os.symlink(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    (tmp / ".reference.json").write_text(json.dumps({"key": key, "clips": len(want)}))
    if ref.exists():
        shutil.rmtree(ref)
    os.replace(tmp, ref)
    return ref


def _run_training(tr: Training, procs: int, progress: bool, log) -> float:
    from .training import list_checkpoints, train
    resume = bool(list_checkpoints(tr.dir))
    t0 = time.time()
    if procs > 1:
        import subprocess

        import yaml
        tr.dir.mkdir(parents=True, exist_ok=True)
        cfg_file = tr.dir / "experiment-train.yaml"
        _atomic_text(cfg_file, yaml.safe_dump(tr.cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "reaudio_core.cli", "train", "--config", str(cfg_file), "--out", str(tr.dir)]
        cmd += ["--resume"] if resume else []
        cmd += [] if progress else ["--quiet"]
        log("$ " + " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            raise ReaudioError(f"training {tr.slug} failed (torchrun exit); rerun the experiment to resume it")
    else:
        train(tr.cfg, out=tr.dir, resume=resume, progress=progress)
    seconds = time.time() - t0
    _atomic_text(tr.dir / "experiment-training.json", json.dumps({"key": tr.key, "seconds": seconds,
                                                                 "resumed": resume, "procs": procs}))
    return seconds


def _device(spec: dict) -> str:
    import torch
    if spec["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec["device"]


def _pipeline(plan: Plan, v: Variant, seed: int):
    from .pipeline import ReAudioPipeline
    spec = plan.spec
    overrides = [f"generation.retrieval={v.retrieval}", f"generation.k={v.k}", *_dotlist("generation", spec["generation"])]
    db = plan.db_dir if v.retrieval != "none" else None  # type: ignore[attr-defined]
    if v.trained:
        pipe = ReAudioPipeline.from_pretrained(v.trainings[seed].final, overrides, db=db)
    elif v.preset:
        from .config import compose
        cfg = compose(v.preset, v.config, [*v.overrides, *overrides])
        cfg["generation"]["require_weights"] = False
        pipe = ReAudioPipeline.from_config(cfg, model_dir=v.model, db=db)
    else:
        pipe = ReAudioPipeline.from_pretrained(v.model, [*v.overrides, *overrides], db=db)
    device = _device(spec)
    if device != "cpu":
        from .training import move_component
        for slot in ("text_encoder", "caption_encoder", "audio_encoder", "denoiser", "decoder", "vocoder"):
            move_component(getattr(pipe, slot, None), device)
    if v.retrieval in ("audio", "audio+text") and pipe.database is not None and pipe.audio_encoder is not None:
        if pipe.database.features(pipe._feature_key("audio")) is None:
            pipe.cache_features(progress=False, streams=("audio",))
    return pipe


def _write_wav_atomic(path: Path, wav, sample_rate: int) -> None:
    """16-bit WAV via a hidden temporary file (no audio suffix, so evaluation never sees a partial clip)."""
    import numpy as np
    import soundfile as sf
    data = np.clip(np.asarray(wav.detach().cpu() if hasattr(wav, "detach") else wav, dtype=np.float32).reshape(-1),
                   -1.0, 1.0)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    with open(tmp, "wb") as f:
        sf.write(f, data, sample_rate, subtype="PCM_16", format="WAV")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _gen_key(plan: Plan, v: Variant, seed: int) -> str:
    model = v.trainings[seed].key if v.trained else str(Path(v.model).resolve())
    return _hash({"model": model, "preset": v.preset, "config": v.config, "overrides": v.overrides,
                  "retrieval": v.retrieval, "k": v.k, "seed": seed, "generation": plan.spec["generation"],
                  "prompts": [(p.name, p.text) for p in plan.prompts]})


def _generate_cell(plan: Plan, v: Variant, seed: int, pipe_cache: dict, progress: bool) -> tuple[bool, float]:
    """Generate the clips of one (variant, seed) cell that are not there yet. Returns (skipped, seconds)."""
    cell = plan.out / "gen" / v.name / str(seed)
    key = _gen_key(plan, v, seed)
    marker = cell / ".cell.json"
    state = _read_json(marker) or {}
    if state.get("key") == key and state.get("complete") and all((cell / f"{p.name}.wav").is_file()
                                                                  for p in plan.prompts):
        return True, 0.0
    if state.get("key") not in (None, key) and cell.exists():  # another configuration's clips: start afresh
        shutil.rmtree(cell)
    cell.mkdir(parents=True, exist_ok=True)
    for leftover in cell.glob(".*.part-*"):  # a clip being written when a previous run was interrupted
        leftover.unlink(missing_ok=True)
    if state.get("key") != key:
        _atomic_text(marker, json.dumps({"key": key, "complete": False}))
        state = {"key": key, "complete": False}
    todo = [p for p in plan.prompts if not (cell / f"{p.name}.wav").exists()]
    t0 = time.time()
    neighbours = state.get("neighbours", {})
    settings = state.get("generation")
    if todo:
        pkey = (v.trainings[seed].key if v.trained else v.name, v.retrieval)  # k is passed per call
        if pkey not in pipe_cache:
            pipe_cache.clear()  # one pipeline in memory at a time
            pipe_cache[pkey] = _pipeline(plan, v, seed)
        pipe = pipe_cache[pkey]
        g = pipe.cfg["generation"]
        settings = {key: g.get(key) for key in ("sampler", "steps", "guidance", "eta", "duration", "candidates",
                                                "caption_tokens", "precision")}
        settings["reranker"] = (pipe.cfg.get("reranker") or {}).get("name") if settings["candidates"] > 1 else None
        bs = plan.spec["generate_batch"]
        for i in range(0, len(todo), bs):
            batch = todo[i:i + bs]
            result = pipe([p.text for p in batch], seed=seed, k=v.k, progress=False)
            for p, wav, nb in zip(batch, result.waveforms, result.neighbours):
                _write_wav_atomic(cell / f"{p.name}.wav", wav, result.sample_rate)
                neighbours[p.name] = [n.get("caption") for n in nb]
            if progress:
                print(f"  {v.name} seed {seed}: {min(i + bs, len(todo))}/{len(todo)} clips", file=sys.stderr)
    seconds = time.time() - t0 + float(state.get("seconds", 0.0))
    _atomic_text(marker, json.dumps({"key": key, "complete": True, "seconds": seconds, "clips": len(plan.prompts),
                                     "generation": settings, "neighbours": neighbours}))
    return False, seconds


def _eval_cell(plan: Plan, v: Variant, seed: int, models: dict) -> tuple[bool, dict]:
    from .evaluation import evaluate
    from .longtail import bucket_scores, eval_items_with_labels
    path = plan.out / "eval" / v.name / f"seed-{seed}.json"
    settings = models["settings"]
    key = _eval_key(plan, v, seed)
    old = _read_json(path)
    if old and old.get("key") == key:
        return True, old
    t0 = time.time()
    prompt_map = {p.name: p.text for p in plan.prompts}
    res = evaluate(plan.out / "gen" / v.name / str(seed), plan.reference_dir, features=models["fad"],
                   classifier=models["classifier"], clap=models["clap"],
                   prompts=prompt_map if models["clap"] is not None else None, is_splits=settings["is_splits"],
                   silence_db=settings["silence_db"], use_cache=True, progress=False)
    if models["clap"] is None:
        res["not_computed"]["clap_score"] = models["clap_reason"]
    cls = models["classifier"] or (models["fad"] if getattr(models["fad"], "num_classes", 0) else None)
    items = eval_items_with_labels(res, {p.name: p.labels for p in plan.prompts}, getattr(cls, "labels", None))
    hits = [it["hit"] for it in items if "hit" in it]
    res["metrics"]["top1"] = sum(hits) / len(hits) if hits else None
    if not hits:
        res["not_computed"]["top1"] = "no generated clip has a label the classifier knows"
    res["buckets"] = bucket_scores(items, plan.label_counts, plan.buckets, [s for s, _, _ in BUCKET_SCORES],
                                   plan.spec["longtail"]["multi_label"])
    res["labelled_items"] = items
    res["key"] = key
    res["seconds"] = time.time() - t0
    _atomic_text(path, json.dumps(res, indent=1, ensure_ascii=False, default=str))
    return False, res


# -- aggregation ----------------------------------------------------------------------------------------
def _mean_std(values: list) -> dict:
    vals = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "std": sd, "n": len(vals)}


def _cell_summary(plan: Plan, v: Variant, seed: int, res: dict) -> dict:
    return {"variant": v.name, "group": v.group, "retrieval": v.retrieval, "k": v.k, "seed": seed,
            "model": (str(v.trainings[seed].final) if v.trained else str(v.model)),
            "metrics": {m: res["metrics"].get(m) for m, _, _ in METRICS} | {"is_std": res["metrics"].get("is_std")},
            "not_computed": res.get("not_computed", {}), "set_size": res.get("set_size"),
            "buckets": res.get("buckets"), "warnings": res.get("warnings", [])}


def summarise(plan: Plan, cells: list[dict]) -> list[dict]:
    rows = []
    for v in plan.variants:
        mine = [c for c in cells if c["variant"] == v.name]
        metrics = {m: _mean_std([c["metrics"].get(m) for c in mine]) for m, _, _ in METRICS}
        buckets = {}
        for s, _, _ in BUCKET_SCORES:
            buckets[s] = {b: _mean_std([((c["buckets"] or {}).get("buckets", {}).get(b) or {}).get(s, {}).get("mean")
                                        for c in mine]) for b in plan.buckets.names}
        clips = {b: max([((c["buckets"] or {}).get("buckets", {}).get(b) or {}).get("clips", 0) for c in mine] or [0])
                 for b in plan.buckets.names}
        rows.append({"variant": v.name, "group": v.group, "retrieval": v.retrieval, "k": v.k,
                     "seeds": [c["seed"] for c in mine], "metrics": metrics, "buckets": buckets,
                     "bucket_clips": clips})
    return rows


def _cell(ms: dict, digits: int = 3) -> str:
    if ms["mean"] is None:
        return "n/a"
    return f"{ms['mean']:.{digits}f}" + (f" ± {ms['std']:.{digits}f}" if ms["std"] is not None else "")


def table_markdown(plan: Plan, cells: list[dict], summary: list[dict], feature_info: dict) -> str:
    spec = plan.spec
    present = [(m, name, hib) for m, name, hib in METRICS if any(r["metrics"][m]["n"] for r in summary)]
    arrows = {True: "↑", False: "↓"}
    seeds = spec["seeds"]
    lines = [f"# {spec['name']}: results", ""]
    if spec.get("description"):
        lines += [" ".join(str(spec["description"]).split()), ""]
    cmd = (f"reaudio experiment --config {spec['config_file']}" + (f" --out {spec['cli_out']}" if spec.get("cli_out") else "")
           + "".join(f" {o}" for o in spec["cli_overrides"]))
    lines += [f"Command: `{cmd}` (output {plan.out}).", ""]
    fm = feature_info.get("feature_models") or {}
    def fname(role):
        d = fm.get(role)
        return f"`{d['name']}`" if d else "none"
    size = feature_info.get("set_size") or {}
    lines += [f"Feature models: FAD {fname('fad')}, KL / IS {fname('classifier')}, CLAP {fname('clap')}; sample rate "
              f"{feature_info.get('sample_rate', 'n/a')} Hz; set size per cell: {size.get('generated', 'n/a')} generated "
              f"/ {size.get('reference', 'n/a')} reference clips ({size.get('pairs', 'n/a')} KL pairs, IS "
              f"{size.get('is_splits', 'n/a')} splits). Values are mean ± standard deviation over seeds "
              f"{', '.join(map(str, seeds))} ({'each seed trains its own model' if spec['train_per_seed'] else 'one trained model per variant; seeds vary the generation noise'}).",
              ""]
    gens = {json.dumps(g, sort_keys=True) for g in (feature_info.get("generation") or {}).values() if g}
    for g in map(json.loads, sorted(gens)):
        rerank = f"best of {g['candidates']} by {g['reranker']} score" if g.get("candidates", 1) > 1 else "no re-ranking"
        lines += [f"Generation: {g['sampler']} sampler, {g['steps']} steps, guidance {g['guidance']}, "
                  f"{g['duration']} s, {rerank}" + (f" (eta {g['eta']})" if g["sampler"] == "ddim" else "") + ".", ""]
    if plan.subset_ids is not None:
        lines += [f"Training subset: {len(plan.subset_ids)} of {len(plan.items)} database items (the rest stay in the "
                  "retrieval database)." , ""]
    train_k = spec["train_k"]
    if any(v.trained for v in plan.variants):
        lines += [f"Models: {'each k trained separately (train_k: per-variant)' if train_k == 'per-variant' else f'one model per retrieval type trained with k={train_k}, generated with each k'}.", ""]
    header = "| variant | retrieval | k | " + " | ".join(f"{name} {arrows[h]}" for _, name, h in present) + " | seeds |"
    lines += [header, "|---" * (4 + len(present)) + "|"]
    for r in summary:
        k = "-" if r["retrieval"] == "none" else str(r["k"])
        lines.append(f"| {r['variant']} | {r['retrieval']} | {k} | "
                     + " | ".join(_cell(r["metrics"][m], 2 if m == "clap_score" else 3) for m, _, _ in present)
                     + f" | {len(r['seeds'])} |")
    missing = {}
    for c in cells:
        for m, why in (c.get("not_computed") or {}).items():
            missing.setdefault(m, why)
    if missing:
        lines += ["", "Not computed: " + "; ".join(f"**{m}**: {why}" for m, why in missing.items())]
    # per bucket
    lines += ["", "## Per frequency bucket", "",
              "Buckets: how often the prompt's class occurs in the training data (0 = never seen in training); each "
              f"cell is the mean per-clip score over the bucket's clips, mean ± std over seeds. Multi-label clips: "
              f"{'the bucket of their rarest label' if spec['longtail']['multi_label'] == 'min' else 'every label bucket'}."]
    if plan.label_note:
        lines += ["", plan.label_note]
    clips = summary[0]["bucket_clips"] if summary else {}
    for s, name, hib in BUCKET_SCORES:
        if not any(r["buckets"][s][b]["n"] for r in summary for b in plan.buckets.names):
            continue
        lines += ["", f"### {name} {arrows[hib]}", "",
                  "| variant | " + " | ".join(f"{b} ({clips.get(b, 0)} clips)" for b in plan.buckets.names) + " |",
                  "|---" * (1 + len(plan.buckets.names)) + "|"]
        for r in summary:
            lines.append(f"| {r['variant']} | " + " | ".join(_cell(r["buckets"][s][b]) for b in plan.buckets.names) + " |")
    warn = sorted({w for c in cells for w in c.get("warnings", [])})
    if warn:
        lines += ["", "## Warnings from the evaluation", ""] + [f"- {w}" for w in warn[:10]]
    return "\n".join(lines) + "\n"


def plot_k_sweep(path: Path, summary: list[dict]) -> Path | None:
    """Like the paper's Fig. 3: each metric against k, one line per retrieval group, ``none`` as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    present = [(m, name, hib) for m, name, hib in METRICS if any(r["metrics"][m]["n"] for r in summary)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.3 * len(present), 3.2), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for r in summary:
        if r["retrieval"] != "none":
            groups.setdefault(r["group"], []).append(r)
    ks = sorted({r["k"] for rs in groups.values() for r in rs})
    for ax, (m, name, hib) in zip(axes[0], present):
        for g, rs in groups.items():
            rs = sorted((r for r in rs if r["metrics"][m]["mean"] is not None), key=lambda r: r["k"])
            if rs:
                ax.errorbar([r["k"] for r in rs], [r["metrics"][m]["mean"] for r in rs],
                            yerr=[r["metrics"][m]["std"] or 0.0 for r in rs], marker="o", capsize=3, label=g)
        for r in summary:
            if r["retrieval"] == "none" and r["metrics"][m]["mean"] is not None:
                mean, sd = r["metrics"][m]["mean"], r["metrics"][m]["std"] or 0.0
                ax.axhline(mean, color="grey", linestyle="--", label=f"{r['variant']} (no retrieval)")
                if sd:
                    ax.axhspan(mean - sd, mean + sd, color="grey", alpha=0.15)
        ax.set_xlabel("k (retrieved pairs)")
        if ks:
            ax.set_xticks(ks)
        ax.set_title(f"{name} ({'higher' if hib else 'lower'} is better)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_longtail(plan: Plan, summary: list[dict]) -> list[Path]:
    """Like the paper's Fig. 4: per-bucket scores, one bar per variant at ``longtail.plot_k`` (and none)."""
    from .longtail import plot_buckets
    ks = sorted({r["k"] for r in summary if r["retrieval"] != "none"})
    plot_k = plan.spec["longtail"].get("plot_k")
    if plot_k is None and ks:
        plot_k = 3 if 3 in ks else ks[len(ks) // 2]
    chosen = [r for r in summary if r["retrieval"] == "none" or r["k"] == plot_k]
    written = []
    for s, name, hib in BUCKET_SCORES:
        if not any(r["buckets"][s][b]["n"] for r in chosen for b in plan.buckets.names):
            continue
        per_model = {r["variant"]: {b: {s: {"mean": r["buckets"][s][b]["mean"]}} for b in plan.buckets.names}
                     for r in chosen}
        spread = {r["variant"]: {b: r["buckets"][s][b]["std"] or 0.0 for b in plan.buckets.names} for r in chosen}
        path = plan.out / f"longtail-{s}.png"
        plot_buckets(path, per_model, s, plan.buckets, title=f"{plan.spec['name']}: {name} by class frequency in "
                     f"training (k={plot_k}; mean ± std over seeds)", ylabel=name, spread=spread)
        written.append(path)
    return written


# -- entry points ---------------------------------------------------------------------------------------
def describe_plan(plan: Plan, with_status: bool = True) -> str:
    spec = plan.spec
    seeds = spec["seeds"]
    lines = [f"experiment {spec['name']} ({spec['config_file']}) -> {plan.out}"]
    if plan.items_source:
        lines.append(f"data: {plan.items_source}")
    labels = _labels_of(plan.items)
    if labels:
        lines.append(f"labels: {len(labels)}")
    if plan.subset_ids is not None:
        per = {}
        for label, n in plan.label_counts.items():
            per[n] = per.get(n, 0) + 1
        dist = ", ".join(f"{n} clips: {c} classes" for n, c in sorted(per.items(), reverse=True))
        unseen = len([lb for lb in labels if plan.label_counts.get(lb, 0) == 0])
        lines.append(f"training subset: {len(plan.subset_ids)} of {len(plan.items)} items ({dist}"
                     f"{f'; {unseen} classes unseen' if unseen else ''})")
    lines.append(f"prompts: {len(plan.prompts)}" + (f" (e.g. {plan.prompts[0].name}: {plan.prompts[0].text!r})"
                                                    if plan.prompts else ""))
    ref = plan.reference
    lines.append(f"reference: {len(ref)} clips" + (f" in {plan.reference_dir}" if plan.reference_dir else ""))
    if plan.label_note:
        lines.append(f"labels for the long-tail buckets: {plan.label_note}")
    if plan.label_counts:
        from .longtail import count_table
        ct = count_table(plan.label_counts, plan.buckets, sorted({lb for p in plan.prompts for lb in p.labels}))
        lines.append("prompted classes per bucket (training occurrences): "
                     + ", ".join(f"{b}: {ct[b]['classes']}" for b in plan.buckets.names))
    lines.append(f"variants ({len(plan.variants)}): " + ", ".join(v.name for v in plan.variants))
    lines.append(f"seeds: {', '.join(map(str, seeds))}; train_k: {spec['train_k']}; "
                 f"train_per_seed: {spec['train_per_seed']}")
    steps_total = samples = 0
    for tr in plan.trainings.values():
        t = tr.cfg["training"]
        steps_total += int(t["max_steps"])
        samples += int(t["max_steps"]) * int(t["batch_size"]) * int(spec["training_procs"])
    done_tr = sum(tr.done() for tr in plan.trainings.values()) if with_status else 0
    prep_todo = [d for _, d in plan.prepare if not (d / "final" / "config.yaml").is_file()]
    if plan.prepare:
        lines.append(f"prepare: {len(plan.prepare)} training(s) ({len(prep_todo)} to run): "
                     + ", ".join(f"{c['training']['stage']} -> {d}" for c, d in plan.prepare))
    lines.append(f"trainings: {len(plan.trainings)} ({done_tr} finished), {steps_total} steps in all, "
                 f"{samples} training samples" + (f" ({len(plan.variants) - sum(v.trained for v in plan.variants)} "
                                                  "pretrained variants need none)" if any(not v.trained for v in plan.variants) else ""))
    for tr in plan.trainings.values():
        lines.append(f"  {tr.slug}: {tr.cfg['training']['max_steps']} steps x batch {tr.cfg['training']['batch_size']}"
                     f" -> {tr.dir}{' [finished]' if with_status and tr.done() else ''}")
    cells = len(plan.variants) * len(seeds)
    clips = cells * len(plan.prompts)
    gen = {}
    try:
        from .config import compose
        base = compose(None, spec["base"], spec["overrides"]) if spec["base"] else compose()
        gen = {**base["generation"], **spec["generation"]}
    except ReaudioError:
        gen = dict(spec["generation"])
    steps = gen.get("steps", "?")
    passes = clips * steps * (2 if gen.get("guidance", 1.0) != 1.0 else 1) * int(gen.get("candidates", 1) or 1) \
        if isinstance(steps, int) else "?"
    done_cells = 0
    if with_status:
        for v in plan.variants:
            for s in seeds:
                st = _read_json(plan.out / "gen" / v.name / str(s) / ".cell.json") or {}
                done_cells += bool(st.get("complete"))
    lines.append(f"generations: {cells} cells ({len(plan.variants)} variants x {len(seeds)} seeds; {done_cells} "
                 f"finished) x {len(plan.prompts)} prompts = {clips} clips of {gen.get('duration', '?')} s, "
                 f"{steps} {gen.get('sampler', '')} steps each = {passes} denoiser passes")
    ev = _evaluation_settings(spec)
    lines.append(f"evaluations: {cells} cells (features {ev['features']}, classifier "
                 f"{ev['classifier'] or '(features)'}, clap {ev['clap']}); reference features once "
                 f"({len(ref)} clips), generated {clips} clips")
    return "\n".join(lines)


def run_experiment(config: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None,
                   dry_run: bool = False, progress: bool = True) -> dict | None:
    """Run (or with ``dry_run`` only check and describe) an experiment; returns results.json's content."""
    import torch
    spec = load_experiment(config, overrides, out)
    plan = build_plan(spec)
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if dry_run:
        problems = check_plan(plan)
        print(describe_plan(plan))
        if problems:
            print(f"\nmissing or wrong ({len(problems)}):", file=sys.stdout)
            for p in problems:
                print(f"  - {p}")
            raise ReaudioError(f"dry run of {spec['name']}: {len(problems)} problem(s) listed above; nothing was computed")
        print("\ndry run: configuration, data and weights OK; nothing was computed")
        return None
    if plan.problems:
        raise ReaudioError(f"experiment {spec['name']}: " + "; ".join(plan.problems[:5])
                           + (f" (and {len(plan.problems) - 5} more; see --dry-run)" if len(plan.problems) > 5 else ""))
    if spec["requires"].get("gpu") and not torch.cuda.is_available():
        raise ReaudioError("this experiment requires a CUDA GPU (requires.gpu) and none is available")
    out_dir = plan.out
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_text(out_dir / "experiment.json", json.dumps({k: v for k, v in spec.items()}, indent=1, default=str))
    threads = torch.get_num_threads()
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    t_start = time.time()
    stats = {"skipped": {"prepare": 0, "train": 0, "generate": 0, "evaluate": 0},
             "ran": {"prepare": 0, "train": 0, "generate": 0, "evaluate": 0}}
    try:
        from .training import train
        for cfg, d in plan.prepare:
            if (d / "final" / "config.yaml").is_file():
                stats["skipped"]["prepare"] += 1
                continue
            log(f"prepare: training {cfg['training']['stage']} into {d}")
            from .training import list_checkpoints
            train(cfg, out=d, resume=bool(list_checkpoints(d)), progress=progress)
            stats["ran"]["prepare"] += 1
            if spec["threads"]:
                torch.set_num_threads(int(spec["threads"]))
        db = _ensure_database(plan, progress, log)
        if plan.items_source.startswith("manifest"):  # ids and prompts from the database that now exists
            plan = build_plan(spec)
            if plan.problems:
                raise ReaudioError("; ".join(plan.problems[:5]))
        del db
        _ensure_reference(plan)
        train_seconds = {}
        for i, tr in enumerate(plan.trainings.values(), 1):
            if tr.done():
                stats["skipped"]["train"] += 1
                train_seconds[tr.slug] = (_read_json(tr.dir / "experiment-training.json") or {}).get("seconds")
                continue
            log(f"training {i}/{len(plan.trainings)}: {tr.slug} ({tr.cfg['training']['max_steps']} steps) -> {tr.dir}")
            train_seconds[tr.slug] = _run_training(tr, int(spec["training_procs"]), progress, log)
            stats["ran"]["train"] += 1
            if spec["threads"]:
                torch.set_num_threads(int(spec["threads"]))
        pipe_cache: dict = {}
        gen_seconds = 0.0
        for v in plan.variants:
            for seed in spec["seeds"]:
                skipped, secs = _generate_cell(plan, v, seed, pipe_cache, progress)
                stats["skipped" if skipped else "ran"]["generate"] += 1
                if not skipped:
                    log(f"generated {v.name} seed {seed} ({secs:.1f} s)")
        pipe_cache.clear()
        models = None
        cells = []
        for v in plan.variants:
            for seed in spec["seeds"]:
                path = plan.out / "eval" / v.name / f"seed-{seed}.json"
                if models is None and not _eval_fresh(plan, v, seed, path):
                    models = _feature_models(spec)
                if models is None:
                    res = _read_json(path)
                    skipped = True
                else:
                    skipped, res = _eval_cell(plan, v, seed, models)
                stats["skipped" if skipped else "ran"]["evaluate"] += 1
                cells.append(_cell_summary(plan, v, seed, res))
                if not skipped:
                    log(f"evaluated {v.name} seed {seed}")
                feature_info = res
        generation = {}
        for v in plan.variants:
            for seed in spec["seeds"]:
                st = _read_json(plan.out / "gen" / v.name / str(seed) / ".cell.json") or {}
                gen_seconds += float(st.get("seconds") or 0.0)
                generation.setdefault(v.name, st.get("generation"))
        feature_info = {**feature_info, "generation": generation}
        summary = summarise(plan, cells)
        results = {
            "experiment": spec["name"], "config_file": spec["config_file"], "overrides": spec["cli_overrides"],
            "out": str(out_dir), "spec": spec, "sample_rate": feature_info.get("sample_rate"),
            "feature_models": feature_info.get("feature_models"), "set_size": feature_info.get("set_size"),
            "generation": generation, "label_note": plan.label_note, "buckets": plan.buckets.names, "bucket_edges": list(plan.buckets.edges),
            "train_label_counts": plan.label_counts,
            "subset": None if plan.subset_ids is None else {"items": len(plan.subset_ids), "of": len(plan.items),
                                                            "ids": plan.subset_ids},
            "prompts": [{"name": p.name, "text": p.text, "labels": p.labels} for p in plan.prompts],
            "cells": cells, "summary": summary,
            "compute_seconds": {"training": {k: v for k, v in train_seconds.items()},
                                "generation": gen_seconds,
                                "evaluation": sum(float((_read_json(plan.out / "eval" / v.name / f"seed-{s}.json") or {})
                                                        .get("seconds") or 0.0) for v in plan.variants for s in spec["seeds"])},
            "this_run": {"seconds": time.time() - t_start, **stats},
        }
        _atomic_text(out_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False, default=str))
        _atomic_text(out_dir / "table.md", table_markdown(plan, cells, summary, feature_info))
        plot_k_sweep(out_dir / "k_sweep.png", summary)
        plot_longtail(plan, summary)
        log(f"done in {time.time() - t_start:.1f} s: ran {stats['ran']}, skipped finished {stats['skipped']}; "
            f"{out_dir / 'table.md'}")
        return results
    finally:
        torch.set_num_threads(threads)


def _eval_key(plan: Plan, v: Variant, seed: int) -> str:
    cell = plan.out / "gen" / v.name / str(seed)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in cell.glob("*.wav")) if cell.is_dir() else []
    return _hash({"gen": _gen_key(plan, v, seed), "files": files, "eval": _evaluation_settings(plan.spec),
                  "reference": plan.reference,
                  "counts": plan.label_counts, "buckets": plan.buckets.edges,
                  "multi_label": plan.spec["longtail"]["multi_label"],
                  "labels": [(p.name, p.labels) for p in plan.prompts]})


def _eval_fresh(plan: Plan, v: Variant, seed: int, path: Path) -> bool:
    """Whether the evaluation JSON at ``path`` is current (a pure rerun builds no feature model)."""
    old = _read_json(path)
    return bool(old) and old.get("key") == _eval_key(plan, v, seed)

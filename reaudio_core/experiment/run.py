"""Running an experiment (:func:`run_experiment`): prepare, database, trainings, generation and
evaluation per cell, each skipped when its key matches what is on disk."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_dir, atomic_write, atomic_write_text
from ..registry import ReaudioError
from .check import check_plan, describe_plan
from .plan import Plan, Training, Variant, build_plan
from .report import _cell_summary, plot_k_sweep, plot_longtail, summarise, table_markdown
from .spec import (BUCKET_SCORES, _dotlist, _evaluation_settings, _hash, _listify, _read_json,
                   load_experiment)

logger = logging.getLogger("reaudio")


# -- running --------------------------------------------------------------------------------------------
def _feature_models(spec: dict) -> dict:
    """Build the evaluation feature models once: ``{fad, classifier, clap, clap_reason, settings}``."""
    from ..evaluation import parse_model_spec
    from ..registry import create, get_registry
    s = _evaluation_settings(spec)
    name, params = parse_model_spec(s["features"])
    fad = create("feature_model", name, **params)
    cls = None
    if s["classifier"]:
        cname, cparams = parse_model_spec(s["classifier"])
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
        cname, cparams = parse_model_spec(str(s["clap"]))
        clap = create("feature_model", cname, **cparams)
    return {"fad": fad, "classifier": cls, "clap": clap, "clap_reason": reason, "settings": s}


def _ensure_database(plan: Plan, progress: bool, log) -> Any:
    from ..database import Database, build_database
    db_dir = plan.db_dir  # type: ignore[attr-defined]
    if (db_dir / "CURRENT").is_file():
        return Database.open(db_dir)
    spec = plan.spec
    if not spec["data"].get("manifest"):
        raise ReaudioError(f"no database at {db_dir} and no data.manifest to build it from")
    from ..config import compose
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
    with atomic_dir(ref) as tmp:
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
    return ref


def _run_training(tr: Training, procs: int, progress: bool, log) -> float:
    from ..training import list_checkpoints, train
    resume = bool(list_checkpoints(tr.dir))
    t0 = time.time()
    if procs > 1:
        import subprocess

        import yaml
        tr.dir.mkdir(parents=True, exist_ok=True)
        cfg_file = tr.dir / "experiment-train.yaml"
        atomic_write_text(cfg_file, yaml.safe_dump(tr.cfg, sort_keys=False))
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
    atomic_write_text(tr.dir / "experiment-training.json", json.dumps({"key": tr.key, "seconds": seconds,
                                                                      "resumed": resume, "procs": procs}))
    return seconds


def _device(spec: dict) -> str:
    import torch
    if spec["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec["device"]


def _pipeline(plan: Plan, v: Variant, seed: int):
    from ..pipeline import ReAudioPipeline
    spec = plan.spec
    overrides = [f"generation.retrieval={v.retrieval}", f"generation.k={v.k}", *_dotlist("generation", spec["generation"])]
    db = plan.db_dir if v.retrieval != "none" else None  # type: ignore[attr-defined]
    if v.trained:
        pipe = ReAudioPipeline.from_pretrained(v.trainings[seed].final, overrides, db=db)
    elif v.preset:
        from ..config import compose
        cfg = compose(v.preset, v.config, [*v.overrides, *overrides])
        cfg["generation"]["require_weights"] = False
        pipe = ReAudioPipeline.from_config(cfg, model_dir=v.model, db=db)
    else:
        pipe = ReAudioPipeline.from_pretrained(v.model, [*v.overrides, *overrides], db=db)
    device = _device(spec)
    if device != "cpu":
        from ..training import move_component
        for slot in ("text_encoder", "caption_encoder", "audio_encoder", "denoiser", "decoder", "vocoder"):
            move_component(getattr(pipe, slot, None), device)
    if v.retrieval in ("audio", "audio+text") and pipe.database is not None and pipe.audio_encoder is not None:
        if pipe.database.features(pipe._feature_key("audio")) is None:
            pipe.cache_features(progress=False, streams=("audio",))
    return pipe


def _write_wav_atomic(path: Path, wav, sample_rate: int) -> None:
    """16-bit WAV via :func:`~reaudio_core.io.atomic_write` (its hidden temporary file has no audio suffix,
    so evaluation never sees a partial clip)."""
    import numpy as np
    import soundfile as sf
    data = np.clip(np.asarray(wav.detach().cpu() if hasattr(wav, "detach") else wav, dtype=np.float32).reshape(-1),
                   -1.0, 1.0)
    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype="PCM_16", format="WAV"))


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
    for leftover in cell.glob(".*.wav.tmp-*"):  # a clip being written when a previous run was interrupted
        leftover.unlink(missing_ok=True)
    if state.get("key") != key:
        atomic_write_text(marker, json.dumps({"key": key, "complete": False}))
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
                logger.info(f"  {v.name} seed {seed}: {min(i + bs, len(todo))}/{len(todo)} clips")
    seconds = time.time() - t0 + float(state.get("seconds", 0.0))
    atomic_write_text(marker, json.dumps({"key": key, "complete": True, "seconds": seconds, "clips": len(plan.prompts),
                                     "generation": settings, "neighbours": neighbours}))
    return False, seconds


def _eval_cell(plan: Plan, v: Variant, seed: int, models: dict) -> tuple[bool, dict]:
    from ..evaluation import evaluate
    from ..longtail import bucket_scores, eval_items_with_labels
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
    atomic_write_text(path, json.dumps(res, indent=1, ensure_ascii=False, default=str))
    return False, res


# -- entry point ----------------------------------------------------------------------------------------
def run_experiment(config: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None,
                   dry_run: bool = False, progress: bool = True) -> dict | None:
    """Run (or with ``dry_run`` only check and describe) an experiment; returns results.json's content.
    A dry run writes the plan to stdout (it is the command's output); progress goes to the ``reaudio`` logger
    (INFO) when ``progress``."""
    import torch
    spec = load_experiment(config, overrides, out)
    plan = build_plan(spec)
    log = logger.info if progress else (lambda msg: None)
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
    atomic_write_text(out_dir / "experiment.json", json.dumps({k: v for k, v in spec.items()}, indent=1, default=str))
    threads = torch.get_num_threads()
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    t_start = time.time()
    stats = {"skipped": {"prepare": 0, "train": 0, "generate": 0, "evaluate": 0},
             "ran": {"prepare": 0, "train": 0, "generate": 0, "evaluate": 0}}
    try:
        from ..training import train
        for cfg, d in plan.prepare:
            if (d / "final" / "config.yaml").is_file():
                stats["skipped"]["prepare"] += 1
                continue
            log(f"prepare: training {cfg['training']['stage']} into {d}")
            from ..training import list_checkpoints
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
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False, default=str))
        atomic_write_text(out_dir / "table.md", table_markdown(plan, cells, summary, feature_info))
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

"""The dry run: what would stop an experiment (:func:`check_plan`) and what it would compute
(:func:`describe_plan`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..registry import ReaudioError
from .plan import Plan, _labels_of
from .spec import _evaluation_settings, _listify, _read_json


# -- checks (dry run) -----------------------------------------------------------------------------------
WEIGHT_PARAMS = ("checkpoint", "weights", "pretrained", "model_path")


def _weight_problem(value: str, produced: Sequence[Path]) -> str | None:
    """None when ``value`` (a component's weights parameter) is usable here; else what is missing."""
    from ..loading import resolve_path
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
    from ..config import SLOTS
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
    from ..config import load_config
    from ..pipeline import WEIGHTED_SLOTS
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
            from ..config import compose
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
        from ..config import compose
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
        from ..evaluation import parse_model_spec
        from ..registry import create
        s = _evaluation_settings(spec)
        roles = [("features", s["features"]), ("classifier", s["classifier"])]
        if s["clap"] not in (None, False, "off", "none", "auto"):
            roles.append(("clap", s["clap"]))
        for role, text in roles:
            if not text:
                continue
            try:
                name, params = parse_model_spec(str(text))
                create("feature_model", name, **params)
            except (ReaudioError, OSError, ValueError) as exc:
                problems.append(f"evaluation.{role} '{text}' cannot be built here: {str(exc).splitlines()[0][:300]}")
    return problems


# -- description ----------------------------------------------------------------------------------------
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
        from ..longtail import count_table
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
        from ..config import compose
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

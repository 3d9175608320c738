"""Aggregation over seeds, OUT/table.md and the Fig. 3 / Fig. 4 plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..plots import save_figure
from .plan import Plan, Variant
from .spec import BUCKET_SCORES, METRICS


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
    return save_figure(fig, path, dpi=110)


def plot_longtail(plan: Plan, summary: list[dict]) -> list[Path]:
    """Like the paper's Fig. 4: per-bucket scores, one bar per variant at ``longtail.plot_k`` (and none)."""
    from ..longtail import plot_buckets
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

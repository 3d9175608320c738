"""The generation benchmark's report: the markdown tables and target lines, the whole markdown page, and the
plot (time per stage, stacked; end to end against steps)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from reaudio_core.plots import save_figure

from .constants import CAPTIONS, GUIDANCE, ISSUE_REFERENCE, TARGET_CLIP, TARGET_RATIO, TARGET_SECONDS, TARGET_STEPS


def f(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def stage_table(results: list[dict]) -> list[str]:
    ref = ISSUE_REFERENCE["fp32"]
    lines = ["| size | stage | seconds | share of end to end | calls | issue reference (bare diffusers, S, fp32) |",
             "|---|---|--:|--:|--:|--:|"]
    for r in results:
        e, info, is_s = r["e2e"], r["info"], r["size"] == "s"
        k, n_tok = info["k"], info["caption_tokens"]
        enc = info["encoders"]
        total = e["total"]
        st = e["stages"]
        rows = [
            (f"prompt encoder ({enc['text_encoder']['name']}, prompt + empty prompt)", st["prompt encoder"], 2, None),
            (f"retrieval (torch, k={k} of {info['database_items']})", st["retrieval"], 1, None),
            (f"caption encoder ({enc['caption_encoder']['name']}, the empty caption x {n_tok} tokens, "
             f"unconditional, in {k} slots)", st["caption encoder"], 1, None),
            ("neighbour features (cached) + assembly", st["neighbour features"], None, None),
            (f"UNet per step (batch 2: guidance batched, latents {'x'.join(map(str, info['latent_shape']))})",
             e["unet_step"], None, ref["unet_step"] if is_s else None),
            (f"UNet, {e['steps']} steps", st["unet"], e["unet_calls"], 20 * ref["unet_step"] if is_s else None),
            ("rest of the sampling loop (scheduler, guidance)", st["loop rest"], None, None),
            ("VAE decode", st["vae"], 1, ref["vae"] if is_s else None),
            (f"vocoder ({info['vocoder']['name']})", st["vocoder"], 1, ref["vocoder"] if is_s else None),
            ("other (prompt checks, reshapes)", st["other"], None, None),
        ]
        for label, sec, calls, issue in rows:
            share = f"{100 * sec / total:.1f}%" if "per step" not in label else "-"
            lines.append(f"| {r['size']} | {label} | {f(sec)} | {share} | {calls if calls is not None else '-'} "
                         f"| {f(issue, 2)} |")
        lines.append(f"| {r['size']} | **end to end** ({info['duration']:g} s clip, {e['steps']} DPM-Solver steps, "
                     f"median of {e['runs']}) | **{f(total)}** | 100% | 1 | {f(ref['total'], 1) if is_s else '-'} |")
        lines.append(f"| {r['size']} | real-time factor (clip seconds / end-to-end seconds) | "
                     f"{info['duration'] / total:.2f} | - | - | {f(TARGET_CLIP / ref['total'], 2) if is_s else '-'} |")
        lines.append(f"| {r['size']} | peak RSS, GB (end to end, fp32) | {e['peak_rss_gb']:.2f} | - | - "
                     f"| {f(ISSUE_REFERENCE['peak_rss_gb'], 1) if is_s else '-'} |")
        for name, sec in r["uncached"].items():
            lines.append(f"| {r['size']} | not in the run above: {name} on the {k} neighbours (uncached"
                         f"{', audio files read' if name == 'audio encoder' else ''}) | {f(sec)} | - | 1 | - |")
    return lines


def loop_table(results: list[dict]) -> list[str]:
    lines = ["| size | sampler | steps | pipeline s | bare diffusers s | ratio | target | max abs latent diff | runs |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lp = r["loop"]
        ok = "met" if lp["ratio"] <= TARGET_RATIO else "NOT met"
        lines.append(f"| {r['size']} | {lp['sampler']} | {lp['steps']} | {f(lp['pipeline_s'])} | {f(lp['bare_s'])} "
                     f"| {lp['ratio']:.3f} | <= {TARGET_RATIO} ({ok}) | {f(lp['vs_bare']['max_abs'])} "
                     f"| {lp['runs']} |")
    return lines


def guidance_table(results: list[dict]) -> list[str]:
    lines = ["| size | guidance | s per step | loop s | ratio to batched | max abs latent diff to batched |",
             "|---|---|--:|--:|--:|--:|"]
    for r in results:
        g = r["guidance"]
        lines.append(f"| {r['size']} | batched (one UNet call on 2B) | {f(g['batched_s'] / g['steps'])} "
                     f"| {f(g['batched_s'])} | 1.000 | - |")
        lines.append(f"| {r['size']} | two UNet calls on B | {f(g['two_calls_s'] / g['steps'])} "
                     f"| {f(g['two_calls_s'])} | {g['ratio']:.3f} | {f(g['vs_batched']['max_abs'])} |")
    return lines


def sampler_table(results: list[dict]) -> list[str]:
    lines = ["| size | sampler | steps | seconds | latents rel. L2 diff vs ref | mel max abs diff vs ref "
             "| mel mean abs diff vs ref |", "|---|---|--:|--:|--:|--:|--:|"]
    for r in results:
        for s in r["samplers"]["rows"]:
            is_ref = s["latent_vs_ref"] is None
            name = f"{s['sampler']}{' (reference)' if is_ref else ''}"
            lat = "-" if is_ref else f(s["latent_vs_ref"]["rel_l2"])
            mel = s["mel_vs_ref"]
            lines.append(f"| {r['size']} | {name} | {s['steps']} | {f(s['seconds'])} | {lat} "
                         f"| {'-' if is_ref else f(mel['max_abs'])} | {'-' if is_ref else f(mel['mean_abs'])} |")
    return lines


def precision_table(results: list[dict]) -> list[str]:
    lines = ["| size | precision | UNet s/step | VAE s | vocoder s | end to end s | mel max abs diff vs fp32 "
             "| mel mean abs diff vs fp32 | fp32 mel std | peak RSS GB "
             "| issue reference (UNet/step, VAE, vocoder, total) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        for label, row in r["precision"].items():
            ref = None
            if r["size"] == "s" and label in ("fp32", "bf16 UNet+VAE+vocoder"):
                x = ISSUE_REFERENCE["fp32" if label == "fp32" else "bf16"]
                ref = f"{x['unet_step']:.2f}, {x['vae']:.1f}, {x['vocoder']:.1f}, {x['total']:.1f}"
            mel = row.get("mel_vs_fp32")
            lines.append(f"| {r['size']} | {label} | {f(row['unet_step'])} | {f(row['stages']['vae'])} "
                         f"| {f(row['stages']['vocoder'])} | {f(row['total'])} "
                         f"| {f(mel['max_abs']) if mel else '-'} | {f(mel['mean_abs']) if mel else '-'} "
                         f"| {f(r['precision']['fp32']['mel_std'])} | {row['peak_rss_gb']:.2f} | {ref or '-'} |")
        if r.get("precision_skipped"):
            ref = ISSUE_REFERENCE["bf16"] if r["size"] == "s" else None
            ref = f"{ref['unet_step']:.2f}, {ref['vae']:.1f}, {ref['vocoder']:.1f}, {ref['total']:.1f}" if ref else "-"
            lines.append(f"| {r['size']} | bf16 (UNet; UNet+VAE+vocoder) | {r['precision_skipped']} "
                         f"| | | | | | | | {ref} |")
    return lines


def sweep_table(results: list[dict]) -> list[str]:
    lines = ["| size | DPM-Solver steps | end to end s | sampling s | sampling s per step | real-time factor | runs |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        for s in r["sweep"]:
            lines.append(f"| {r['size']} | {s['steps']} | {f(s['total'])} | {f(s['sampling'])} | {f(s['per_step'])} "
                         f"| {r['info']['duration'] / s['total']:.2f} | {s['runs']} |")
    return lines


def target_lines(results: list[dict], args) -> tuple[list[str], dict]:
    s = next((r for r in results if r["size"] == "s"), None)
    if s is None:
        return [f"- the target (a {TARGET_CLIP} s clip at S, {TARGET_STEPS} DPM-Solver steps, <= {TARGET_SECONDS:g} s "
                f"end to end on 2 CPU cores) is measured at size s, which this run did not include."], {"met": None}
    status = {}
    lines = []
    conditions = []
    if s["info"]["duration"] != TARGET_CLIP:
        conditions.append(f"clip {s['info']['duration']:g} s instead of {TARGET_CLIP}")
    if args.target_steps != TARGET_STEPS:
        conditions.append(f"{args.target_steps} steps instead of {TARGET_STEPS}")
    if args.threads != 2:
        conditions.append(f"{args.threads} threads instead of 2")
    for label, row in s["precision"].items():
        met = row["total"] <= TARGET_SECONDS if not conditions else None
        status[label] = {"seconds": row["total"], "met": met}
        verdict = {True: "MET", False: "NOT MET", None: "OFF-TARGET RUN"}[met]
        caveat = f" (not the target's conditions: {'; '.join(conditions)})" if conditions else ""
        st = row["stages"]
        parts = [("UNet", st["unet"]), ("VAE", st["vae"]), ("vocoder", st["vocoder"]),
                 ("conditioning", row["conditioning"]), ("scheduler and rest", st["loop rest"] + st["other"])]
        where = ", ".join(f"{name} {sec:.2f} s ({100 * sec / row['total']:.0f}%)" for name, sec in parts)
        mel = row.get("mel_vs_fp32")
        quality = (f"; output mel vs fp32: max abs {mel['max_abs']:.3g}, mean abs {mel['mean_abs']:.3g} "
                   f"(fp32 mel std {mel['ref_std']:.3g})") if mel else ""
        lines.append(f"- **{verdict}** ({label}): {row['total']:.2f} s end to end for a "
                     f"{s['info']['duration']:g} s clip against the {TARGET_SECONDS:g} s target "
                     f"(real-time factor {s['info']['duration'] / row['total']:.2f}){caveat}. Time goes to: {where}"
                     f"{quality}.")
    if s.get("precision_skipped"):
        lines.append(f"- bf16 at size s: {s['precision_skipped']}.")
    ref = ISSUE_REFERENCE
    lines.append(f"- Issue reference (bare diffusers loop, random weights, measured by the issue's author): fp32 "
                 f"{ref['fp32']['total']} s (UNet {ref['fp32']['unet_step']} s/step, VAE {ref['fp32']['vae']} s, "
                 f"HiFi-GAN {ref['fp32']['vocoder']} s); bf16 autocast {ref['bf16']['total']} s (UNet "
                 f"{ref['bf16']['unet_step']} s/step, VAE {ref['bf16']['vae']} s, HiFi-GAN {ref['bf16']['vocoder']} s);"
                 f" peak RSS {ref['peak_rss_gb']} GB.")
    best = min(s["precision"].values(), key=lambda r: r["total"])
    st = best["stages"]
    fixed = best["total"] - st["unet"] - st["loop rest"]
    per_step = (st["unet"] + st["loop rest"]) / best["steps"]
    budget = (TARGET_SECONDS - fixed) / per_step if per_step > 0 else float("inf")
    lines.append(f"- At the fastest setting measured ({best['label']}): {fixed:.2f} s outside the denoising loop and "
                 f"{per_step:.3f} s per step, so {max(0.0, budget):.1f} steps would fit in {TARGET_SECONDS:g} s"
                 f"{' (at these off-target conditions)' if conditions else ''}.")
    status["met"] = None if conditions else any(v["met"] for v in status.values())
    return lines, status


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [("conditioning", "#8c8c8c"), ("UNet", "#1f77b4"), ("loop rest", "#aec7e8"), ("VAE", "#ff7f0e"),
             ("vocoder", "#2ca02c"), ("other", "#d62728")]
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.0 * len(results)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for (ax, ax2), r in zip(axes, results):
        bars = []
        for label, row in r["precision"].items():
            st = row["stages"]
            bars.append((label, {"conditioning": row["conditioning"], "UNet": st["unet"],
                                 "loop rest": st["loop rest"], "VAE": st["vae"], "vocoder": st["vocoder"],
                                 "other": st["other"]}))
        if r["size"] == "s":
            for prec, name in (("fp32", "issue ref. fp32 (bare)"), ("bf16", "issue ref. bf16 (bare)")):
                x = ISSUE_REFERENCE[prec]
                unet = 20 * x["unet_step"]
                bars.append((name, {"conditioning": 0.0, "UNet": unet, "loop rest": 0.0, "VAE": x["vae"],
                                    "vocoder": x["vocoder"],
                                    "other": max(0.0, x["total"] - unet - x["vae"] - x["vocoder"])}))
        ys = np.arange(len(bars))
        left = np.zeros(len(bars))
        for part, colour in parts:
            vals = np.array([b[1][part] for b in bars])
            ax.barh(ys, vals, left=left, color=colour, label=part)
            left += vals
        for y, total in zip(ys, left):
            ax.text(total, y, f" {total:.2f} s", va="center", fontsize=8)
        ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        if r["size"] == "s":
            ax.axvline(TARGET_SECONDS, color="k", ls="--", lw=1)
            ax.text(TARGET_SECONDS, 0.02, f" target {TARGET_SECONDS:g} s", fontsize=8,
                    transform=ax.get_xaxis_transform())
        ax.set_xlim(0, left.max() * 1.18)
        ax.set_xlabel("seconds, end to end")
        ax.set_title(f"{r['size']}: {r['info']['duration']:g} s clip, {r['e2e']['steps']} DPM-Solver steps",
                     fontsize=10)
        ax.legend(fontsize=7, ncol=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
        sw = r["sweep"]
        ax2.plot([s["steps"] for s in sw], [s["total"] for s in sw], "o-", label="end to end")
        ax2.plot([s["steps"] for s in sw], [s["sampling"] for s in sw], "s--", label="sampling loop")
        if r["size"] == "s":
            ax2.axhline(TARGET_SECONDS, color="k", ls="--", lw=1)
        ax2.set_xlabel("DPM-Solver steps")
        ax2.set_ylabel("seconds (fp32)")
        ax2.set_title(f"{r['size']}: steps sweep", fontsize=10)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def markdown(results: list[dict], args, t_lines: list[str], total: float, load: tuple, cpu: str,
             versions: str) -> str:
    """The printed report (generation.md) of ``results``."""
    stand_in = ("MiniLM (all-MiniLM-L6-v2, pretrained) stands in for CLAP (prompt) and T5 (captions); AudioMAE "
                "(retrieved audio) is random-init" if args.encoders == "minilm" else
                "CLAP, T5 and AudioMAE are random-init at the reference sizes (tiny shapes at size tiny)")
    md = [f"# Generation benchmark{' (--quick: smoke-test sizes, numbers not meaningful)' if args.quick else ''}", "",
          f"Machine: {cpu}, {os.cpu_count()} CPUs, {args.threads} torch threads; {versions}. Total run time "
          f"{total / 60:.1f} min; load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"(other work on the machine slows every timing).", "",
          f"CPU flags relevant to bf16: {', '.join(args.cpu_flags) or 'none found'}; oneDNN bf16 support reported by "
          f"torch: {args.bf16_probe['mkldnn_bf16']}. Probe under bf16 autocast against fp32: a 3x3 convolution "
          f"(64 channels, 32x32) {args.bf16_probe['conv_ratio']:.2f}x the fp32 time, a 256x512x512 matmul "
          f"{args.bf16_probe['linear_ratio']:.2f}x (`--bf16 {args.bf16}`).", "",
          f"Random weights everywhere (no pretrained weights exist on this machine): the UNet, VAE and vocoder are "
          f"built from registry.yaml's parameters with random initialisation. Encoders: {stand_in}. Retrieval: a "
          f"synthetic {len(CAPTIONS)}-item database (tone-plus-noise clips) with cached neighbour features. One "
          f"prompt, one candidate, guidance {GUIDANCE}, DPM-Solver++ (2M), medians of {args.repeats} run(s) "
          f"unless stated.", ""]
    for r in results:
        i = r["info"]
        params = ", ".join(f"{k} {v:.1f} M" for k, v in i["params_m"].items())
        enc = ", ".join(f"{k} {v['name']} ({v['dim'] if k == 'text_encoder' else v['token_dim']}-d)"
                        for k, v in i["encoders"].items())
        md.append(f"- **{r['size']}**: {i['duration']:g} s clip -> latents {'x'.join(map(str, i['latent_shape']))}; "
                  f"parameters: {params}; {enc}; vocoder {i['vocoder']['name']}; built in {i['build_s']:.1f} s.")
    md += ["", "## Target", ""] + t_lines
    md += ["", f"## Time per stage (fp32, end to end at {args.target_steps} steps, one run's breakdown)", "",
           "Stages are timed inside one `ReAudioPipeline.__call__` (each component wrapped in a timing proxy). The "
           "rows marked 'not in the run above' are what the caption / audio encoders cost when neighbour features "
           "are not cached in the database.", ""] + stage_table(results)
    md += ["", "## Denoising loop: this pipeline against a bare diffusers loop", "",
           "`ReAudioPipeline.sample` against a plain loop over the same diffusers UNet module, scheduler and inputs "
           "(guidance batched), interleaved in the same run; max abs latent diff 0 means bit-identical.", ""] + \
        loop_table(results)
    md += ["", "## Classifier-free guidance: one batched UNet call against two calls (bare loop)", ""] + \
        guidance_table(results)
    md += ["", "## Samplers", "",
           "DPM-Solver++ against DDIM with eta 0 (deterministic; the original code samples with eta 1), same initial "
           "noise; differences are to the DDIM run with the most steps. With random weights these measure how "
           "closely the solvers agree on the same probability-flow ODE, not audio quality.", ""] + \
        sampler_table(results)
    md += ["", "## Precision", "",
           "`bf16 UNet` is `generation.precision=bf16` (CPU autocast around the denoiser); `bf16 UNet+VAE+vocoder` "
           "also autocasts the VAE decode and the vocoder (as the issue's bf16 reference did; a vocoder without a "
           "network, Griffin-Lim, stays fp32). Differences are to the fp32 run with the same seed.", ""] + \
        precision_table(results)
    md += ["", "## Steps sweep (fp32, end to end)", ""] + sweep_table(results)
    md += ["", "![time per stage and steps sweep](generation.png)", ""]
    return "\n".join(md)

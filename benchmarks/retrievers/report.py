"""The retriever benchmark's report: the targets, the markdown tables and page, and the recall-against-QPS
plot."""
from __future__ import annotations

import os
from pathlib import Path

from reaudio_core.plots import save_figure

from .measure import TIE_EPS, Bandwidth

HNSW_TARGET_RECALL, HNSW_TARGET_SPEEDUP, BANDWIDTH_TARGET = 0.99, 10.0, 0.70


def fmt_table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | retriever | setting | build s | index MB | disk MB | recall@1 | recall@10 "
             "| QPS 1-query | QPS batched |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['family']} | {r['setting']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} "
                     f"| {r['disk_mb']:.0f} | {r['recall1']:.4f} | {r['recall10']:.4f} | {r['qps_single']:,.0f} "
                     f"| {r['qps_batch']:,.0f} |")
    return lines


def targets(rows: list[dict], bw: Bandwidth, threads: int) -> tuple[list[str], dict]:
    lines, status = [], {}
    syn = [r for r in rows if r["dataset"] == "synthetic"]
    exact = [r for r in syn if r["exact"]]
    if not exact:
        return ["(targets are checked on the synthetic set, which was not run)"], status
    fastest = max(exact, key=lambda r: r["qps_single"])
    duels = [r for r in syn if "head_to_head" in r]
    best = max(duels, key=lambda r: r["head_to_head"]["ratio"]) if duels else None
    met = bool(best and best["head_to_head"]["ratio"] >= HNSW_TARGET_SPEEDUP)
    status["hnsw"] = met
    if duels:
        detail = "; ".join(
            f"{r['family']} {r['setting']} (the smallest ef_search reaching it): recall@10 {r['recall10']:.4f}, "
            f"{r['head_to_head']['qps']:,.0f} queries/s against {r['head_to_head']['exact_qps']:,.0f} for the "
            f"fastest exact search = **{r['head_to_head']['ratio']:.1f}x** (median of "
            f"{r['head_to_head']['rounds']} interleaved rounds)" for r in duels)
    else:
        detail = f"no HNSW setting reached recall@10 {HNSW_TARGET_RECALL}"
    lines.append(f"- **{'MET' if met else 'NOT MET'}**: an HNSW setting with recall@10 >= {HNSW_TARGET_RECALL} at "
                 f">= {HNSW_TARGET_SPEEDUP:.0f}x exact single-query QPS on the clustered set. {detail}. "
                 f"(Fastest exact search in the sweep: {fastest['family']}, {fastest['qps_single']:,.0f} queries/s.)")
    machine = bw.best()
    for r in exact:
        r["bandwidth_fraction"] = r["gbps"] / machine
    best_exact = max(exact, key=lambda r: r["gbps"])
    met = best_exact["bandwidth_fraction"] >= BANDWIDTH_TARGET
    status["bandwidth"] = met
    parts = ", ".join(f"{r['family']} {r['gbps']:.1f} GB/s ({100 * r['bandwidth_fraction']:.0f}%; "
                      f"{100 * r['gbps'] / bw.peak():.0f}% of the fastest single bandwidth pass)" for r in exact)
    lines.append(f"- **{'MET' if met else 'NOT MET'}**: exact single-query search on the clustered set at >= "
                 f"{100 * BANDWIDTH_TARGET:.0f}% of measured memory bandwidth ({machine:.1f} GB/s on {threads} "
                 f"threads): {parts}.")
    native = next((r["native"] for r in exact if "native" in r), None)
    if native:
        one, many = native[1], native[max(native)]
        lines.append(f"  faiss's own `IndexFlatIP.search` with one query reaches {one['gbps']:.1f} GB/s "
                     f"({100 * one['gbps'] / machine:.0f}%) on 1 OpenMP thread and {many['gbps']:.1f} GB/s "
                     f"({100 * many['gbps'] / machine:.0f}%) on {max(native)}: for a few queries faiss runs its "
                     f"sequential SIMD scan parallelised over queries, so one query is scanned by one core, and one "
                     f"core reads at most {bw.best_single_core():.1f} GB/s here; more OpenMP threads do not help a "
                     f"single query (slower still, as measured). The plugins split the matrix across threads "
                     f"instead: `faiss` (index=flat) runs faiss's scan on each part in parallel and merges the "
                     f"parts' top-k, `torch` runs one single-threaded gemv + top-k per part over its column-major "
                     f"copy.")
    return lines, status


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["dataset"] == name]
        for fam in dict.fromkeys(r["family"] for r in sub):
            pts = [r for r in sub if r["family"] == fam]
            style = "o" if len(pts) == 1 else "o-"
            ax.plot([p["recall10"] for p in pts], [p["qps_single"] for p in pts], style, label=fam)
            for p in pts:
                if p["value"] is not None:
                    ax.annotate(str(p["value"]), (p["recall10"], p["qps_single"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 (ties count as hits)")
        ax.set_ylabel("queries/s, one query per call")
        ax.set_title(f"{name} (N={sub[0]['n']:,})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def markdown(rows: list[dict], datasets: list[dict], bw: Bandwidth, target_lines: list[str], quick: bool,
             threads: int, budget: float, total: float, load: tuple, cpu: str, versions: str) -> str:
    """The printed report (retrievers.md) of ``rows``."""
    md = [f"# Retriever benchmark{' (--quick: smoke-test sizes, numbers not meaningful)' if quick else ''}", "",
          f"Machine: {cpu}, {os.cpu_count()} CPUs, {threads} threads used; {versions}. "
          f"Total run time {total / 60:.1f} min; load average {load[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows every timing).", ""]
    for d in datasets:
        md.append(f"- **{d['name']}**: {d['description']} ({d['matrix_mb']:.0f} MB of float32; local intrinsic "
                  f"dimension {d['lid']:.1f}{'; ' + d['note'] if d['note'] else ''}).")
    md += ["", f"Recall is against exact search; a returned item counts as a hit when its exact score reaches the "
           f"k-th exact score (within {TIE_EPS:g}), so identical captions tie rather than cap recall. "
           f"QPS 1-query issues one query per call ({budget:g} s per setting); QPS batched searches all queries "
           f"in one call. Build = add every vector + the first search (faiss ivf trains then). HNSW graphs are "
           f"built with the registry defaults (M, efConstruction in the setting column, with the knob swept). "
           f"Local intrinsic dimension: the median maximum-likelihood estimate from the 20 nearest neighbours of "
           f"500 queries.", ""]
    md += fmt_table(rows)
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in bw.per_kernel().items())
    md += ["", "## Memory bandwidth and exact search", "",
           f"Measured read bandwidth: **{bw.best():.1f} GB/s** on {threads} threads: the median pass of the "
           f"fastest of the streaming kernels ({kernels} GB/s; fastest single pass {bw.peak():.1f} GB/s; one "
           f"core alone {bw.best_single_core():.1f} GB/s) over a {bw.nbytes / 2**30:.2f} GiB buffer, re-measured "
           f"right before every exact timing. Exact search GB/s = bytes of the float32 matrix / median time of "
           f"one single-query search (top-10 included).", "",
           "| dataset | retriever | matrix MB | QPS 1-query | median ms/query | GB/s | % of bandwidth |",
           "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["exact"]:
            md.append(f"| {r['dataset']} | {r['family']} | {r['memory_mb']:.0f} | {r['qps_single']:,.1f} "
                      f"| {r['latency_ms']:.2f} | {r['gbps']:.1f} | {100 * r['gbps'] / bw.best():.0f}% |")
            for t, v in sorted(r.get("native", {}).items()):
                md.append(f"| {r['dataset']} | faiss IndexFlatIP.search, {t} OpenMP thread{'s' * (t > 1)} "
                          f"| {r['memory_mb']:.0f} | {v['qps']:,.1f} | {v['latency_ms']:.2f} | {v['gbps']:.1f} | "
                          f"{100 * v['gbps'] / bw.best():.0f}% |")
    md += ["", "## Targets", ""] + target_lines + ["", "![recall vs queries/s](retrievers.png)", ""]
    return "\n".join(md)

"""Start-up section of the generation benchmark (issue 23, item 3): ``reaudio generate "a dog barks" -o dog.wav``
of the 20-step ``offline`` preset (on torch) and of ``--preset offline-fast`` (the distilled student, the default, on the
ONNX engine, reaudio_core/lite), interleaved in fresh processes.

* ``--repeats`` runs of each with ``--timings`` (the stage timer, :mod:`reaudio_core.timings`): medians per stage,
  the process's wall time measured from outside, and the overhead outside denoising and vocoding (wall minus
  ``denoise`` and ``vocode``) beside the issue's 3 s target;
* one more run of each under ``python -X importtime``: the modules whose import took longest, top-level (imported
  by reaudio itself) and nested (with what imported them).

The ONNX engine's bundle is exported by one untimed run first (its time is reported), into a temporary cache.

    reaudio bench generation --startup [--repeats 3] [--threads 2] [--out DIR]

Writes DIR/startup.md and DIR/startup.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reaudio_core.io import atomic_write_text

TARGET_OVERHEAD_S = 3.0  #: issue 23 item 3: outside denoising and vocoding
PROMPT = "a dog barks"
TOP = 12


PRESETS = ("offline", "offline-fast")  #: the teacher (torch, 20 steps) and the default, its student (ONNX engine)


def _command(out: Path, threads: int, preset: str = "offline") -> list[str]:
    return ["-m", "reaudio_core.cli", "generate", PROMPT, "-o", str(out), "--quiet", "--timings",
            "--threads", str(threads), "--preset", preset]


def _run(args: list[str], repo: Path, cache: Path | None = None) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"REAUDIO_CACHE": str(cache)} if cache else {})}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(repo), env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"start-up run failed ({' '.join(args)}):\n{done.stderr[-2000:]}")
    return wall, done.stderr


def parse_stages(stderr: str) -> dict[str, float]:
    """The ``--timings`` table of a run's stderr -> ``{stage: seconds}`` (without the total)."""
    stages, inside = {}, False
    for line in stderr.splitlines():
        if line.startswith("stage ") and "wall time" in line:
            stages, inside = {}, True
            continue
        parts = line.split()
        if inside and len(parts) == 3 and parts[2] == "s" and parts[0] != "total":
            stages[parts[0]] = float(parts[1])
        elif inside and parts[:1] == ["total"]:
            inside = False
    return stages


def parse_importtime(stderr: str) -> list[dict]:
    """``-X importtime`` lines -> ``[{name, depth, self_s, cumulative_s, parent}]`` (parent: the importing module)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        head, cumulative, name = line.split("|")  # "import time: SELF_US | CUMULATIVE_US | <indent>module"
        own = head.split(":", 1)[1].strip()
        if not own.isdigit():  # the header line
            continue
        text = name[1:]
        rows.append({"name": text.strip(), "depth": (len(text) - len(text.lstrip())) // 2,
                     "self_s": int(own) / 1e6, "cumulative_s": int(cumulative) / 1e6})
    for i, row in enumerate(rows):  # a module's line follows the lines of what it imported
        row["parent"] = next((r["name"] for r in rows[i + 1:] if r["depth"] < row["depth"]), None)
    return rows


def run(args, repo: Path) -> dict:
    out = args.out or (repo / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    walls, runs, imports = {p: [] for p in PRESETS}, {p: [] for p in PRESETS}, {}
    with tempfile.TemporaryDirectory(prefix="reaudio-startup-") as tmp:
        cache = Path(tmp) / "cache"
        export_s, _ = _run(_command(Path(tmp) / "export.wav", args.threads, "offline-fast"), repo, cache)
        print(f"offline-fast's first run (exports the ONNX bundle): {export_s:.2f} s", file=sys.stderr, flush=True)
        for i in range(args.repeats):
            for preset in PRESETS:  # interleaved
                wall, err = _run(_command(Path(tmp) / f"{preset}{i}.wav", args.threads, preset), repo, cache)
                walls[preset].append(wall)
                runs[preset].append(parse_stages(err))
                print(f"start-up run {i + 1}/{args.repeats}, {preset}: {wall:.2f} s", file=sys.stderr, flush=True)
        for preset in PRESETS:
            _, err = _run(["-X", "importtime", *_command(Path(tmp) / "imports.wav", args.threads, preset)], repo, cache)
            imports[preset] = parse_importtime(err)
    after = [round(x, 2) for x in os.getloadavg()]
    result = {"presets": {p: _summary(p, args, runs[p], walls[p], imports[p], [load, after]) for p in PRESETS},
              "export_s": export_s, "load_average": [load, after], "cores": os.cpu_count(),
              "repeats": args.repeats, "threads": args.threads}
    a, b = (result["presets"][p]["wall_median_s"] for p in PRESETS)
    result["wall_ratio"] = a / b
    text = "\n".join(["# Start-up: the 20-step offline preset against offline-fast (the default) on the ONNX engine", "",
                      f"Command: `reaudio bench generation --startup --repeats {args.repeats} --threads {args.threads}` "
                      f"(benchmarks/generation/startup.py), {args.repeats} interleaved fresh processes of each. "
                      f"Whole command: offline {a:.2f} s, offline-fast {b:.2f} s (median): **{a / b:.2f}x**. "
                      f"offline-fast's first run, which exports its ONNX bundle, took {export_s:.1f} s (not counted). "
                      f"Load average (1, 5, 15 min) before {load}, after {after}, on {os.cpu_count()} cores.", ""]
                     + [markdown(result["presets"][p]) for p in PRESETS])
    print(text)
    atomic_write_text(out / "startup.md", text)
    atomic_write_text(out / "startup.json", json.dumps(result, indent=1))
    print(f"# wrote {out / 'startup.md'}, {out / 'startup.json'}", file=sys.stderr)
    return result


def _summary(preset: str, args, runs: list[dict], walls: list[float], imports: list[dict], load) -> dict:
    names = list(dict.fromkeys(n for r in runs for n in r))
    stages = {n: statistics.median(r.get(n, 0.0) for r in runs) for n in names}
    overheads = [w - r.get("denoise", 0.0) - r.get("vocode", 0.0) for w, r in zip(walls, runs)]
    return {"preset": preset, "command": f'reaudio generate "{PROMPT}" -o dog.wav --timings --threads {args.threads} '
            f"--preset {preset}", "repeats": args.repeats, "threads": args.threads, "stages_median_s": stages,
            "runs": runs, "wall_s": walls, "wall_median_s": statistics.median(walls),
            "overhead_median_s": statistics.median(overheads), "target_overhead_s": TARGET_OVERHEAD_S,
            "import_total_s": sum(r["cumulative_s"] for r in imports if r["depth"] == 0),
            "imports_top": sorted((r for r in imports if r["depth"] == 0), key=lambda r: -r["cumulative_s"])[:TOP],
            "imports_nested_top": sorted((r for r in imports if r["depth"] > 0 and r["parent"] and
                                          not r["name"].startswith(r["parent"].split(".")[0] + ".")),
                                         key=lambda r: -r["cumulative_s"])[:TOP],
            "load_average": load, "cores": os.cpu_count()}


def markdown(r: dict) -> str:
    met = r["overhead_median_s"] <= r["target_overhead_s"]
    from reaudio_core.config import compose
    steps = compose(r.get("preset", "offline"))["generation"]["steps"]
    what = {"offline": "the 20-step offline preset: MiniLM, FAISS, two small UNets, VAE, Griffin-Lim on torch",
            "offline-fast": "the distilled student on the ONNX engine: the same parts as exported graphs under ONNX "
                            "Runtime and numpy, no torch"}.get(r.get("preset"), "the shipped offline preset")
    what += f"; {steps} steps"
    lines = [f"## {r.get('preset', 'offline')}", "",
             f"Each run is a fresh process of `{r['command']}` ({what}; 5.12 s at 16 kHz).", "",
             "| stage (median of runs) | wall (s) |", "|---|---|"]
    lines += [f"| {name} | {s:.2f} |" for name, s in r["stages_median_s"].items()]
    lines += [f"| process wall, measured outside | {r['wall_median_s']:.2f} |",
              f"| **overhead outside denoise and vocode** | **{r['overhead_median_s']:.2f}** "
              f"(target <= {r['target_overhead_s']:.0f}: {'met' if met else 'not met'}) |", "",
              "`start` is the process up to the command's body (interpreter and `reaudio_core.cli`); `build` includes "
              "the lazy imports (torch, transformers and diffusers; onnxruntime on the ONNX engine), model building "
              "or opening the bundle, and weight loading.", "",
              f"Imports (`-X importtime`, one run): {r['import_total_s']:.2f} s in all. Top-level, by cumulative time:",
              "", "| module | cumulative (s) |", "|---|---|"]
    lines += [f"| {m['name']} | {m['cumulative_s']:.2f} |" for m in r["imports_top"]]
    lines += ["", "Heaviest imports of one library by another:", "", "| module | imported by | cumulative (s) |",
              "|---|---|---|"]
    lines += [f"| {m['name']} | {m['parent']} | {m['cumulative_s']:.2f} |" for m in r["imports_nested_top"]]
    lines += ["", "Every run's wall (s): " + ", ".join(f"{w:.2f}" for w in r["wall_s"]), ""]
    return "\n".join(lines)

"""The offline-fast preset: ``fast`` (distil the shipped offline model and package the student into
plugins/weights/offline-fast/) and ``fast-check`` (teacher against student in one run: denoising and whole-command
wall time, classifier top-1 / top-5 over the 50 class prompts x seeds, FAD against the real clips)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from reaudio_core.io import replace_dir

from . import settings
from .checks import _classifier, _classifier_name, _classify, _score
from .stages import reaudio

TEACHER = "pkg:reaudio_plugins/weights/offline"
#: the distillations, in order: the 4-step student of the shipped model, then the 8-step student continued from it
#: (training.student_init), which is the shipped preset
CONFIGS = ("configs/offline-fast.yaml", "configs/offline-fast8.yaml")


def _run_dir(config: str = CONFIGS[-1]) -> Path:
    return settings.RUNS / Path(config).stem


def fast(args) -> None:
    """``reaudio distill`` of the shipped model (:data:`CONFIGS`, each resumed or skipped when done), then the last
    student's denoiser, each weight file stored as its 4-bit difference from the teacher's (``write_delta``), into
    plugins/weights/offline-fast/ with the preset's config.yaml and model card."""
    from safetensors.torch import load_file

    from reaudio_core.config import compose, save_config
    from reaudio_plugins._ckpt import write_delta
    for config in CONFIGS:
        run = _run_dir(config)
        if not (run / "final" / "config.yaml").exists():
            resume = ["--resume"] if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()) else []
            reaudio("distill", "--teacher", TEACHER, "--out", str(run), "--config", config, *resume,
                    procs=args.procs)
    shipped = settings.SHIPPED.with_name("offline-fast")
    tmp = shipped.with_name(".tmp-offline-fast")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(run / "final" / "denoiser", tmp / "denoiser")
    for f in (tmp / "denoiser").rglob("*.safetensors"):  # read back as teacher + difference by read_weights
        write_delta(f, load_file(f), settings.SHIPPED / "denoiser" / f.relative_to(tmp / "denoiser"))
    cfg = compose("offline-fast")
    cfg["generation"]["model"] = None
    save_config(cfg, tmp)
    card = settings.REPO / "docs" / "offline-fast-card.md"
    if card.is_file():
        shutil.copy(card, tmp / "README.md")
    replace_dir(tmp, shipped)
    size = sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file())
    print(f"packaged {shipped} ({size / 2**20:.1f} MiB)")


def _timed_denoiser(pipe, clock: list) -> None:
    """Wrap the pipeline's denoiser so that every call adds its wall time to ``clock[0]``."""
    inner = pipe.denoiser

    class Timed:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                clock[0] += time.perf_counter() - t0

    pipe.denoiser = Timed()


def _command_seconds(preset: str, out: Path, *extra: str) -> float:
    """One ``reaudio generate "a dog barks" --preset PRESET`` in a fresh process (ONNX bundles cached in runs/)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REAUDIO_CACHE": str(settings.RUNS / "fast-check" / "cache")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reaudio_core.cli", "generate", "a dog barks", "-o", str(out), "--preset",
                    preset, "--quiet", *extra], check=True, cwd=settings.REPO, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


class _Engine:
    """The ONNX engine's runner (what ``reaudio generate --preset offline-fast`` runs) called like a pipeline, its
    denoiser calls timed into ``clock[0]``."""

    def __init__(self, bundle: Path, clock: list):
        from reaudio_core.lite.run import Lite
        self.lite, self.clock = Lite(bundle), clock
        g = self.lite.cfg["generation"]
        self.cfg = {"generation": {**g, "engine": "onnx"}, "_model": str(bundle)}
        inner = self.lite.denoise

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                clock[0] += time.perf_counter() - t0
        self.lite.denoise = timed
        self.denoiser = type("D", (), {"guidance_input": True})()

    def __call__(self, prompts, seed=None, progress=False):
        import torch
        g = self.cfg["generation"]
        prompts = [prompts] if isinstance(prompts, str) else prompts
        waves = [self.lite(p, seed=g["seed"] if seed is None else seed, steps=g["steps"], guidance=g["guidance"],
                           duration=g["duration"], k=g["k"])[0] for p in prompts]
        return type("G", (), {"waveforms": torch.from_numpy(np.stack(waves))})()


def fast_check(args) -> None:
    """Teacher (the offline preset, 20 DPM-Solver++ steps, guidance batched) against the student (offline-fast, or
    ``--model DIR``), measured in one run -> docs/results/offline-fast.{md,json}."""
    import numpy as np
    import torch

    from reaudio_core.audio import load_audio
    from reaudio_core.evaluation import frechet_distance, gaussian
    from reaudio_core.pipeline import ReAudioPipeline
    import csv
    n_seeds = args.seeds or 2
    seeds = list(range(n_seeds))
    labels = _classify([np.zeros(16000, np.float32)])[0]
    prompts = [label.replace("_", " ") for label in labels]
    targets = [t for _ in seeds for t in labels]
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    clf = _classifier()
    real = np.concatenate(clf.embed_frames([load_audio(settings.DATA / r["file"]) for r in rows]))
    mu_r, sig_r = gaussian(real)
    models = {"teacher": ReAudioPipeline.from_preset("offline"),
              "student": (ReAudioPipeline.from_pretrained(args.model) if args.model
                          else ReAudioPipeline.from_preset("offline-fast"))}
    tmp = settings.RUNS / "fast-check"
    tmp.mkdir(parents=True, exist_ok=True)
    export_s = None
    if not args.model:  # the command's engine: its first run exports the ONNX bundle (timed apart), later runs use it
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        export_s = _command_seconds("offline-fast", tmp / "export.wav")
        import yaml
        bundle = Path(yaml.safe_load((tmp / "export.wav.config.yaml").read_text())["weights"]["onnx_bundle"])
        models["student-onnx"] = None  # opened after the clocks exist
    results = {"classifier": _classifier_name(), "sample_rate": 16000, "seeds": seeds,
               "prompts": "the 50 ESC-50 class names, underscores as spaces", "clips_per_model": len(targets),
               "fad_reference": f"the {len(rows)} real ESC-50 fold-4 clips (esc50-classifier frames)",
               "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}
    clocks = {name: [0.0] for name in models}
    if "student-onnx" in models:
        models["student-onnx"] = _Engine(bundle, clocks["student-onnx"])
        results["export_s"] = export_s
    waves = {name: [] for name in models}
    wall = {name: 0.0 for name in models}
    for name, pipe in models.items():
        if not isinstance(pipe, _Engine):
            _timed_denoiser(pipe, clocks[name])
        results[name] = {"generation": {k: pipe.cfg["generation"][k] for k in ("sampler", "steps", "guidance", "k",
                                                                                "retrieval", "duration", "engine")},
                         "model": str(pipe.cfg["generation"]["model"] or pipe.cfg.get("_model")),
                         "one_call_per_step": bool(getattr(pipe.denoiser, "guidance_input", False))}
    for seed in seeds:  # interleaved: each prompt batch by the teacher, then by the student
        for i in range(0, len(prompts), 10):
            for name, pipe in models.items():
                t0 = time.perf_counter()
                out = pipe(prompts[i:i + 10], seed=seed, progress=False)
                wall[name] += time.perf_counter() - t0
                waves[name] += list(out.waveforms)
    for name in models:
        _, probs = _classify(waves[name])
        score = _score(labels, probs, targets)
        frames = np.concatenate(clf.embed_frames([w.numpy() for w in waves[name]]))
        mu, sig = gaussian(frames)
        n = len(waves[name])
        results[name].update(top1=score["top1"], top5=score["top5"], p_target=score["p_target"],
                             fad=frechet_distance(mu, sig, mu_r, sig_r),
                             denoise_s_per_clip=clocks[name][0] / n, call_s_per_clip=wall[name] / n)
    one = {name: [] for name in models}  # one prompt, one clip: what a single command denoises
    for _ in range(args.repeats or 3):
        for name, pipe in models.items():
            clocks[name][0] = 0.0
            pipe("a dog barks", progress=False)
            one[name].append(clocks[name][0])
    for name in models:
        results[name]["denoise_s_one_clip"] = statistics.median(one[name])
    # whole command (a fresh process each): interleaved pairs
    commands = {"teacher": ("offline",), "student": ("offline-fast", "--engine", "torch"),
                "student-onnx": ("offline-fast",)}  # the last is the preset as shipped: its engine is onnx
    commands = {k: v for k, v in commands.items() if k in models}
    cmd = {name: [] for name in commands}
    for _ in range(args.repeats or 3):  # interleaved
        for name, c in commands.items():
            cmd[name].append(_command_seconds(c[0], tmp / f"{name}.wav", *c[1:]))
    results["command_s"] = {k: statistics.median(v) for k, v in cmd.items()}
    results["command_runs"] = cmd
    results["load_average_end"] = os.getloadavg()[0]
    t = results["teacher"]
    shipped = "student-onnx" if "student-onnx" in models else "student"  # what `reaudio generate --preset` runs
    s = results[shipped]
    results["ratios"] = {"denoise_speedup": t["denoise_s_one_clip"] / s["denoise_s_one_clip"],
                         "denoise_speedup_torch": t["denoise_s_one_clip"] / results["student"]["denoise_s_one_clip"],
                         "denoise_speedup_batch10": t["denoise_s_per_clip"] / results["student"]["denoise_s_per_clip"],
                         "command_speedup": results["command_s"]["teacher"] / results["command_s"][shipped],
                         "command_speedup_torch": results["command_s"]["teacher"] / results["command_s"]["student"],
                         "top1_diff": s["top1"] - t["top1"], "top5_diff": s["top5"] - t["top5"],
                         "fad_ratio": s["fad"] / t["fad"], "compared": shipped}
    settings.RESULTS.mkdir(parents=True, exist_ok=True)
    (settings.RESULTS / "offline-fast.json").write_text(json.dumps(results, indent=2))
    markdown(results)


def markdown(results: dict) -> None:
    """docs/results/offline-fast.md from fast-check's results (``python -c "import json; from research.offline_preset
    import fast; fast.markdown(json.load(open('docs/results/offline-fast.json')))"`` rewrites it)."""
    r, t = results["ratios"], results["teacher"]
    shipped = r["compared"]
    s = results[shipped]
    models = [name for name in ("teacher", "student", "student-onnx") if name in results]
    md = [f"Teacher: the offline preset; student: {results['student']['model']} ({s['generation']['steps']} "
          f"{s['generation']['sampler']} steps, one denoiser call per step with the guidance scale as input), on torch "
          f"(`--engine torch`, the Python API) and on the ONNX engine (the preset's default in `reaudio generate`; "
          f"its first command exported the bundle in {results.get('export_s') or 0:.1f} s, not counted). "
          f"Classifier: {results['classifier']}; 16 kHz; {results['clips_per_model']} clips per model (50 class "
          f"prompts x {len(results['seeds'])} seeds), 5.12 s each, each preset at its own guidance scale; FAD against "
          f"{results['fad_reference']}. {results['threads']} threads; load average "
          f"{results['load_average_start']:.1f} at the start, {results['load_average_end']:.1f} at the end. Whole "
          f"command runs (s): " + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}"
                                            for k, v in results["command_runs"].items()) + ".", "",
          "| model | engine | steps | guidance | denoiser calls | denoising s, one clip (median) | denoising s/clip, "
          "batches of 10 | pipeline call s/clip, batches of 10 | whole command s (`reaudio generate`, median) | top-1 "
          "| top-5 | FAD |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name in models:
        m = results[name]
        kind = "batch 1" if m["one_call_per_step"] else "batch 2: guidance batched"
        preset = "offline" if name == "teacher" else "offline-fast"
        md.append(f"| {name.split('-')[0]} ({preset}) | {m['generation']['engine']} | {m['generation']['steps']} "
                  f"| {m['generation']['guidance']:g} | {m['generation']['steps']} ({kind}) "
                  f"| {m['denoise_s_one_clip']:.3f} | {m['denoise_s_per_clip']:.3f} "
                  f"| {m['call_s_per_clip']:.3f} | {results['command_s'][name]:.2f} "
                  f"| {m['top1']:.3f} | {m['top5']:.3f} | {m['fad']:.2f} |")
    md += ["", f"`reaudio generate --preset offline-fast` ({shipped}) against the teacher: denoising one clip "
           f"{r['denoise_speedup']:.1f}x faster (target >= 8x; the student on torch {r['denoise_speedup_torch']:.1f}x, "
           f"{r['denoise_speedup_batch10']:.1f}x in batches of 10), whole command {r['command_speedup']:.2f}x "
           f"(target >= 2x; on torch {r['command_speedup_torch']:.2f}x), top-1 {r['top1_diff']:+.3f} and top-5 "
           f"{r['top5_diff']:+.3f} (target within 0.05), FAD x{r['fad_ratio']:.3f} (target within 10%)."]
    (settings.RESULTS / "offline-fast.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


SWEEP = [(8, 5.0), (8, 4.0), (8, 3.0), (4, 5.0)]  #: (steps, guidance); the preset's first


def fast_sweep(args) -> None:
    """The shipped student on the ONNX engine at other step counts and guidance scales (the same 50 class prompts x
    2 seeds, classifier and FAD reference as fast-check) -> docs/results/offline-fast-sweep.{md,json}."""
    import csv

    import yaml

    from reaudio_core.audio import load_audio
    from reaudio_core.evaluation import frechet_distance, gaussian
    tmp = settings.RUNS / "fast-check"
    tmp.mkdir(parents=True, exist_ok=True)
    _command_seconds("offline-fast", tmp / "sweep.wav")  # the bundle (exported once per cache)
    bundle = Path(yaml.safe_load((tmp / "sweep.wav.config.yaml").read_text())["weights"]["onnx_bundle"])
    labels = _classify([np.zeros(16000, np.float32)])[0]
    prompts = [label.replace("_", " ") for label in labels]
    seeds = list(range(args.seeds or 2))
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    clf = _classifier()
    mu_r, sig_r = gaussian(np.concatenate(clf.embed_frames([load_audio(settings.DATA / r["file"]) for r in rows])))
    engine = _Engine(bundle, [0.0])
    results = []
    for steps, guidance in SWEEP:
        engine.cfg["generation"].update(steps=steps, guidance=guidance)
        waves = [w for seed in seeds for w in engine(prompts, seed=seed).waveforms]
        _, probs = _classify(waves)
        score = _score(labels, probs, [t for _ in seeds for t in labels])
        mu, sig = gaussian(np.concatenate(clf.embed_frames([w.numpy() for w in waves])))
        results.append({"steps": steps, "guidance": guidance, "top1": score["top1"], "top5": score["top5"],
                        "fad": frechet_distance(mu, sig, mu_r, sig_r)})
        print(results[-1], flush=True)
    (settings.RESULTS / "offline-fast-sweep.json").write_text(json.dumps(results, indent=2))
    md = [f"The shipped offline-fast student on the ONNX engine (`reaudio generate --preset offline-fast`), "
          f"{_classifier_name()}, 16 kHz, 50 class prompts x {len(seeds)} seeds = {len(seeds) * 50} clips of 5.12 s "
          f"per row, FAD against the 400 real ESC-50 fold-4 clips. Command: `python -m research.offline_preset "
          f"fast-sweep`. The teacher (20 DPM-Solver++ steps, guidance 5): docs/results/offline-fast.md.", "",
          "| steps | guidance | top-1 | top-5 | FAD |", "|--:|--:|--:|--:|--:|"]
    md += [f"| {r['steps']} | {r['guidance']:g} | {r['top1']:.3f} | {r['top5']:.3f} | {r['fad']:.2f} |" for r in results]
    (settings.RESULTS / "offline-fast-sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

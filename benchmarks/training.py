#!/usr/bin/env python
"""Training throughput on CPU: samples/s per stage and size, and 2-process DDP scaling.

Configurations (random weights, synthetic tone-plus-noise clips, a MiniLM database over them):

  tiny     the test sizes: VAE [8, 16, 16], UNet ``tiny``, 1.28 s crops
  offline  configs/offline-vae.yaml + configs/offline-ldm.yaml as shipped (5.12 s crops), with the
           data and VAE paths replaced by the synthetic stand-ins
  s        reference sizes: VAE [128, 256, 512] x 2 res blocks, UNet ``s`` (128 x [1, 2, 3, 5]),
           10.24 s crops (AudioLDM-S), MiniLM prompt / caption widths

For each: the VAE stage and the LDM stage (cached latents as in the offline config, else the VAE
encoder runs every step), timed over ``--steps`` steps after ``--warmup`` steps, in one process
with 1 and with 2 torch threads. DDP scaling: the same LDM stage under ``torchrun
--nproc_per_node 2`` (gloo, one thread per process) against one process with two threads.
Samples/s counts every process's batch. Wall-clock numbers depend on what else runs on the
machine: the report states the load average before and after.

    python benchmarks/training.py [--configs tiny,offline,s] [--steps N] [--warmup N] [--out DIR]
    reaudio bench training [same flags]

With --out DIR it also writes DIR/training.md (the printed report) and DIR/training.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reaudio_core import create  # noqa: E402
from reaudio_core.config import compose  # noqa: E402
from reaudio_core.training import LOG_FILE, train  # noqa: E402

SIZES = {
    "tiny": {"crop": 1.28, "batch": 4,
             "vae": {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8,
                     "norm_num_groups": 4},
             "unet": {"size": "tiny"}, "cache_latents": False, "num_tokens": 8},
    "s": {"crop": 10.24, "batch": 2,
          "vae": {"block_out_channels": [128, 256, 512], "layers_per_block": 2, "latent_channels": 8,
                  "norm_num_groups": 32},
          "unet": {"size": "s"}, "cache_latents": False, "num_tokens": 32},
}


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def make_data(root: Path, n: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,caption,label"]
    words = ["a dog barks", "rain on a roof", "church bells", "a siren wails"]
    for i in range(n):
        t = np.arange(int(seconds * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(root / f"clip{i:03d}.wav"), wav.astype(np.float32), 16000)
        rows.append(f"clip{i:03d}.wav,{words[i % len(words)]},{i % len(words)}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def configs(name: str, work: Path, manifest: Path, db: Path, steps: int) -> tuple[dict, dict]:
    """(vae-stage config, ldm-stage config) as plain dicts (YAML layers)."""
    run = {"max_steps": steps, "log_every": 1, "checkpoint_every": 10 ** 6, "warmup_steps": 0,
           "manifest": [str(manifest)], "database": str(db), "num_workers": 0}
    vae_dir = work / f"{name}-vae"
    if name == "offline":
        vae = yaml.safe_load((REPO / "configs" / "offline-vae.yaml").read_text())
        ldm = yaml.safe_load((REPO / "configs" / "offline-ldm.yaml").read_text())
        vae["training"].update(run)
        ldm["training"].update(run)
        ldm["decoder"]["params"]["checkpoint"] = str(vae_dir)
        ldm["audio_encoder"]["params"]["weights"] = str(vae_dir)
        ldm["generation"]["database"] = str(db)
        vae_params = vae["decoder"]["params"]
    else:
        z = SIZES[name]
        vae_params = z["vae"]
        common = {"crop_seconds": z["crop"], "batch_size": z["batch"], **run}
        vae = {"decoder": {"name": "vae", "params": vae_params},
               "training": {"stage": "vae", "ema_decay": 0, **common}}
        ldm = {"preset": "offline", "caption_encoder": "minilm",
               "audio_encoder": {"name": "vae-latent", "params": {"weights": str(vae_dir), "num_tokens": z["num_tokens"]}},
               "decoder": {"name": "vae", "params": {"checkpoint": str(vae_dir)}},
               "denoiser": {"name": "unet-ldm", "params": {**z["unet"], "prompt_dim": 384, "text_dim": 384,
                                                            "audio_dim": 128}},
               "vocoder": {"name": "griffin-lim"},
               "generation": {"retrieval": "audio+text", "k": 3, "duration": z["crop"], "database": str(db)},
               "training": {"stage": "ldm", "cache_latents": z["cache_latents"], **common}}
    if not vae_dir.exists():
        torch.manual_seed(0)
        create("decoder", "vae", **vae_params, scale_factor=1.0).save_pretrained(vae_dir)
    return vae, ldm


def timing(out: Path, warmup: int, per_step_samples: int) -> dict:
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    if len(rows) <= warmup:
        raise SystemExit(f"only {len(rows)} logged steps in {out}; raise --steps")
    t = [r["elapsed_s"] for r in rows]
    n = len(rows) - warmup
    sec = (t[-1] - t[warmup - 1]) / n if warmup > 0 else t[-1] / n
    return {"s_per_step": sec, "samples_per_s": per_step_samples / sec, "loss": rows[-1]["loss"]}


def run_single(layer: dict, work: Path, tag: str, threads: int, warmup: int) -> dict:
    layer = copy.deepcopy(layer)
    layer["training"]["threads"] = threads
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(layer))
    out = work / f"run-{tag}"
    cfg = compose(None, [path])
    train(cfg, out, progress=False)
    return timing(out, warmup, cfg["training"]["batch_size"])


def run_ddp(layer: dict, work: Path, tag: str, warmup: int) -> dict:
    layer = copy.deepcopy(layer)
    layer["training"]["threads"] = 1
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(layer))
    out = work / f"run-{tag}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reaudio_core.cli", "train", "--config", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-4000:]}")
    return timing(out, warmup, 2 * layer["training"]["batch_size"])


def main(argv=None) -> dict:
    """Parse ``argv`` (default: the command line), run the measurements, print the report; returns the results."""
    ap = argparse.ArgumentParser(prog="reaudio bench training", description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,offline,s")
    ap.add_argument("--steps", type=int, default=6, help="timed steps after warm-up (default 6)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--s-steps", type=int, default=2, help="timed steps for the s configuration (slow on CPU)")
    ap.add_argument("--threads", default="1,2", help="torch threads per single process to measure (default 1,2)")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--out", default=None, help="also write DIR/training.md and DIR/training.json")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "load_before": load_average()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="reaudio-bench-train-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        manifest = make_data(data, 16, 10.24)
        from reaudio_core.database import build_database
        db = work / "db"
        build_database([manifest], db, compose("offline", overrides=["retriever=torch", "database.neighbours=8"]),
                       progress=False)
        for name in names:
            steps = (args.s_steps if name == "s" else args.steps) + args.warmup
            vae, ldm = configs(name, work, manifest, db, steps)
            for stage, layer in (("vae", vae), ("ldm", ldm)):
                for threads in [int(x) for x in args.threads.split(",")]:
                    tag = f"{name}-{stage}-t{threads}"
                    print(f"running {tag} ...", file=sys.stderr, flush=True)
                    r = run_single(layer, work, tag, threads, args.warmup)
                    results["runs"].append({"config": name, "stage": stage, "procs": 1, "threads": threads,
                                            "batch": layer["training"]["batch_size"],
                                            "crop_s": layer["training"]["crop_seconds"], **r})
            if not args.no_ddp and name != "s":
                tag = f"{name}-ldm-ddp2"
                print(f"running {tag} ...", file=sys.stderr, flush=True)
                r = run_ddp(ldm, work, tag, args.warmup)
                results["runs"].append({"config": name, "stage": "ldm", "procs": 2, "threads": 1,
                                        "batch": ldm["training"]["batch_size"],
                                        "crop_s": ldm["training"]["crop_seconds"], **r})
    results["machine"]["load_after"] = load_average()
    report = render(results)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.md").write_text(report + "\n")
        (out / "training.json").write_text(json.dumps(results, indent=2))
    return results


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Training throughput (CPU, {m['cpus']} cores, torch {m['torch']})", "",
             f"Load average (1/5/15 min) before: {m['load_before']}, after: {m['load_after']}.", "",
             "| config | stage | processes x threads | batch / process | crop (s) | s / step | samples / s |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['config']} | {r['stage']} | {r['procs']} x {r['threads']} | {r['batch']} | {r['crop_s']} | "
                     f"{r['s_per_step']:.3f} | {r['samples_per_s']:.2f} |")
    ddp = [r for r in results["runs"] if r["procs"] == 2]
    if ddp:
        lines += ["", "DDP scaling (LDM stage, gloo): 2 processes x 1 thread against 1 process x 2 threads "
                  "and 1 process x 1 thread, samples/s.", "",
                  "| config | 1 x 1 | 1 x 2 | 2 x 1 (DDP) | DDP / (1 x 2) | DDP / (1 x 1) |", "|---|---|---|---|---|---|"]
        for r in ddp:
            one = {x["threads"]: x["samples_per_s"] for x in results["runs"]
                   if x["config"] == r["config"] and x["stage"] == "ldm" and x["procs"] == 1}
            a, b, d = one.get(1, float("nan")), one.get(2, float("nan")), r["samples_per_s"]
            lines.append(f"| {r['config']} | {a:.2f} | {b:.2f} | {d:.2f} | {d / b:.2f} | {d / a:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

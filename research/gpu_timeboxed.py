"""Train the offline preset's GPU recipe inside a fixed time box (say a GPU lent for a few minutes). Not yet
run on a GPU: the shipped weights come from the CPU recipe (python -m research.offline_preset train).

    python research/gpu_timeboxed.py --seconds 540 --pack OUTDIR

1. Probes: ``reaudio train`` of configs/offline-gpu-vae.yaml and configs/offline-gpu-ldm.yaml for a few
   steps each (into runs/probe-*), which also checks the whole path (data, caches, export) before the real
   runs, and reads their steps/s from log.jsonl.
2. Picks ``training.max_steps`` for both stages so that they end inside the box (the VAE gets
   ``--vae-share`` of the training time), and trains them into runs/offline-gpu-vae and runs/offline-gpu-ldm.
   ``--vae DIR`` skips the VAE stage (probe and run) and gives the whole box to the LDM, on the latents of
   the VAE exported in DIR (a ``final/decoder`` directory, e.g. one trained on CPU with configs/offline-vae2.yaml).
3. ``--pack DIR``: the final exports with float weights halved (what the preset ships anyway), their
   logs and ``timebox.json`` (the chosen max_steps, measured rates, wall times), as a tar cut in 15 MB parts.

``python research/gpu_timeboxed.py --prepare [--db runs/esc50-db]`` (on a machine with MiniLM installed, before copying the repository to
a GPU box that has neither MiniLM's weights nor faiss): builds runs/esc50-db with ``retriever=torch`` and fills its
text caches (prompt embeddings, empty inputs, caption states) with a 1-step ldm run on a 2-step scratch VAE, so
the ldm stage trains there without the text encoder (docs/training.md). Then copy runs/esc50-db and the audio
(kept at the same absolute path as the database's item paths) along.

Once a run is kept, write the chosen max_steps into configs/offline-gpu-*.yaml, so that the two
``reaudio train`` commands repeat it without any probing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"
VAE_CFG, LDM_CFG = "configs/offline-gpu-vae.yaml", "configs/offline-gpu-ldm.yaml"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


EXTRA: list[str] = []


def train(config: str, out: Path, *overrides: str) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "reaudio_core.cli", "train", "--config", config, "--out", str(out), "--quiet",
           *overrides, *EXTRA]
    log("$ " + " ".join(cmd[2:]))
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    log(f"  done in {time.time() - t:.0f} s")
    return time.time() - t


def samples_per_s(out: Path) -> float:
    """Samples per second over the logged rows after the first (which include warm-up)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    late = rows[1:] or rows
    return sum(r["samples_per_s"] for r in late) / len(late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help="the whole box, probes and exports included")
    ap.add_argument("--prepare", action="store_true", help="only build runs/esc50-db (torch retriever) and its text caches")
    ap.add_argument("--vae-share", type=float, default=0.35, help="share of the training time for the VAE")
    ap.add_argument("--probe-steps", type=int, default=60)
    ap.add_argument("--reserve", type=float, default=45.0, help="seconds kept for start-up, caching and export")
    ap.add_argument("--pack", type=Path, default=None)
    ap.add_argument("--vae", type=Path, default=None, help="a trained VAE export (final/decoder): skip the VAE stage")
    ap.add_argument("--db", type=Path, default=RUNS / "esc50-db", help="with --prepare: where to build the database")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (a quick CPU rehearsal: --set training.batch_size=2)")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.db)
        return
    if args.seconds is None:
        ap.error("--seconds is required (or --prepare)")
    EXTRA[:] = args.set
    import yaml
    batches = [yaml.safe_load((REPO / c).read_text())["training"]["batch_size"] for c in (VAE_CFG, LDM_CFG)]
    for o in EXTRA:
        if o.startswith("training.batch_size="):
            batches = [int(o.split("=", 1)[1])] * 2
    vae_batch, ldm_batch = batches
    n = args.probe_steps
    probe_vae, probe_ldm = RUNS / "probe-gpu-vae", RUNS / "probe-gpu-ldm"
    every = [f"training.log_every={max(1, n // 4)}", f"training.checkpoint_every={n}"]
    if args.vae is not None:
        if not (args.vae / "config.json").is_file():
            raise SystemExit(f"--vae {args.vae}: no exported VAE there (config.json missing)")
        vae_dir, vae_rate, vae_share, fixed = args.vae.resolve(), 0.0, 0.0, 0.0
    else:
        t_vae_probe = train(VAE_CFG, probe_vae, f"training.max_steps={n}", *every)
        vae_rate = 0.9 * samples_per_s(probe_vae) / vae_batch  # 0.9: checkpoints and logging cost a little more
        vae_dir, vae_share = probe_vae / "final" / "decoder", args.vae_share
        # fixed costs of a run (start-up, caching, export): the probe's wall time minus its training steps
        fixed = max(0.0, t_vae_probe - n / vae_rate)
    on_vae = [f"decoder.params.checkpoint={vae_dir}", f"audio_encoder.params.weights={vae_dir}"]
    t_ldm_probe = train(LDM_CFG, probe_ldm, f"training.max_steps={n}", *every, *on_vae)
    ldm_rate = 0.9 * samples_per_s(probe_ldm) / ldm_batch
    fixed += max(0.0, t_ldm_probe - n / ldm_rate)
    left = args.seconds - (time.time() - T0) - fixed - args.reserve
    if left <= 60:
        raise SystemExit(f"only {left:.0f} s left for training after the probes: nothing trained")
    vae_steps = max(100, int(left * vae_share * vae_rate) // 100 * 100) if args.vae is None else 0
    ldm_steps = max(100, int(left * (1 - vae_share) * ldm_rate) // 100 * 100)
    log(f"rates: vae {vae_rate:.1f} steps/s, ldm {ldm_rate:.1f} steps/s; fixed {fixed:.0f} s; "
        f"{left:.0f} s to train -> vae {vae_steps} steps, ldm {ldm_steps} steps")
    summary = {"box_s": args.seconds, "probe_steps": n, "vae_steps_per_s": vae_rate, "ldm_steps_per_s": ldm_rate,
               "vae_max_steps": vae_steps, "ldm_max_steps": ldm_steps, "vae": str(args.vae) if args.vae else None}
    import torch
    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if args.vae is None:
        summary["vae_wall_s"] = train(VAE_CFG, RUNS / "offline-gpu-vae", f"training.max_steps={vae_steps}")
        on_vae = []  # the LDM config reads runs/offline-gpu-vae
    summary["ldm_wall_s"] = train(LDM_CFG, RUNS / "offline-gpu-ldm", f"training.max_steps={ldm_steps}", *on_vae)
    summary["total_s"] = time.time() - T0
    (RUNS / "timebox.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps(summary))
    if args.pack:
        pack(args.pack, ["offline-gpu-ldm"] if args.vae else ["offline-gpu-vae", "offline-gpu-ldm"])


def prepare(db: Path) -> None:
    if db.exists():
        raise SystemExit(f"{db} exists: move it away first (--prepare builds it with retriever=torch)")
    data = Path(os.environ.get("REAUDIO_DATA") or REPO.parent / "shared" / "data")
    manifest = data / "esc50-fold4" / "metadata.csv"
    subprocess.run([sys.executable, "-m", "reaudio_core.cli", "index", "build", "--manifest", str(manifest),
                    "--out", str(db), "--quiet", "retriever=torch"], check=True, cwd=REPO)
    vae, ldm = RUNS / "prepare-vae", RUNS / "prepare-ldm"
    train(VAE_CFG, vae, "training.max_steps=2", "training.batch_size=2", "training.num_workers=0")
    train(LDM_CFG, ldm, "training.max_steps=1", "training.batch_size=2", "training.num_workers=0",
          f"training.database={db}", f"generation.database={db}",
          f"decoder.params.checkpoint={vae}/final/decoder", f"audio_encoder.params.weights={vae}/final/decoder")
    for d in (vae, ldm):
        shutil.rmtree(d)
    features = db / (db / "CURRENT").read_text().strip() / "features"
    for f in features.iterdir():
        if f.name.startswith("audio_encoder-"):  # the scratch VAE's tokens: recomputed with the real VAE anyway
            shutil.rmtree(f)
    log(f"{db} ready: " + ", ".join(sorted(f.name for f in features.iterdir())))


def pack(dest: Path, names: list[str]) -> None:
    from safetensors.torch import load_file, save_file
    stage = RUNS / "pack"
    shutil.rmtree(stage, ignore_errors=True)
    for name in names:
        shutil.copytree(RUNS / name / "final", stage / name / "final")
        shutil.copy(RUNS / name / "log.jsonl", stage / name / "log.jsonl")
        for f in (stage / name / "final").rglob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f)
    shutil.copy(RUNS / "timebox.json", stage / "timebox.json")
    dest.mkdir(parents=True, exist_ok=True)
    tar = RUNS / "pack.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(stage, arcname="pack")
    data = tar.read_bytes()
    part = 15 * 2**20
    for i in range(0, len(data), part):
        (dest / f"pack.tar.{i // part:02d}").write_bytes(data[i:i + part])
    log(f"packed {len(data) / 2**20:.1f} MiB into {dest}")


if __name__ == "__main__":
    main()

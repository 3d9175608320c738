"""The stages that make the shipped weights: ``train`` (every training run into runs/), ``package`` (the
preset's folder plugins/weights/offline/) and ``experts`` (a pipeline directory with a low-noise expert)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reaudio_core.io import replace_dir

from . import settings


def reaudio(*args: str, procs: int = 1) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "reaudio_core.cli"] if procs > 1 else [sys.executable, "-m", "reaudio_core.cli"]) + list(args)
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=settings.REPO)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _train_stage(config: str, out: Path, *overrides: str, procs: int = 1) -> None:
    if (out / "final" / "config.yaml").exists():
        print(f"{out}/final exists: skipping (delete it to retrain)")
        return
    resume = ["--resume"] if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) else []
    reaudio("train", "--config", config, "--out", str(out), *resume, *overrides, procs=procs)


def train(args) -> None:
    _train_stage("configs/offline-vae.yaml", settings.RUNS / "offline-vae")
    _train_stage("configs/offline-vae-decoder.yaml", settings.RUNS / "offline-vae-decoder")
    if not (settings.RUNS / "esc50-db" / "CURRENT").exists():
        reaudio("index", "build", "--manifest", str(settings.DATA / "metadata.csv"),
                "--out", str(settings.RUNS / "esc50-db"))
    for config, name in settings.LDM_STAGES:
        _train_stage(config, settings.RUNS / name, procs=args.procs)


def _preset_boundary() -> int:
    """The offline preset's expert boundary (registry.yaml; configs/offline-ldm-v-low.yaml trains below it)."""
    from reaudio_core.config import compose
    return int(compose("offline")["denoiser"]["params"]["boundary"])


def _expert_pair(high: Path, low: Path, boundary: int):
    """The denoiser ``experts``: the unet-ldm directory ``high`` above ``boundary``, ``low`` below it."""
    from reaudio_core.registry import create
    return create("denoiser", "experts", boundary=boundary,
                  high={"name": "unet-ldm", "params": {"checkpoint": str(high)}},
                  low={"name": "unet-ldm", "params": {"checkpoint": str(low)}})


def package(args) -> None:
    """plugins/weights/offline/: the LDM export's weights + the preset's own database."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from reaudio_core.config import compose, save_config
    from reaudio_core.database import build_database
    from reaudio_core.pipeline import ReAudioPipeline
    src, low = settings.RUNS / settings.HIGH_RUN / "final", settings.RUNS / settings.LOW_RUN / "final"
    for run in (src, low):
        if not (run / "config.yaml").exists():
            raise SystemExit(f"{run} missing: run the train stage first")
    tmp = settings.SHIPPED.with_name(".tmp-offline")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for slot in ("decoder", "audio_encoder"):
        shutil.copytree(src / slot, tmp / slot)
    _expert_pair(src / "denoiser", low / "denoiser", _preset_boundary()).save_pretrained(tmp / "denoiser")
    for slot in ("denoiser", "decoder", "audio_encoder"):
        for f in (tmp / slot).rglob("*.safetensors"):  # half precision on disk (loaded back into fp32 modules)
            tensors = load_file(f)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f)
    cfg = compose("offline")
    cfg["generation"]["model"] = None
    cfg["generation"]["database"] = None
    save_config(cfg, tmp)
    build_database([settings.DATA / "metadata.csv"], tmp / "db", cfg, progress=True)
    pipe = ReAudioPipeline.from_config(cfg, model_dir=tmp, db=tmp / "db")
    name = pipe.cache_features(streams=("audio",))[0]
    feats = pipe.database.features(name)
    arrays = {"states": np.asarray(feats["states"]).astype(np.float16), "mask": np.asarray(feats["mask"])}
    pipe.database.save_features(name, arrays, info={"what": "retrieved-audio tokens of the shipped audio_encoder"})
    # the source audio is not shipped: keep paths relative to ../shared/data (shown, never read)
    vdir = pipe.database.version_dir
    rows = [json.loads(line) for line in (vdir / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
    for row in rows:
        row["path"] = "esc50-fold4/" + row["file"]
        row["manifest"] = "esc50-fold4/metadata.csv"
    (vdir / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    shutil.copy(settings.REPO / "docs" / "offline-preset-card.md", tmp / "README.md")
    replace_dir(tmp, settings.SHIPPED)
    size = sum(f.stat().st_size for f in settings.SHIPPED.rglob("*") if f.is_file())
    print(f"packaged {settings.SHIPPED} ({size / 2**20:.1f} MiB)")



def experts(args) -> None:
    """A pipeline directory whose denoiser is ``experts`` (plugins/experts.py): the base model's UNet (its
    ``high`` expert if it already has two) for timesteps >= ``--boundary`` and the low-noise expert ``--low``
    (a unet-ldm directory, e.g. runs/offline-ldm-v-low/final/denoiser from configs/offline-ldm-v-low.yaml)
    below it; everything else (VAE,
    audio encoder, database, settings) copied from the base (``--model DIR``, default the shipped preset).
    Written to runs/offline-experts-<low run>-b<boundary>/final, for ``check`` / ``renoise --model``."""
    from reaudio_core.config import load_config, save_config
    if not args.low:
        raise SystemExit("experts needs --low DIR: a unet-ldm directory (OUT/final/denoiser of a run of "
                         "configs/offline-ldm-v-low.yaml)")
    base, low = Path(args.model or settings.SHIPPED), Path(args.low)
    boundary = args.boundary or _preset_boundary()
    out = settings.RUNS / f"offline-experts-{low.resolve().parents[1].name}-b{boundary}" / "final"
    high = base / "denoiser" / "high" if (base / "denoiser" / "high").is_dir() else base / "denoiser"
    den = _expert_pair(high, low, boundary)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out, ignore=lambda d, names: ["denoiser"] if Path(d) == base else [])
    den.save_pretrained(out / "denoiser")
    cfg = load_config(base)
    cfg["denoiser"] = {"name": "experts", "params": den.params}
    if not cfg["generation"].get("database") and (out / "db").is_dir():  # the shipped preset's own database
        cfg["generation"]["database"] = str(out / "db")
    save_config(cfg, out)
    print(f"wrote {out} (boundary {boundary}: {high} above, {low} below)")

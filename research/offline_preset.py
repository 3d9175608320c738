"""Reproduce, package and check the offline preset (issue: training and the offline preset).

One command retrains the shipped weights from the real ESC-50 fold-4 audio and re-runs the checks::

    python research/offline_preset.py all

Stages (each can be run alone; each resumes or skips what is already done):

* ``train``   - ``reaudio train`` with configs/offline-vae.yaml, then configs/offline-vae-decoder.yaml (a longer-trained
  decoder on the frozen encoder), ``reaudio index build`` of the 400 clips,
  ``reaudio train`` with configs/offline-ldm.yaml (epsilon prediction), configs/offline-ldm-v.yaml
  (its fine-tune to v-prediction), configs/offline-ldm-v-anneal.yaml (that fine-tune continued with the
  learning rate decayed to 0), configs/offline-ldm-v-pool7.yaml (continued again, each clip's neighbours
  drawn from a pool of 7) and configs/offline-ldm-v-low.yaml (a copy of that continued on timesteps below
  400 only: the low-noise expert), all under torchrun with 2 CPU processes, into ``runs/``.
* ``package`` - combines the pool-7 LDM (above timestep 400) and its low-noise expert (below) into one
  ``experts`` denoiser and copies it with the VAE into ``plugins/weights/offline/`` (the files the ``offline`` preset
  of registry.yaml loads), builds the preset's retrieval database there (MiniLM caption embeddings,
  FAISS) and caches the retrieved-audio tokens in it, so generation never needs the source audio.
* ``check``   - generates one clip per ESC-50 class prompt with the shipped preset, retrieval on and off,
  and classifies them with the esc50-classifier feature model (trained on the same real clips): top-1 /
  top-5 over the 50 classes and a confusion summary -> docs/results/offline-check.{json,md}, PNGs.
* ``ceiling`` - the 400 real clips classified as they are, after log-mel -> vocoder, and after log-mel ->
  VAE -> vocoder: what the VAE and vocoder let through, whatever the LDM does -> docs/results/offline-ceiling.*
  (``--decoder DIR``: the VAE row with another decoder on the same latents -> offline-ceiling-<run name>.*;
  ``check --decoder DIR`` likewise generates through that decoder -> offline-check-<run name>.*)
* ``conditional`` - for each class prompt, the training clips whose stored neighbour set is exactly the set the
  preset retrieves for it (what the LDM learned to produce under those conditions) and how the classifier
  hears them after the vocoder and after the VAE (from ``ceiling``'s per-clip predictions), beside how
  often the shipped model makes the class -> docs/results/offline-conditional.{md,json}
* ``vae-l1``  - log-mel L1 of the VAE round trip on the 400 clips, stage-1 VAE against the stage-1b decoder
  -> docs/results/offline-vae-l1.{md,json}
* ``diagnose`` - per noise level, the x0 error of a model's conditional and unconditional predictions on
  real clips, against the best Gaussian-prior guess: does the model use its conditions? (``--model DIR``)
* ``heldout`` - retrains the LDM without some classes (their clips stay in the database) and measures
  generation for those classes with retrieval on, on with their clips hidden, and off (the held-out and
  the shipped model) -> docs/results/offline-heldout.{json,md}.
* ``renoise`` - real clips of five classes noised to t0 = 0 ... 1000 and denoised back under their prompt's
  retrieval: from which noise level does the model lose the class? -> docs/results/offline-renoise.{md,json}
* ``demo``    - the four demo prompts with 16 seeds each (``--seeds N``): how often each is heard as asked
  -> docs/results/offline-demo[-<run>][-guidance<G>]-seeds<N>.{md,json}
* ``experts`` - a pipeline directory with a low-noise expert (``--low DIR``) beside a model's UNet, for
  ``check`` / ``renoise --model`` -> runs/offline-experts-<run>-b<boundary>/final
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "esc50-fold4"
RUNS = REPO / "runs"
SHIPPED = REPO / "plugins" / "weights" / "offline"
RESULTS = REPO / "docs" / "results"
HELDOUT_CLASSES = ["rooster", "crow", "chainsaw", "clock_tick", "hand_saw"]
DEMO_PROMPTS = ["dog barking", "rain", "church bells", "siren"]
DEMO_CLASSES = ["dog", "rain", "church_bells", "siren"]  # what each demo prompt asks for
DEMO_SEEDS = 4
# the LDM stages, in order: each starts from the EMA weights the one before exported (named in its config)
LDM_STAGES = [("configs/offline-ldm.yaml", "offline-ldm"), ("configs/offline-ldm-v.yaml", "offline-ldm-v"),
              ("configs/offline-ldm-v-anneal.yaml", "offline-ldm-v-anneal"),
              ("configs/offline-ldm-v-pool7.yaml", "offline-ldm-v-pool7"),
              ("configs/offline-ldm-v-low.yaml", "offline-ldm-v-low")]
# the shipped denoiser is `experts`: stage 5 (pool7) above the preset's boundary, its low-noise expert below
HIGH_RUN, LOW_RUN = "offline-ldm-v-pool7", "offline-ldm-v-low"


def reaudio(*args: str, procs: int = 1) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "reaudio_core.cli"] if procs > 1 else [sys.executable, "-m", "reaudio_core.cli"]) + list(args)
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _train_stage(config: str, out: Path, *overrides: str, procs: int = 1) -> None:
    if (out / "final" / "config.yaml").exists():
        print(f"{out}/final exists: skipping (delete it to retrain)")
        return
    resume = ["--resume"] if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) else []
    reaudio("train", "--config", config, "--out", str(out), *resume, *overrides, procs=procs)


def train(args) -> None:
    _train_stage("configs/offline-vae.yaml", RUNS / "offline-vae")
    _train_stage("configs/offline-vae-decoder.yaml", RUNS / "offline-vae-decoder")
    if not (RUNS / "esc50-db" / "CURRENT").exists():
        reaudio("index", "build", "--manifest", str(DATA / "metadata.csv"), "--out", str(RUNS / "esc50-db"))
    for config, name in LDM_STAGES:
        _train_stage(config, RUNS / name, procs=args.procs)


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
    src, low = RUNS / HIGH_RUN / "final", RUNS / LOW_RUN / "final"
    for run in (src, low):
        if not (run / "config.yaml").exists():
            raise SystemExit(f"{run} missing: run the train stage first")
    tmp = SHIPPED.with_name(".tmp-offline")
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
    build_database([DATA / "metadata.csv"], tmp / "db", cfg, progress=True)
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
    shutil.copy(REPO / "docs" / "offline-preset-card.md", tmp / "README.md")
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    os.replace(tmp, SHIPPED)
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    print(f"packaged {SHIPPED} ({size / 2**20:.1f} MiB)")


# -- checks -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _classifier():
    """The esc50-classifier feature model (the shipped weights, or CLASSIFIER_DIR's: ``--classifier DIR``),
    loaded once per run (check and heldout classify several times)."""
    from reaudio_core.registry import create
    return create("feature_model", "esc50-classifier", weights=CLASSIFIER_DIR)


CLASSIFIER_DIR: str | None = None  # --classifier DIR (None: plugins/weights/esc50-classifier)


def _classifier_name() -> str:
    return f"esc50-classifier ({CLASSIFIER_DIR or 'plugins/weights/esc50-classifier'})"


def _classifier_stem() -> str:
    return f"-clf-{Path(CLASSIFIER_DIR).resolve().name}" if CLASSIFIER_DIR else ""


def _classify(wavs):
    import torch

    clf = _classifier()
    logits = clf.logits([w.numpy() if hasattr(w, "numpy") else w for w in wavs])
    return clf.labels, torch.softmax(logits.float(), -1)


def _generate(pipe, prompts, seeds, batch=10, neighbours=None):
    """Waveforms for every (seed, prompt), seed-major; ``neighbours`` (a list) collects what was retrieved."""
    import torch
    waves = []
    for seed in seeds:
        for i in range(0, len(prompts), batch):
            out = pipe(prompts[i:i + batch], seed=seed, progress=False)
            waves += list(out.waveforms)
            if neighbours is not None:
                neighbours += out.neighbours
    return torch.stack(waves)


def _score(labels, probs, targets):
    import numpy as np
    idx = [labels.index(t) for t in targets]
    top5 = probs.topk(5, -1).indices.numpy()
    pred = probs.argmax(-1).numpy()
    return {"top1": float(np.mean(pred == idx)), "top5": float(np.mean([i in row for i, row in zip(idx, top5)])),
            "p_target": float(np.mean([probs[n, i].item() for n, i in enumerate(idx)])),
            "predictions": [labels[p] for p in pred]}


def _n_seeds(args, default: int) -> int:
    """``--seeds``, or this stage's own default when it is not given."""
    return default if args.seeds is None else args.seeds


def _per_class(targets, predictions, classes):
    """Top-1 per class: the share of each class's clips whose prediction is that class."""
    import numpy as np
    return {c: float(np.mean([p == c for t, p in zip(targets, predictions) if t == c])) for c in classes}


def check(args) -> None:
    import numpy as np
    import torch

    from reaudio_core.pipeline import ReAudioPipeline
    from reaudio_core.plots import save_mel_png
    RESULTS.mkdir(parents=True, exist_ok=True)
    pipe = ReAudioPipeline.from_preset("offline") if not args.model else ReAudioPipeline.from_pretrained(args.model)
    if args.guidance is not None:
        pipe.cfg["generation"]["guidance"] = args.guidance
    if args.guidance_rescale is not None:
        pipe.cfg["generation"]["guidance_rescale"] = args.guidance_rescale
    if args.decoder:  # a decoder trained on the model's frozen encoder (same latents): decode with it
        from reaudio_core.registry import create
        pipe.decoder = create("decoder", "vae", checkpoint=args.decoder)
    labels = _classify([np.zeros(16000, np.float32)])[0]
    prompts = [label.replace("_", " ") for label in labels]
    n_seeds = _n_seeds(args, 1)
    seeds = list(range(n_seeds))
    targets = [t for _ in seeds for t in labels]
    results = {"model": ("offline preset (plugins/weights/offline)" if not args.model else str(args.model))
               + (f", decoder {args.decoder}" if args.decoder else ""),
               "classifier": _classifier_name(), "sample_rate": 16000,
               "prompts": "the 50 ESC-50 class names, underscores as spaces", "seeds": seeds,
               "clips_per_setting": len(targets), "generation": dict(pipe.cfg["generation"])}
    t0 = time.time()
    for retrieval in ("audio+text", "none"):
        pipe.cfg["generation"]["retrieval"] = retrieval
        waves = _generate(pipe, prompts, seeds)
        _, probs = _classify(waves)
        results[retrieval] = _score(labels, probs, targets)
        print(f"retrieval {retrieval}: top-1 {results[retrieval]['top1']:.3f} top-5 {results[retrieval]['top5']:.3f}"
              f" ({time.time() - t0:.0f} s)", flush=True)
    pipe.cfg["generation"]["retrieval"] = "audio+text"
    results["seconds"] = round(time.time() - t0, 1)
    # confusions of the retrieval run
    preds = results["audio+text"]["predictions"]
    wrong = {}
    for t, p in zip(targets, preds):
        if t != p:
            wrong[f"{t} -> {p}"] = wrong.get(f"{t} -> {p}", 0) + 1
    results["confusions"] = sorted(wrong.items(), key=lambda kv: -kv[1])[:15]
    results["per_class_top1"] = _per_class(targets, preds, labels)
    # real clips through the same classifier: the ceiling (they are its own training data)
    from reaudio_core.audio import load_audio
    import csv
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))
    real = [load_audio(DATA / r["file"]) for r in rows]
    _, probs = _classify(real)
    results["real_clips"] = {k: v for k, v in _score(labels, probs, [r["category"] for r in rows]).items()
                             if k != "predictions"}
    # demo spectrograms of the shipped preset at its own settings (other checks: offline-check-<run name/guidance>.*)
    stem = f"offline-check-{Path(args.model).resolve().parent.name}" if args.model else "offline-check"
    if args.decoder:
        stem += f"-{Path(args.decoder).resolve().parent.parent.name}"
    if args.guidance is not None:
        stem += f"-guidance{args.guidance:g}"
    if args.guidance_rescale is not None:
        stem += f"-rescale{args.guidance_rescale:g}"
    if n_seeds != 1:  # the tables in docs/results.md are one seed per prompt; more seeds get their own files
        stem += f"-seeds{n_seeds}"
    stem += _classifier_stem()
    # the four demo prompts, DEMO_SEEDS seeds each: what the classifier hears (seed 0 also drawn)
    demo = [pipe(DEMO_PROMPTS, seed=seed, progress=False) for seed in range(DEMO_SEEDS)]
    if stem == "offline-check":
        img = REPO / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for prompt, mel, nb in zip(demo[0].prompts, demo[0].mels, demo[0].neighbours):
            save_mel_png(img / f"offline-{prompt.replace(' ', '-')}.png", mel, title=prompt,
                         captions=[n["caption"] for n in nb])
    _, probs = _classify(list(torch.cat([out.waveforms for out in demo])))
    heard = [labels[i] for i in probs.argmax(-1).tolist()]
    results["demo"] = {p: {"asked": c, "top1_per_seed": heard[i::len(DEMO_PROMPTS)]}
                       for i, (p, c) in enumerate(zip(DEMO_PROMPTS, DEMO_CLASSES))}
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    md = [f"Model: {results['model']}; classifier: {results['classifier']}; 16 kHz; "
          f"{len(targets)} clips per row ({len(labels)} class prompts x {len(seeds)} seeds); "
          f"{pipe.cfg['generation']['duration']} s, {pipe.cfg['generation']['steps']} "
          f"{pipe.cfg['generation']['sampler']} steps, guidance {pipe.cfg['generation']['guidance']} (rescale "
          f"{pipe.cfg['generation'].get('guidance_rescale', 0.0):g}), k "
          f"{pipe.cfg['generation']['k']}. Chance: top-1 0.02, top-5 0.10.", "",
          "| clips | top-1 | top-5 | mean p(asked class) |", "|---|---|---|---|"]
    for key, name in (("audio+text", "generated, retrieval audio+text"), ("none", "generated, retrieval off"),
                      ("real_clips", "real ESC-50 fold-4 clips (the classifier's training data)")):
        r = results[key]
        md.append(f"| {name} | {r['top1']:.3f} | {r['top5']:.3f} | {r['p_target']:.3f} |")
    md += ["", "Most frequent confusions (retrieval on): " +
           ", ".join(f"{k} ({v})" for k, v in results["confusions"][:10]) + "."]
    md += ["", f"Demo prompts (retrieval on, seeds 0-{DEMO_SEEDS - 1}; classifier's top-1 per seed): " + "; ".join(
        f"\"{p}\" -> {', '.join(d['top1_per_seed'])} ({sum(h == d['asked'] for h in d['top1_per_seed'])}/{DEMO_SEEDS} "
        f"{d['asked']})" for p, d in results["demo"].items()) + "."]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def demo(args) -> None:
    """The issue's four demo prompts with more seeds than ``check``'s four (``--seeds``, default 16), at the
    model's guidance or ``--guidance``: how often each is heard as asked, with the other classes heard."""
    from collections import Counter

    from reaudio_core.pipeline import ReAudioPipeline
    pipe = ReAudioPipeline.from_preset("offline") if not args.model else ReAudioPipeline.from_pretrained(args.model)
    if args.guidance is not None:
        pipe.cfg["generation"]["guidance"] = args.guidance
    seeds = list(range(_n_seeds(args, 16)))
    t0 = time.time()
    waves = _generate(pipe, DEMO_PROMPTS, seeds)  # seed-major
    labels, probs = _classify(waves)
    heard = [labels[i] for i in probs.argmax(-1).tolist()]
    gen = pipe.cfg["generation"]
    out = {"model": "offline preset (plugins/weights/offline)" if not args.model else str(args.model),
           "classifier": _classifier_name(), "seeds": seeds, "guidance": gen["guidance"], "steps": gen["steps"],
           "sampler": gen["sampler"], "k": gen["k"], "seconds": round(time.time() - t0, 1),
           "prompts": {p: {"asked": c, "top1_per_seed": heard[i::len(DEMO_PROMPTS)]}
                       for i, (p, c) in enumerate(zip(DEMO_PROMPTS, DEMO_CLASSES))}}
    stem = "offline-demo" + (f"-{Path(args.model).resolve().parent.name}" if args.model else "")
    if args.guidance is not None:
        stem += f"-guidance{args.guidance:g}"
    stem += f"-seeds{len(seeds)}" + _classifier_stem()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    md = [f"Model: {out['model']}; classifier: {out['classifier']}; 16 kHz, {gen['duration']} s, {gen['steps']} "
          f"{gen['sampler']} steps, guidance {gen['guidance']}, k {gen['k']}; seeds 0-{len(seeds) - 1}. Command: "
          "`python research/offline_preset.py demo` (options in the file name).", "",
          "| prompt | heard as asked | heard otherwise |", "|---|---|---|"]
    for p, d in out["prompts"].items():
        hits = sum(h == d["asked"] for h in d["top1_per_seed"])
        others = Counter(h for h in d["top1_per_seed"] if h != d["asked"])
        md.append(f"| {p} | {hits}/{len(seeds)} | {', '.join(f'{k} x{v}' for k, v in others.most_common()) or '-'} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def diagnose(args) -> None:
    """x0 error per timestep on 20 real clips (one every 20 of the 400), conditional vs unconditional."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_core.pipeline import ReAudioPipeline, make_scheduler, prediction_type
    pipe = (ReAudioPipeline.from_pretrained(args.model, db=RUNS / "esc50-db") if args.model
            else ReAudioPipeline.from_preset("offline"))
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))[::20]
    frames = M.seconds_to_frames(pipe.cfg["generation"]["duration"])
    with torch.no_grad():  # the training front end: normalise, pad to the generation length, log-mel, encode
        z0 = torch.cat([pipe.decoder.encode(M.waveform_to_mel(load_audio(DATA / r["file"]), frames)) for r in rows])
        mu, var = z0.mean((0, 2, 3), keepdim=True), z0.var((0, 2, 3), keepdim=True)
        cond, uncond, _ = pipe.condition([r["category"].replace("_", " ") for r in rows], pipe.cfg["generation"]["k"])
        sched = make_scheduler(pipe.cfg, "ddim")
        sched.set_timesteps(sched.config.num_train_timesteps)  # step() below only for its x0 estimate
        g = torch.Generator().manual_seed(0)
        print(f"model: {args.model or 'shipped offline preset'} ({prediction_type(pipe.cfg)}); {len(rows)} real "
              "clips; x0 MSE per element")
        print("| t | alpha_bar | conditional | unconditional | Gaussian prior (per-channel mean/var) |")
        print("|---|---|---|---|---|")
        for t in (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50):
            a = sched.alphas_cumprod[t]
            ts = torch.full((len(z0),), t)
            zt = sched.add_noise(z0, torch.randn(z0.shape, generator=g), ts)
            errs = [((sched.step(pipe.denoiser(zt, ts, c), t, zt).pred_original_sample - z0) ** 2).mean().item()
                    for c in (cond, uncond)]
            prior = mu + (a.sqrt() * var / (a * var + 1 - a)) * (zt - a.sqrt() * mu)
            print(f"| {t} | {a:.5f} | {errs[0]:.3f} | {errs[1]:.3f} | {((prior - z0) ** 2).mean():.3f} |")


def heldout(args) -> None:
    import numpy as np

    from reaudio_core.pipeline import ReAudioPipeline
    # the first three shipped LDM stages (epsilon, v, annealed; not the pool-7 stage), each without the
    # held-out classes and starting from the held-out stage before it
    excl = "[" + ",".join(HELDOUT_CLASSES) + "]"
    steps = [args.heldout_steps, args.heldout_v_steps, args.heldout_anneal_steps]
    out = None
    for (config, name), n in zip(LDM_STAGES[:3], steps):
        start = [f"denoiser.params.checkpoint={out / 'final' / 'denoiser'}"] if out else []
        out = RUNS / f"{name}-heldout"
        _train_stage(config, out, f"training.exclude_labels={excl}", *start, f"training.max_steps={n}",
                     procs=args.procs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    prompts = [c.replace("_", " ") for c in HELDOUT_CLASSES]
    seeds = list(range(_n_seeds(args, 4)))
    targets = [c for _ in seeds for c in HELDOUT_CLASSES]
    results = {"excluded_classes": HELDOUT_CLASSES, "seeds": seeds, "clips_per_setting": len(targets),
               "heldout_training_steps": [args.heldout_steps, args.heldout_v_steps, args.heldout_anneal_steps],
               "classifier": "esc50-classifier", "sample_rate": 16000, "rows": {}}
    # retrieval at generation: the class's own clips retrievable (the bring-your-own-library case), the
    # same database with them hidden (generation.exclude_labels: what the model knows without them), off
    settings = {"retrieval on": ("audio+text", []), "retrieval on, class clips hidden": ("audio+text", HELDOUT_CLASSES),
                "retrieval off": ("none", [])}
    # both models sample with the same guidance: --guidance, else the shipped preset's
    from reaudio_core.config import compose
    guidance = args.guidance if args.guidance is not None else compose("offline")["generation"]["guidance"]
    results["guidance"] = guidance
    t0 = time.time()
    for mname, mdir in (("held-out model", out / "final"), ("full model (shipped preset)", None)):
        pipe = ReAudioPipeline.from_preset("offline") if mdir is None else \
            ReAudioPipeline.from_pretrained(mdir, db=RUNS / "esc50-db")
        pipe.cfg["generation"]["guidance"] = guidance
        for sname, (retrieval, hidden) in settings.items():
            pipe.cfg["generation"]["retrieval"], pipe.cfg["generation"]["exclude_labels"] = retrieval, list(hidden)
            nb = []
            labels, probs = _classify(_generate(pipe, prompts, seeds, neighbours=nb))
            s = _score(labels, probs, targets)
            s["per_class_top1"] = _per_class(targets, s["predictions"], HELDOUT_CLASSES)
            # how many retrieved neighbours carry the asked class (0 when hidden or off)
            s["neighbours_of_asked_class"] = float(np.mean([n["label"] == t for t, row in zip(targets, nb)
                                                            for n in row])) if any(nb) else 0.0
            results["rows"][f"{mname} / {sname}"] = s
            print(f"{mname} / {sname}: top-1 {s['top1']:.3f} top-5 {s['top5']:.3f} p {s['p_target']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (RESULTS / "offline-heldout.json").write_text(json.dumps(results, indent=2))
    md = [f"Classes excluded from LDM training (clips kept in the retrieval database): {', '.join(HELDOUT_CLASSES)}; "
          f"held-out model trained for {args.heldout_steps} epsilon + {args.heldout_v_steps} v + "
          f"{args.heldout_anneal_steps} annealing steps (the full model: 3200 + 3000 + 2000, configs/offline-ldm.yaml, "
          "offline-ldm-v.yaml, offline-ldm-v-anneal.yaml). The VAE (and so the retrieved-audio "
          "encoder) is the shipped one, trained on all 400 clips without labels. "
          f"{len(targets)} clips per row ({len(prompts)} prompts x {len(seeds)} seeds; 5.12 s, 16 kHz, guidance "
          f"{guidance:g}), classified by "
          "esc50-classifier over all 50 classes (chance: top-1 0.02, top-5 0.10). 'class clips hidden' = "
          "generation.exclude_labels set to the 5 classes, so retrieval returns other classes' clips.", "",
          "| model / retrieval at generation | retrieved neighbours of the asked class | top-1 | top-5 | "
          "mean p(asked class) |", "|---|---|---|---|---|"]
    for key, s in results["rows"].items():
        md.append(f"| {key} | {s['neighbours_of_asked_class']:.2f} | {s['top1']:.3f} | {s['top5']:.3f} | "
                  f"{s['p_target']:.3f} |")
    md += ["", "Top-1 per held-out class:", "",
           "| model / retrieval | " + " | ".join(HELDOUT_CLASSES) + " |", "|---|" + "---|" * len(HELDOUT_CLASSES)]
    for key, s in results["rows"].items():
        md.append(f"| {key} | " + " | ".join(f"{s['per_class_top1'][c]:.2f}" for c in HELDOUT_CLASSES) + " |")
    (RESULTS / "offline-heldout.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def ceiling(args) -> None:
    """How much of each class survives the preset's front end, VAE and vocoder without any diffusion: all 400
    real clips classified as they are, after log-mel -> vocoder, and after log-mel -> VAE -> vocoder."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from tqdm import tqdm

    from reaudio_core.pipeline import ReAudioPipeline
    pipe = ReAudioPipeline.from_preset("offline") if not args.model else ReAudioPipeline.from_pretrained(args.model)
    model = "offline preset (plugins/weights/offline)" if not args.model else str(args.model)
    stem = "offline-ceiling"  # the shipped preset's file; other models and decoders get their own
    if args.model:
        stem += f"-{Path(args.model).resolve().parent.name}"
    encoder = decoder = pipe.decoder
    if args.decoder and args.vae:
        raise SystemExit("ceiling: give --decoder (decode only) or --vae (encode and decode), not both")
    if args.decoder or args.vae:
        # --decoder: a decoder trained on the same (frozen) encoder: encode with the model's, decode with it
        # --vae: another VAE altogether (its own latent space): encode and decode with it
        from reaudio_core.registry import create
        decoder = create("decoder", "vae", checkpoint=args.decoder or args.vae)
        encoder = decoder if args.vae else pipe.decoder
        model += f", decoder {args.decoder}" if args.decoder else f", VAE {args.vae}"
        stem += f"-{Path(args.decoder or args.vae).resolve().parent.parent.name}"
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))
    targets = [r["category"] for r in rows]
    frames = M.seconds_to_frames(pipe.cfg["generation"]["duration"])
    # --vae-only, --decoder, --vae: the real and vocoder rows do not involve the VAE; keep them from the last full run
    vae_row_only = next((f for f, on in (("--vae-only", args.vae_only), ("--decoder", args.decoder),
                                         ("--vae", args.vae)) if on), None)
    stem += _classifier_stem()
    previous = RESULTS / f"offline-ceiling{_classifier_stem()}.json"  # the full run judged by the same classifier
    kept = {k: v for k, v in json.loads(previous.read_text())["rows"].items() if k in ("real", "vocoder")} \
        if vae_row_only and previous.exists() else {}
    if vae_row_only and not {"real", "vocoder"} <= set(kept):
        raise SystemExit(f"{vae_row_only} needs the real and vocoder rows of a full ceiling run in {previous}")
    t0 = time.time()
    waves = {key: [] for key in ("real", "vocoder", "vae") if key not in kept}
    with torch.no_grad():
        for r in tqdm(rows, desc="ceiling", unit="clip"):
            wav = load_audio(DATA / r["file"])
            mel = M.waveform_to_mel(wav, frames)
            if "real" in waves:
                waves["real"].append(wav)
                waves["vocoder"].append(pipe.vocoder(mel)[0])
            waves["vae"].append(pipe.vocoder(decoder.decode(encoder.encode(mel)))[0])
    results = {"model": model,
               "classifier": _classifier_name(), "sample_rate": 16000,
               "clips": len(rows), "rows": dict(kept), "rows_kept_from_previous_run": sorted(kept)}
    names = {"real": "real clips", "vocoder": "real clips -> log-mel -> vocoder",
             "vae": "real clips -> log-mel -> VAE encode/decode (latent mean) -> vocoder"}
    for key, clips in waves.items():
        labels, probs = _classify(clips)
        s = _score(labels, probs, targets)
        s["per_class_top1"] = _per_class(targets, s["predictions"], labels)
        results["rows"][key] = s
    results["seconds"] = round(time.time() - t0, 1)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    md = [f"Model: {results['model']}; classifier: {results['classifier']} (trained on these same clips); all "
          f"{len(rows)} ESC-50 fold-4 clips, 16 kHz, padded or cut to {pipe.cfg['generation']['duration']} s. "
          "No diffusion: the ceiling the VAE and vocoder put on anything the LDM generates.", "",
          "| clips | top-1 | top-5 | mean p(true class) |", "|---|---|---|---|"]
    for key, s in results["rows"].items():
        md.append(f"| {names[key]} | {s['top1']:.3f} | {s['top5']:.3f} | {s['p_target']:.3f} |")
    if kept:
        md += ["", f"Rows {' and '.join(repr(names[k]) for k in sorted(kept))}: kept from the previous full run "
               "(`ceiling` of the shipped preset without --vae-only / --decoder); they do not involve the VAE."]
    per = results["rows"]["vae"]["per_class_top1"]
    md += ["", "Top-1 per class after the VAE (8 clips each), worst first: " +
           ", ".join(f"{c} {v:.2f}" for c, v in sorted(per.items(), key=lambda kv: kv[1])) + "."]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def conditional(args) -> None:
    """What the LDM was trained to produce under the conditions each class prompt retrieves.

    Training conditions every clip on its stored top-k neighbours (self excluded); generation retrieves the
    top-k for the prompt. Every ESC-50 clip of a class has the same caption, so the prompt retrieves some
    k of the class's clips and, in training, exactly those k were the neighbours of the class's *other*
    clips: the only clips the model ever learned to make from that condition. If those clips lose their
    class on the way through the VAE and vocoder, a perfect LDM would lose it too. Reads the shipped
    database and the per-clip predictions of ``ceiling`` (run that first). Then (``--seeds`` > 0) each demo
    prompt is generated from every distinct neighbour set its class's clips were trained with, in place of
    what it retrieves: does the model make the clip it was trained to make from that set?"""
    import csv

    import numpy as np

    from reaudio_core.database import Database
    ceiling = json.loads((RESULTS / "offline-ceiling.json").read_text())
    if ceiling.get("model") != "offline preset (plugins/weights/offline)" or "vae" not in ceiling["rows"]:
        raise SystemExit("docs/results/offline-ceiling.json is not the shipped preset's: run `ceiling` first")
    check = json.loads((RESULTS / "offline-check.json").read_text())
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))
    clip_row = {r["file"]: i for i, r in enumerate(rows)}
    db = Database.open(SHIPPED / "db")
    k = int(check["generation"]["k"])
    table = np.asarray(db.neighbours.ids)[:, :k]
    files = [item["file"] for item in db.items]
    heard = {key: [ceiling["rows"][key]["predictions"][clip_row[f]] for f in files] for key in ("vocoder", "vae")}
    generated = check["per_class_top1"]  # one seed per prompt at the preset's settings
    out = {"k": k, "database": "plugins/weights/offline/db", "ceiling": "docs/results/offline-ceiling.json",
           "check": "docs/results/offline-check.json", "classes": {}}
    for cls in generated:
        retrieved = sorted(r["id"] for r in db.retrieve(cls.replace("_", " "), k))
        trained = [i for i in range(len(db)) if sorted(table[i].tolist()) == retrieved]
        out["classes"][cls] = {
            "retrieved": [files[i] for i in retrieved],
            "retrieved_all_of_class": all(db.items[i].get("label") == cls for i in retrieved),
            "trained_targets": [files[i] for i in trained],
            "targets_after_vocoder": [heard["vocoder"][i] for i in trained],
            "targets_after_vae": [heard["vae"][i] for i in trained],
            "vae_share": float(np.mean([heard["vae"][i] == cls for i in trained])) if trained else None,
            "generated_top1": generated[cls]}
    cl = out["classes"]
    zero = [c for c, v in cl.items() if v["vae_share"] == 0]
    pairs = np.array([(v["vae_share"], v["generated_top1"]) for v in cl.values() if v["vae_share"] is not None])
    out["correlation_vae_share_vs_generated"] = float(np.corrcoef(pairs.T)[0, 1])
    sets_md = []
    n_seeds = _n_seeds(args, 4)
    if n_seeds > 0:
        sets_md = _generate_from_trained_sets(db, table, files, heard, range(n_seeds), out)
    (RESULTS / "offline-conditional.json").write_text(json.dumps(out, indent=2))
    md = [f"For each of the 50 class prompts: the k = {k} clips the shipped preset retrieves, the training clips whose "
          f"stored top-{k} neighbours are exactly those (the clips the LDM learned to make from that condition), "
          "and the share of them the classifier still hears as the class after log-mel -> VAE -> Griffin-Lim "
          "(per-clip predictions of docs/results/offline-ceiling.json), beside the shipped model's top-1 for the "
          "prompt (docs/results/offline-check.json, one seed). This table generates nothing.", "",
          "| class | retrieved all of the class | targets | targets heard as the class after the vocoder | "
          "after the VAE | generated top-1 |", "|---|---|---|---|---|---|"]
    for cls, v in sorted(cl.items(), key=lambda kv: (kv[1]["vae_share"] is None, kv[1]["vae_share"] or 0, kv[0])):
        n = len(v["trained_targets"])
        voc = sum(h == cls for h in v["targets_after_vocoder"])
        vae = sum(h == cls for h in v["targets_after_vae"])
        md.append(f"| {cls} | {'yes' if v['retrieved_all_of_class'] else 'no'} | {n} | {voc}/{n} | {vae}/{n} "
                  f"({', '.join(h for h in v['targets_after_vae'] if h != cls) or '-'}) | {v['generated_top1']:.0f} |")
    md += ["", f"Classes whose trained targets all lose their class in the VAE: {', '.join(zero) or 'none'}. "
           f"Correlation over the 50 classes between the VAE share and the generated top-1: "
           f"{out['correlation_vae_share_vs_generated']:.2f} (one seed per prompt, so each generated value is 0 or 1)."]
    md += sets_md
    (RESULTS / "offline-conditional.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


RENOISE_CLASSES = ("dog", "rain", "church_bells", "siren", "frog")
RENOISE_STARTS = (0, 200, 400, 600, 800, 1000)
RENOISE_STEPS = 50  # DDIM steps over the whole schedule; a start t0 runs the ones at or below it


def renoise(args) -> None:
    """From which noise level does the LDM lose a class? Each real clip of a class is encoded by the model's
    VAE, noised to timestep t0 (``scheduler.add_noise``; t0 = 0: the VAE round trip alone, t0 = 1000: pure
    noise, i.e. plain generation) and denoised from there with the DDIM steps (of ``RENOISE_STEPS``) at or
    below t0 at the preset's guidance, conditioned on what the class prompt retrieves; then decoded, vocoded
    and classified. Low t0 only asks the model for fine detail, high t0 for the whole clip."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_core.pipeline import ReAudioPipeline, make_scheduler
    pipe = ReAudioPipeline.from_preset("offline") if not args.model else ReAudioPipeline.from_pretrained(args.model)
    gen = pipe.cfg["generation"]
    guidance = gen["guidance"] if args.guidance is None else args.guidance
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))
    frames = M.seconds_to_frames(gen["duration"])
    out = {"model": "offline preset (plugins/weights/offline)" if not args.model else str(args.model),
           "classifier": _classifier_name(), "sampler": "ddim", "steps": RENOISE_STEPS, "guidance": guidance,
           "k": gen["k"], "noise_seed": 0, "starts": list(RENOISE_STARTS), "classes": {}}
    t0 = time.time()
    for cls in RENOISE_CLASSES:
        files = [r["file"] for r in rows if r["category"] == cls]
        z0 = pipe.decoder.encode(torch.cat([M.waveform_to_mel(load_audio(DATA / f), frames) for f in files]))
        cond, uncond, _ = pipe.condition([cls.replace("_", " ")], int(gen["k"]))
        n = len(files)
        both = uncond.cat(cond).repeat_interleave(n)
        per = {}
        for start in RENOISE_STARTS:
            sch = make_scheduler(pipe.cfg, "ddim")
            sch.set_timesteps(RENOISE_STEPS)
            steps = [t for t in sch.timesteps if t <= start] if start else []
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
            x = z0 if not start else noise if start >= 1000 else \
                sch.add_noise(z0, noise, torch.full((n,), int(steps[0])))
            with torch.inference_mode():
                for t in steps:
                    eps_u, eps_c = pipe.denoiser(torch.cat([x, x]), t.expand(2 * n).long(), both).chunk(2)
                    x = sch.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
                waves = pipe.vocoder(pipe.decoder.decode(x))
            labels, probs = _classify(list(waves))
            per[start] = [labels[i] for i in probs.argmax(-1)]
            print(f"{cls} t0={start}: {sum(p == cls for p in per[start])}/{n} ({time.time() - t0:.0f} s)", flush=True)
        out["classes"][cls] = {"files": files, "predictions": {str(k): v for k, v in per.items()}}
    stem = "offline-renoise" + (f"-{Path(args.model).resolve().parent.name}" if args.model else "") + _classifier_stem()
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    md = [f"Model: {out['model']}; classifier: {out['classifier']}; 16 kHz, {gen['duration']} s. Each real clip of the "
          f"class encoded by the model's VAE, noised to t0 (noise seed 0) and denoised with the DDIM steps at or below "
          f"t0 of {RENOISE_STEPS} at guidance "
          f"{guidance}, conditioned on what the class prompt retrieves (k = {gen['k']}); t0 = 0 is the VAE round "
          "trip alone, t0 = 1000 starts from pure noise (plain generation from these noises). Cells: clips heard as "
          "the class / clips (the other predictions). Command: `python research/offline_preset.py renoise`.", "",
          "| class | " + " | ".join(f"t0 = {s}" for s in RENOISE_STARTS) + " |",
          "|---|" + "---|" * len(RENOISE_STARTS)]
    for cls, v in out["classes"].items():
        cells = []
        for s_ in RENOISE_STARTS:
            preds = v["predictions"][str(s_)]
            others = sorted({p for p in preds if p != cls})
            cells.append(f"{sum(p == cls for p in preds)}/{len(preds)}" + (f" ({', '.join(others)})" if others else ""))
        md.append(f"| {cls} | " + " | ".join(cells) + " |")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _generate_from_trained_sets(db, table, files, heard, seeds, out) -> list[str]:
    """Each demo prompt generated (preset settings, ``seeds``) from each distinct stored neighbour set of its
    class's clips instead of its own retrieval; the results go into ``out["trained_sets"]``, markdown back."""
    from reaudio_core.pipeline import ReAudioPipeline
    pipe = ReAudioPipeline.from_preset("offline")
    forced: list[int] = []
    # the prompt embedding still comes from the prompt; only the retrieved items are replaced (no search)
    pipe.retrieve = lambda emb, k: [[{**db.items[i], "id": int(i), "score": float("nan")} for i in forced]
                                    for _ in range(len(emb))]
    out["trained_sets"] = {}
    md = ["", f"Each demo prompt generated from every distinct neighbour set its class's clips were trained with, "
          f"instead of its own retrieval (preset settings, seeds {seeds[0]}-{seeds[-1]}): the clips trained under "
          "that set, how they sound after the VAE, and what the classifier hears in the generations.", "",
          "| prompt | neighbour set | trained to make (after the VAE) | generated, top-1 per seed |",
          "|---|---|---|---|"]
    for prompt, cls in zip(DEMO_PROMPTS, DEMO_CLASSES):
        members = [i for i, item in enumerate(db.items) if item.get("label") == cls]
        sets: dict[tuple, list[int]] = {}
        for i in members:
            sets.setdefault(tuple(sorted(table[i].tolist())), []).append(i)
        rows = []
        for nb, trained in sets.items():
            forced[:] = list(nb)
            waves = _generate(pipe, [prompt], seeds)
            labels, probs = _classify(waves)
            heard_gen = [labels[j] for j in probs.argmax(-1)]
            rows.append({"set": [files[i] for i in nb], "trained_targets": [files[i] for i in trained],
                         "targets_after_vae": [heard["vae"][i] for i in trained], "generated": heard_gen})
            made = ", ".join(f"{Path(files[i]).stem} ({heard['vae'][i]})" for i in trained)
            md.append(f"| {prompt} | {', '.join(Path(files[i]).stem for i in nb)} | {made} | "
                      f"{', '.join(heard_gen)} ({sum(h == cls for h in heard_gen)}/{len(heard_gen)}) |")
            print(md[-1], flush=True)
        out["trained_sets"][prompt] = rows
    return md


def vae_l1(args) -> None:
    """Log-mel L1 of the VAE round trip (posterior mean, full 5.12 s clips) on all 400 clips, for the stage-1
    VAE and the stage-1b decoder (same encoder): how much sharper the shipped decoder is."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_plugins.vae import VAE
    rows = list(csv.DictReader(open(DATA / "metadata.csv", encoding="utf-8")))
    mels = torch.cat([M.waveform_to_mel(load_audio(DATA / r["file"]), M.seconds_to_frames(5.12)) for r in rows])
    md = [f"Log-mel L1 (natural-log mel units, mean over elements) of mel -> VAE encode (posterior mean) -> decode, "
          f"all {len(rows)} ESC-50 fold-4 clips, 16 kHz, 5.12 s.", "", "| VAE | L1 |", "|---|---|"]
    results = {}
    for name in ("offline-vae", "offline-vae-decoder"):
        vae = VAE.from_pretrained(RUNS / name / "final" / "decoder")
        with torch.no_grad():
            err = torch.cat([(vae.decode(vae.encode(m)) - m).abs().mean((1, 2)) for m in mels.split(25)])
        results[name] = float(err.mean())
        md.append(f"| runs/{name}/final/decoder | {results[name]:.3f} |")
    (RESULTS / "offline-vae-l1.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "offline-vae-l1.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


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
    base, low = Path(args.model or SHIPPED), Path(args.low)
    boundary = args.boundary or _preset_boundary()
    out = RUNS / f"offline-experts-{low.resolve().parents[1].name}-b{boundary}" / "final"
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "train", "package", "check", "ceiling", "conditional", "vae-l1", "diagnose",
                                         "heldout", "renoise", "experts", "demo"])
    p.add_argument("--procs", type=int, default=2, help="torchrun processes for the LDM stage (default 2)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per prompt: check (default 1; other than 1 appends -seeds<N> to its result files), "
                        "heldout and conditional (default 4), demo (default 16)")
    p.add_argument("--model", help="check / ceiling / diagnose / renoise / demo a saved pipeline directory instead of the shipped preset "
                   "(check writes docs/results/offline-check-<run name>.*)")
    p.add_argument("--guidance", type=float,
                   help="check / heldout / renoise / demo: this classifier-free guidance scale instead of the preset's (check "
                        "writes docs/results/offline-check[-<run name>]-guidance<G>.*, without spectrograms)")
    p.add_argument("--guidance-rescale", type=float,
                   help="check: this generation.guidance_rescale (0..1) instead of the preset's (writes "
                        "docs/results/offline-check[-<run name>][-guidance<G>]-rescale<R>.*, without spectrograms)")
    p.add_argument("--classifier", metavar="DIR",
                   help="check / ceiling: judge with these esc50-classifier weights (python -m "
                        "reaudio_plugins.esc50_classifier train --out DIR) instead of the shipped ones; the result "
                        "files get -clf-<DIR name> appended")
    p.add_argument("--vae-only", action="store_true",
                   help="ceiling: measure only the VAE row; the real and vocoder rows (no VAE in them) are kept "
                        "from the last full run's docs/results/offline-ceiling.json")
    p.add_argument("--vae", help="ceiling: encode and decode with this VAE directory (OUT/final/decoder of another "
                                 "vae run, with its own latent space) -> offline-ceiling-<run name>.*")
    p.add_argument("--decoder", help="ceiling / check: decode with this VAE directory (a decoder trained on the preset's "
                   "frozen encoder) instead of the model's; writes docs/results/offline-{ceiling,check}[-<model>]-<run name>.*")
    p.add_argument("--heldout-steps", type=int, default=3200,
                   help="epsilon-stage LDM steps of the held-out-class model (default 3200, the shipped recipe)")
    p.add_argument("--heldout-v-steps", type=int, default=3000,
                   help="v-stage LDM steps of the held-out-class model (default 3000, the shipped recipe)")
    p.add_argument("--heldout-anneal-steps", type=int, default=2000,
                   help="annealing-stage LDM steps of the held-out-class model (default 2000, the shipped recipe)")
    p.add_argument("--low", metavar="DIR", help="experts: the low-noise expert (a unet-ldm directory)")
    p.add_argument("--boundary", type=int,
                   help="experts: timesteps below this go to the low-noise expert (default: the preset's, 400)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global CLASSIFIER_DIR
    CLASSIFIER_DIR = args.classifier
    stages = ["train", "package", "check", "heldout"] if args.stage == "all" else [args.stage]
    for stage in stages:
        globals()[stage.replace("-", "_")](args)


if __name__ == "__main__":
    main()

"""The classifier checks of a model (``check``, ``demo``, ``ceiling``, ``vae-l1``) and the helpers every
measuring stage shares: the esc50-classifier, generation over seeds, top-1 / top-5 scores per class."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from . import settings


@functools.lru_cache(maxsize=None)
def _classifier():
    """The esc50-classifier feature model (the shipped weights, or ``settings.CLASSIFIER_DIR``'s:
    ``--classifier DIR``), loaded once per run (check and heldout classify several times)."""
    from reaudio_core.registry import create
    return create("feature_model", "esc50-classifier", weights=settings.CLASSIFIER_DIR)


def _classifier_name() -> str:
    return f"esc50-classifier ({settings.CLASSIFIER_DIR or 'plugins/weights/esc50-classifier'})"


def _classifier_stem() -> str:
    return f"-clf-{Path(settings.CLASSIFIER_DIR).resolve().name}" if settings.CLASSIFIER_DIR else ""


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
    settings.RESULTS.mkdir(parents=True, exist_ok=True)
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
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    real = [load_audio(settings.DATA / r["file"]) for r in rows]
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
    demo = [pipe(settings.DEMO_PROMPTS, seed=seed, progress=False) for seed in range(settings.DEMO_SEEDS)]
    if stem == "offline-check":
        img = settings.REPO / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for prompt, mel, nb in zip(demo[0].prompts, demo[0].mels, demo[0].neighbours):
            save_mel_png(img / f"offline-{prompt.replace(' ', '-')}.png", mel, title=prompt,
                         captions=[n["caption"] for n in nb])
    _, probs = _classify(list(torch.cat([out.waveforms for out in demo])))
    heard = [labels[i] for i in probs.argmax(-1).tolist()]
    results["demo"] = {p: {"asked": c, "top1_per_seed": heard[i::len(settings.DEMO_PROMPTS)]}
                       for i, (p, c) in enumerate(zip(settings.DEMO_PROMPTS, settings.DEMO_CLASSES))}
    (settings.RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
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
    md += ["", f"Demo prompts (retrieval on, seeds 0-{settings.DEMO_SEEDS - 1}; classifier's top-1 per seed): "
           + "; ".join(f"\"{p}\" -> {', '.join(d['top1_per_seed'])} "
                       f"({sum(h == d['asked'] for h in d['top1_per_seed'])}/{settings.DEMO_SEEDS} "
                       f"{d['asked']})" for p, d in results["demo"].items()) + "."]
    (settings.RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
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
    waves = _generate(pipe, settings.DEMO_PROMPTS, seeds)  # seed-major
    labels, probs = _classify(waves)
    heard = [labels[i] for i in probs.argmax(-1).tolist()]
    gen = pipe.cfg["generation"]
    out = {"model": "offline preset (plugins/weights/offline)" if not args.model else str(args.model),
           "classifier": _classifier_name(), "seeds": seeds, "guidance": gen["guidance"], "steps": gen["steps"],
           "sampler": gen["sampler"], "k": gen["k"], "seconds": round(time.time() - t0, 1),
           "prompts": {p: {"asked": c, "top1_per_seed": heard[i::len(settings.DEMO_PROMPTS)]}
                       for i, (p, c) in enumerate(zip(settings.DEMO_PROMPTS, settings.DEMO_CLASSES))}}
    stem = "offline-demo" + (f"-{Path(args.model).resolve().parent.name}" if args.model else "")
    if args.guidance is not None:
        stem += f"-guidance{args.guidance:g}"
    stem += f"-seeds{len(seeds)}" + _classifier_stem()
    settings.RESULTS.mkdir(parents=True, exist_ok=True)
    (settings.RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    md = [f"Model: {out['model']}; classifier: {out['classifier']}; 16 kHz, {gen['duration']} s, {gen['steps']} "
          f"{gen['sampler']} steps, guidance {gen['guidance']}, k {gen['k']}; seeds 0-{len(seeds) - 1}. Command: "
          "`python -m research.offline_preset demo` (options in the file name).", "",
          "| prompt | heard as asked | heard otherwise |", "|---|---|---|"]
    for p, d in out["prompts"].items():
        hits = sum(h == d["asked"] for h in d["top1_per_seed"])
        others = Counter(h for h in d["top1_per_seed"] if h != d["asked"])
        md.append(f"| {p} | {hits}/{len(seeds)} | {', '.join(f'{k} x{v}' for k, v in others.most_common()) or '-'} |")
    (settings.RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
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
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    targets = [r["category"] for r in rows]
    frames = M.seconds_to_frames(pipe.cfg["generation"]["duration"])
    # --vae-only, --decoder, --vae: the real and vocoder rows do not involve the VAE; keep them from the last full run
    vae_row_only = next((f for f, on in (("--vae-only", args.vae_only), ("--decoder", args.decoder),
                                         ("--vae", args.vae)) if on), None)
    stem += _classifier_stem()
    # the full run judged by the same classifier
    previous = settings.RESULTS / f"offline-ceiling{_classifier_stem()}.json"
    kept = {k: v for k, v in json.loads(previous.read_text())["rows"].items() if k in ("real", "vocoder")} \
        if vae_row_only and previous.exists() else {}
    if vae_row_only and not {"real", "vocoder"} <= set(kept):
        raise SystemExit(f"{vae_row_only} needs the real and vocoder rows of a full ceiling run in {previous}")
    t0 = time.time()
    waves = {key: [] for key in ("real", "vocoder", "vae") if key not in kept}
    with torch.no_grad():
        for r in tqdm(rows, desc="ceiling", unit="clip"):
            wav = load_audio(settings.DATA / r["file"])
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
    (settings.RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
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
    (settings.RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))



def vae_l1(args) -> None:
    """Log-mel L1 of the VAE round trip (posterior mean, full 5.12 s clips) on all 400 clips, for the stage-1
    VAE and the stage-1b decoder (same encoder): how much sharper the shipped decoder is."""
    import csv

    import torch

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_plugins.vae import VAE
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))
    mels = torch.cat([M.waveform_to_mel(load_audio(settings.DATA / r["file"]), M.seconds_to_frames(5.12))
                      for r in rows])
    md = [f"Log-mel L1 (natural-log mel units, mean over elements) of mel -> VAE encode (posterior mean) -> decode, "
          f"all {len(rows)} ESC-50 fold-4 clips, 16 kHz, 5.12 s.", "", "| VAE | L1 |", "|---|---|"]
    results = {}
    for name in ("offline-vae", "offline-vae-decoder"):
        vae = VAE.from_pretrained(settings.RUNS / name / "final" / "decoder")
        with torch.no_grad():
            err = torch.cat([(vae.decode(vae.encode(m)) - m).abs().mean((1, 2)) for m in mels.split(25)])
        results[name] = float(err.mean())
        md.append(f"| runs/{name}/final/decoder | {results[name]:.3f} |")
    (settings.RESULTS / "offline-vae-l1.json").write_text(json.dumps(results, indent=2))
    (settings.RESULTS / "offline-vae-l1.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

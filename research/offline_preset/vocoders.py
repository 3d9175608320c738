"""A trained ``vocos`` vocoder against the offline preset's Griffin-Lim, on the same mels (issue 23, item 4).

    python -m research.offline_preset.vocoders --vocos runs/offline-vocos/final/vocoder [--threads 1]

Two sets of log-mels, made once and vocoded by both vocoders:

* (a) VAE round trip: all 400 ESC-50 fold-4 clips -> log-mel (5.12 s, the preset's duration) -> the shipped
  VAE (plugins/weights/offline/decoder) encode (posterior mean) / decode; also (a0) the clips' log-mels
  without the VAE;
* (b) generated: the offline preset's 50 class prompts (the ESC-50 class names, underscores as spaces),
  seed 0, its own settings (retrieval audio+text, 20 DPM-Solver steps, guidance 5); the mels are cached in
  runs/offline-vocoders/generated-mels.pt.

Each vocoded set is scored with the shipped esc50-classifier (trained on these same 400 clips): top-1 / top-5
against the clip's class (a) or the prompt's class (b), and FAD of its 0.96 s embedding frames against those of
the 400 real clips as loaded (reaudio_core.evaluation's Gaussian fit and Frechet distance). Also the seconds
per clip of each vocoder on this run's threads. Writes docs/results/offline-vocoders.{md,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from . import settings

BATCH = 25


def _fad(model, wavs, reference_stats) -> float:
    import numpy as np

    from reaudio_core.evaluation import frechet_distance, gaussian
    frames = np.concatenate(model.embed_frames([w.numpy() for w in wavs]))
    return frechet_distance(*gaussian(frames), *reference_stats)


def _vocode(vocoder, mels, desc: str):
    """``mels [N, T, 64]`` -> (waveforms [N, T * 160], seconds per clip)."""
    import torch
    from tqdm import tqdm
    t0 = time.perf_counter()
    with torch.inference_mode():
        waves = torch.cat([vocoder(m) for m in tqdm(mels.split(BATCH), desc=desc, unit="batch")])
    return waves, (time.perf_counter() - t0) / len(mels)


def _generated_mels(pipe, prompts, cache: Path):
    import torch
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["prompts"] == prompts:
            return saved["mels"]
    from tqdm import tqdm
    mels = []
    for i in tqdm(range(0, len(prompts), 10), desc="generate (10 prompts each)", unit="batch"):
        mels.append(pipe(prompts[i:i + 10], seed=0, progress=False).mels)
    mels = torch.cat(mels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prompts": prompts, "mels": mels}, cache)
    return mels


def compare(vocos_dir: str, threads: int, limit: int | None = None) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    from reaudio_core import mel as M
    from reaudio_core.audio import load_audio
    from reaudio_core.evaluation import gaussian
    from reaudio_core.pipeline import ReAudioPipeline
    from reaudio_core.registry import create

    from .checks import _classifier, _classifier_name, _classify, _score
    torch.set_num_threads(threads)
    pipe = ReAudioPipeline.from_preset("offline")
    vocoders = {"griffin-lim": pipe.vocoder, "vocos": create("vocoder", "vocos", checkpoint=vocos_dir)}
    rows = list(csv.DictReader(open(settings.DATA / "metadata.csv", encoding="utf-8")))[:limit]
    frames = M.seconds_to_frames(pipe.cfg["generation"]["duration"])
    real = [load_audio(settings.DATA / r["file"]) for r in tqdm(rows, desc="read", unit="clip")]
    with torch.inference_mode():
        mels = torch.cat([M.waveform_to_mel(w, frames) for w in real])
        vae = torch.cat([pipe.decoder.decode(pipe.decoder.encode(m))
                         for m in tqdm(mels.split(BATCH), desc="VAE round trip", unit="batch")])
    labels = _classify([np.zeros(16000, np.float32)])[0]
    prompts = [label.replace("_", " ") for label in labels][:limit]
    cache = settings.RUNS / "offline-vocoders" / ("generated-mels.pt" if limit is None else f"generated-mels-{limit}.pt")
    generated = _generated_mels(pipe, prompts, cache)
    clf = _classifier()
    reference = gaussian(np.concatenate(clf.embed_frames([np.asarray(w, np.float32) for w in real])))
    sets = {"real-mel": (mels, [r["category"] for r in rows]), "vae": (vae, [r["category"] for r in rows]),
            "generated": (generated, labels[:len(prompts)])}
    weights = Path(vocos_dir) / "model.safetensors"
    where = Path(vocos_dir).resolve()
    out = {"vocos": str(where.relative_to(settings.REPO) if where.is_relative_to(settings.REPO) else where), "vocos_config": vocoders["vocos"].config(),
           "vocos_params": sum(p.numel() for p in vocoders["vocos"].model.parameters()),
           "vocos_bytes": weights.stat().st_size if weights.exists() else None, "clips": len(rows), "prompts": len(prompts),
           "classifier": _classifier_name(), "threads": threads,
           "sample_rate": 16000, "seconds_per_clip": pipe.cfg["generation"]["duration"], "rows": {}}
    real_score = _score(*_classify(real), [r["category"] for r in rows])
    out["rows"]["real clips"] = {"top1": real_score["top1"], "top5": real_score["top5"],
                                 "fad": _fad(clf, [torch.as_tensor(w) for w in real], reference)}
    for set_name, (set_mels, targets) in sets.items():
        for voc_name, vocoder in vocoders.items():
            waves, per_clip = _vocode(vocoder, set_mels, f"{set_name} / {voc_name}")
            s = _score(*_classify(list(waves)), targets)
            out["rows"][f"{set_name} / {voc_name}"] = {"top1": s["top1"], "top5": s["top5"],
                                                       "fad": _fad(clf, list(waves), reference),
                                                       "vocoder_s_per_clip": per_clip, "clips": len(waves)}
            print(f"{set_name} / {voc_name}: {out['rows'][f'{set_name} / {voc_name}']}", flush=True)
    return out


NAMES = {"real-mel": "(a0) real clips -> log-mel", "vae": "(a) real clips -> log-mel -> shipped VAE",
         "generated": "(b) offline preset, the class prompts, seed 0"}


def markdown(out: dict) -> str:
    md = [f"Vocoders on the same mels: Griffin-Lim (the preset's: 32 iterations, n_fft 1024) against vocos "
          f"({out['vocos']}: {', '.join(f'{k} {v}' for k, v in out['vocos_config'].items() if k not in ('checkpoint', 'device'))}; "
          f"{out['vocos_params'] / 1e6:.2f} M parameters, {(out['vocos_bytes'] or 0) / 1e6:.1f} MB). Classifier and FAD features: {out['classifier']}, trained on the 400 real clips; FAD "
          f"against the 400 real ESC-50 fold-4 clips as loaded; 16 kHz, {out['seconds_per_clip']} s mels; vocoder "
          f"time per clip on {out['threads']} thread(s), shared machine. Command: "
          "`python -m research.offline_preset.vocoders --vocos DIR`.", "",
          "| mels | vocoder | clips | top-1 | top-5 | FAD | vocoder s / clip |", "|---|---|--:|--:|--:|--:|--:|"]
    r = out["rows"]["real clips"]
    md.append(f"| real clips as loaded (no vocoder) | - | {out['clips']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['fad']:.2f} | - |")
    for key, r in out["rows"].items():
        if key == "real clips":
            continue
        set_name, voc = key.split(" / ")
        md.append(f"| {NAMES[set_name]} | {voc} | {r['clips']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['fad']:.2f} | "
                  f"{r['vocoder_s_per_clip']:.3f} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m research.offline_preset.vocoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocos", required=True, help="a trained vocos folder (OUT/final/vocoder of `reaudio train "
                                                  "--config configs/offline-vocos.yaml --out OUT`)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--limit", type=int, default=None, help="smoke run: the first N clips and N prompts only")
    p.add_argument("--out", type=Path, default=None, help="result files stem (default docs/results/offline-vocoders)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = compare(args.vocos, args.threads, args.limit)
    stem = args.out or settings.RESULTS / "offline-vocoders"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(out, indent=2))
    Path(f"{stem}.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()

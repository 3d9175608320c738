"""Reproduce, package and check the offline preset (issue: training and the offline preset).

One command retrains the shipped weights from the real ESC-50 fold-4 audio and re-runs the checks::

    python -m research.offline_preset all

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
* ``fast``    - ``reaudio distill`` of the shipped model with configs/offline-fast.yaml into runs/offline-fast (4 steps),
  then configs/offline-fast8.yaml into runs/offline-fast8 (continued on 8 steps), then that student's denoiser (4-bit
  differences from the teacher's weights) with the preset's config.yaml into ``plugins/weights/offline-fast/``.
* ``fast-sweep`` - the offline-fast student on the ONNX engine at other step counts and guidance scales ->
  docs/results/offline-fast-sweep.{md,json}
* ``fast-check`` - the offline preset (teacher) against offline-fast (student, or ``--model DIR``) in one run:
  denoising and whole-command wall time, classifier top-1 / top-5 over the 50 class prompts x ``--seeds``
  (default 2), FAD against the real clips -> docs/results/offline-fast.{md,json}
* ``demo``    - the four demo prompts with 16 seeds each (``--seeds N``): how often each is heard as asked
  -> docs/results/offline-demo[-<run>][-guidance<G>]-seeds<N>.{md,json}
* ``experts`` - a pipeline directory with a low-noise expert (``--low DIR``) beside a model's UNet, for
  ``check`` / ``renoise --model`` -> runs/offline-experts-<run>-b<boundary>/final
"""
from __future__ import annotations

import argparse
import os

from . import checks, experiments, fast, settings, stages

#: every stage by its command-line name (``all`` runs train, package, check and heldout in that order)
STAGES = {"train": stages.train, "package": stages.package, "experts": stages.experts,
          "check": checks.check, "demo": checks.demo, "ceiling": checks.ceiling, "vae-l1": checks.vae_l1,
          "heldout": experiments.heldout, "conditional": experiments.conditional,
          "renoise": experiments.renoise, "diagnose": experiments.diagnose,
          "fast": fast.fast, "fast-check": fast.fast_check, "fast-sweep": fast.fast_sweep}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m research.offline_preset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "train", "package", "check", "ceiling", "conditional", "vae-l1", "diagnose",
                                         "heldout", "renoise", "experts", "demo", "fast", "fast-check",
                                         "fast-sweep"])
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
    p.add_argument("--repeats", type=int, default=None,
                   help="fast-check: timed single-clip runs and whole commands per model (default 3)")
    p.add_argument("--low", metavar="DIR", help="experts: the low-noise expert (a unet-ldm directory)")
    p.add_argument("--boundary", type=int,
                   help="experts: timesteps below this go to the low-noise expert (default: the preset's, 400)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings.CLASSIFIER_DIR = args.classifier
    for stage in ["train", "package", "check", "heldout"] if args.stage == "all" else [args.stage]:
        STAGES[stage](args)

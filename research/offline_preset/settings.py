"""Paths and constants every stage of research.offline_preset reads.

Stages read them as ``settings.NAME`` at call time, so a test (or the command line: ``--classifier`` sets
``CLASSIFIER_DIR``) that changes one here reaches every stage module."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("REAUDIO_DATA") or REPO.parent / "shared" / "data") / "esc50-fold4"  # $REAUDIO_DATA
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

RENOISE_CLASSES = ("dog", "rain", "church_bells", "siren", "frog")
RENOISE_STARTS = (0, 200, 400, 600, 800, 1000)
RENOISE_STEPS = 50  # DDIM steps over the whole schedule; a start t0 runs the ones at or below it
CLASSIFIER_DIR: str | None = None  # --classifier DIR (None: plugins/weights/esc50-classifier)

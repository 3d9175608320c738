"""``reaudio train``: the VAE, the retrieval LDM denoiser and the vocoder (reference section 5).

One loop for every stage, reading top to bottom in :meth:`Trainer.run`:

    manifest / database -> validity scan (bad clips skipped, reported) -> random crops -> log-mel
        -> stage objective (VAE: mel reconstruction + KL; LDM: epsilon MSE with guidance dropout;
           vocoder: mel L1 + multi-resolution STFT) -> AdamW with linear warm-up, gradient clipping,
           EMA, autocast -> log.jsonl -> atomic checkpoints -> final export (save_pretrained)

Configuration: the ``training`` section of ``registry.yaml`` (documented there) plus the usual
component slots; ready-made files in ``configs/``. ``training.trainable: retrieval`` trains only the
denoiser's retrieval layers (:func:`select_trainable`; docs/retrofit.md). Under
``torchrun --nproc_per_node N`` the same command trains with DistributedDataParallel (gloo on CPU, nccl
on CUDA); only rank 0 writes.

Determinism and resumption: every random draw of a step (crop offsets, diffusion noise and
timesteps, guidance dropout, posterior samples) comes from a seed derived from
``(training.seed, step, rank)``; the data order is :class:`DistributedSampler`'s permutation of
epoch ``step // steps_per_epoch``. A checkpoint therefore only needs the step, the model, EMA,
optimizer, LR-scheduler and loss-scaler states (the global RNG states are saved and restored
too) for a resumed run to reproduce an uninterrupted one bit for bit on the same machine.

Modules, by job: :mod:`.checkpoint` (step seeds, RNG states, atomic checkpoints), :mod:`.data` (manifest
clips, validity scan, crops, step batches, skip report), :mod:`.components` (the torch modules and weights
of components), :mod:`.objectives` (the stages' losses, the VAE's discriminator), :mod:`.stages` (the vae
and vocoder stages), :mod:`.ldm` (the ldm stage), :mod:`.distill` (the distill stage: a few-step,
guidance-distilled student of a saved pipeline; ``reaudio distill``), :mod:`.trainer` (the loop, its log, :func:`train`).
This package re-exports their names: ``from reaudio_core.training import train`` and the like.
"""
from __future__ import annotations

from ..io import atomic_save, atomic_write_text
from ..registry import ReaudioError
from .checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, GLOBAL_SLOT, checkpoint_path,
                         latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state, step_seed)
from .components import component_fingerprint, feature_info, load_or_build, move_component, torch_module
from .data import (HOP, MEL_FPS, SKIP_REPORT, Clip, ClipDataset, ScanResult, StepBatches, collate, crop_waveform,
                   normalise_waveform, read_manifest_clips, scan_clips, waveform_to_mel, write_skip_report)
from .distill import DistillObjective, DistillStage, distill_config, student_entry
from .ldm import LdmStage, UnloadedTextEncoder, text_feature_key
from .objectives import LdmObjective, MelDiscriminator, VaeObjective, VocoderObjective, timestep_range
from .stages import Stage, VaeStage, VocoderStage
from .trainer import (FINAL_DIR, KILL_HOOK, LOG_FILE, NAN_HOOK, PRECISIONS, STAGE_CLASSES, STAGES, TRAINABLE,
                      NonFiniteLoss, RunLog, Trainer, TrainResult, autocast_context, lr_factor, select_trainable,
                      train)

__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "FINAL_DIR", "GLOBAL_SLOT", "HOP", "KILL_HOOK",
    "LOG_FILE", "MEL_FPS", "NAN_HOOK", "PRECISIONS", "SKIP_REPORT", "STAGES", "STAGE_CLASSES", "TRAINABLE",
    "Clip", "ClipDataset", "DistillObjective", "DistillStage", "LdmObjective", "LdmStage", "MelDiscriminator", "NonFiniteLoss", "ReaudioError",
    "RunLog", "ScanResult", "Stage", "StepBatches", "TrainResult", "Trainer", "UnloadedTextEncoder",
    "VaeObjective", "VaeStage", "VocoderObjective", "VocoderStage", "atomic_save", "atomic_write_text",
    "autocast_context", "checkpoint_path", "collate", "component_fingerprint", "crop_waveform", "distill_config", "feature_info",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_or_build", "lr_factor", "move_component",
    "normalise_waveform", "read_manifest_clips", "rng_state", "save_checkpoint", "scan_clips", "select_trainable",
    "set_rng_state", "step_seed", "student_entry", "text_feature_key", "timestep_range", "torch_module", "train",
    "waveform_to_mel", "write_skip_report",
]

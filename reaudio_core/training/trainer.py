"""The training loop (:meth:`Trainer.run`), its log (:class:`RunLog`) and :func:`train`, the entry point of
``reaudio train``."""
from __future__ import annotations


import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..config import save_config
from ..io import atomic_write_text, replace_dir
from ..registry import ReaudioError
from .checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, GLOBAL_SLOT, latest_checkpoint,
                         list_checkpoints, rng_state, save_checkpoint, set_rng_state, step_seed)
from .components import move_component
from .data import SKIP_REPORT, StepBatches, collate, write_skip_report
from .distill import DistillStage
from .ldm import LdmStage
from .stages import Stage, VaeStage, VocoderStage

log = logging.getLogger("reaudio.train")

STAGES = ("vae", "ldm", "vocoder", "distill")
TRAINABLE = ("all", "retrieval")
PRECISIONS = ("fp32", "bf16", "fp16")
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"

#: test hooks (environment): stop the process with SIGKILL right after this step completes /
#: make the loss of this step NaN. Used by tests/test_training.py; harmless when unset.
KILL_HOOK = "REAUDIO_TEST_KILL_AT_STEP"
NAN_HOOK = "REAUDIO_TEST_NAN_AT_STEP"


class NonFiniteLoss(ReaudioError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is untouched."""


def select_trainable(stage: "Stage", trainable: str) -> None:
    """``training.trainable``: ``all`` leaves the stage's choice (everything it trains); ``retrieval`` (ldm
    stage) sets ``requires_grad`` False on every parameter of the objective except the denoiser's retrieval
    layers, which the denoiser names through ``retrieval_parameters()`` (``UNetLDM``: the stream
    cross-attention transformers). The trainer then optimises (and keeps the EMA of) those only."""
    if trainable == "all":
        return
    denoiser = stage.denoiser
    name = stage.cfg["denoiser"]["name"]
    get = getattr(denoiser, "retrieval_parameters", None)
    if not callable(get):
        raise ReaudioError(f"training.trainable=retrieval: denoiser '{name}' does not name its retrieval layers (no "
                           "retrieval_parameters()); use training.trainable=all")
    chosen = list(get())
    if not chosen:
        raise ReaudioError(f"training.trainable=retrieval: denoiser '{name}' has no retrieval layers (text_dim="
                           f"{getattr(denoiser, 'text_dim', None)}, audio_dim={getattr(denoiser, 'audio_dim', None)}); "
                           "set text_dim / audio_dim to add the caption / audio streams, or use training.trainable=all")
    own = {id(p) for p in stage.objective.parameters()}
    if any(id(p) not in own for p in chosen):
        raise ReaudioError(f"training.trainable=retrieval: denoiser '{name}' returned retrieval parameters that are "
                           "not part of the module being trained")
    stage.objective.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)


def lr_factor(warmup: int, max_steps: int, decay: str):
    """The learning-rate multiplier of step ``s``: linear warm-up over ``warmup`` steps, then constant
    (``decay: none``) or a cosine from 1 to 0 at ``max_steps`` (``decay: cosine``)."""
    if decay not in ("none", "cosine"):
        raise ReaudioError(f"training.lr_decay must be none or cosine, got {decay!r}")

    def factor(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if decay == "cosine":
            span = max(1, max_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / span)))
        return 1.0
    return factor

STAGE_CLASSES = {"vae": VaeStage, "ldm": LdmStage, "vocoder": VocoderStage, "distill": DistillStage}


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    stage: str
    out: Path
    start_step: int
    steps: int
    final: Path | None
    last_loss: float | None
    seconds: float
    samples_per_s: float | None
    skipped: list[tuple[str, str]]
    checkpoint: Path | None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"trained {self.stage}: steps {self.start_step} -> {self.steps} in {self.seconds:.1f} s"
                 + (f" ({self.samples_per_s:.2f} samples/s)" if self.samples_per_s else "")
                 + (f", last loss {self.last_loss:.5g}" if self.last_loss is not None else "")]
        for k, v in self.extra.items():
            lines.append(f"{k}: {v}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} clip(s) (listed in {self.out / SKIP_REPORT}):")
            lines += [f"  {p}: {r}" for p, r in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"  ... and {len(self.skipped) - 10} more")
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint}")
        if self.final:
            lines.append(f"exported: {self.final}")
        return "\n".join(lines)


class RunLog:
    """``log.jsonl`` (one JSON object per logged step; rank 0 only) + TensorBoard when installed."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path = out / LOG_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # forget rows past the checkpoint: those steps are about to be redone
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    break  # a row cut by kill -9
            atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def autocast_context(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ReaudioError(f"training.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ReaudioError("training.precision=fp16 needs CUDA; on CPU use bf16 (autocast) or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _cfg_fingerprint(cfg: dict) -> dict:
    """The parts of a config that must not change across --resume."""
    out = copy.deepcopy(cfg)
    t = out.get("training", {})
    for key in ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "out",
                "threads", "cache_audio"):
        t.pop(key, None)
    out.get("generation", {}).pop("database", None)
    return out


class Trainer:
    def __init__(self, cfg: dict, out: Path, env: distributed.DistEnv, progress: bool = True):
        self.cfg, self.t, self.out, self.env, self.progress = cfg, cfg["training"], out, env, progress
        t = self.t
        for key in ("batch_size", "max_steps", "checkpoint_every", "log_every"):
            if not isinstance(t[key], int) or t[key] < 1:
                raise ReaudioError(f"training.{key} must be a positive integer, got {t[key]!r}")
        if t["stage"] not in STAGES:
            raise ReaudioError(f"training.stage must be one of {STAGES}, got {t['stage']!r}")
        autocast_context(t["precision"], env.device)  # validate early
        if t["trainable"] not in TRAINABLE:
            raise ReaudioError(f"training.trainable must be one of {TRAINABLE}, got {t['trainable']!r}")
        if t["trainable"] == "retrieval" and t["stage"] != "ldm":
            raise ReaudioError(f"training.trainable=retrieval trains the denoiser's retrieval layers: it needs "
                               f"training.stage=ldm, not {t['stage']}")
        if t["threads"]:
            torch.set_num_threads(int(t["threads"]))
        torch.manual_seed(t["seed"])  # initial weights
        random.seed(t["seed"])
        np.random.seed(t["seed"] % 2**32)
        self.stage: Stage = STAGE_CLASSES[t["stage"]](cfg, env, progress)
        if env.device.type != "cpu":
            for component in self.stage.components():
                move_component(component, env.device)
        self.objective = self.stage.objective.to(env.device)
        self.objective.train()
        select_trainable(self.stage, t["trainable"])
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        if not self.params:
            raise ReaudioError(f"the {t['stage']} stage found no trainable parameters")
        if t["trainable"] != "all" and env.is_main:
            total = sum(p.numel() for p in self.objective.parameters())
            log.info(f"training.trainable={t['trainable']}: {sum(p.numel() for p in self.params)} of {total} "
                  "parameters trained, the rest frozen")
        self.model: nn.Module = self.objective
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(
                self.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=bool(t["ddp_find_unused"]) or self.stage.routes_rows)
        self.optimizer = torch.optim.AdamW(self.params, lr=float(t["lr"]), betas=tuple(t["betas"]),
                                           weight_decay=float(t["weight_decay"]))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(int(t["warmup_steps"]), int(t["max_steps"]), t["lr_decay"]))
        self.ema = None
        if float(t["ema_decay"]) > 0:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.params, decay=float(t["ema_decay"]))
        self.scaler = torch.amp.GradScaler("cuda") if t["precision"] == "fp16" else None

    # state ------------------------------------------------------------------------------------
    def trained_module(self) -> nn.Module:
        """The module whose weights are checkpointed (the objective's trainable component)."""
        return self.objective

    def state(self, step: int) -> dict:
        import yaml
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                "stage": self.t["stage"], "world_size": self.env.world,
                "model": {k: v.detach().cpu() for k, v in self.trained_module().state_dict().items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(), "config": yaml.safe_dump(self.cfg, sort_keys=False),
                "extra": self.extra_state()}

    def extra_state(self) -> dict:
        sf = getattr(self.stage, "scale_factor", None)
        return {"scale_factor": sf} if sf is not None else {}

    def restore(self, state: dict) -> int:
        import yaml
        from ..config import _merge
        from ..registry import get_registry
        # keys added to the defaults after the checkpoint was written take their default value
        saved = _merge(get_registry().defaults, yaml.safe_load(state["config"]))
        if _cfg_fingerprint(saved) != _cfg_fingerprint(self.cfg):
            diff = _first_difference(_cfg_fingerprint(saved), _cfg_fingerprint(self.cfg))
            raise ReaudioError(f"--resume: the configuration differs from the checkpoint's at {diff}; resume with "
                               "the same config (only training.max_steps, checkpoint/log intervals, num_workers "
                               "may change) or train into a new --out")
        if state.get("world_size", 1) != self.env.world:
            log.warning(f"checkpoint written with {state.get('world_size')} process(es), resuming with "
                  f"{self.env.world}: the data order differs from an uninterrupted run")
        self.trained_module().load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.env.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        sf = (state.get("extra") or {}).get("scale_factor")
        if sf is not None:
            self.stage.scale_factor = sf
        return int(state["step"])

    def checkpoint(self, step: int) -> Path | None:
        path = None
        if self.env.is_main:
            path = save_checkpoint(self.out, self.state(step), int(self.t["keep_checkpoints"]))
        distributed.barrier(self.env)
        return path

    # loop -------------------------------------------------------------------------------------
    def loader(self, start: int, stop: int):
        t = self.t
        batches = StepBatches(len(self.stage.dataset), t["batch_size"], self.env, t["seed"], start, stop)
        return torch.utils.data.DataLoader(self.stage.dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=int(t["num_workers"]),
                                           persistent_workers=False)

    def run(self, resume: bool) -> TrainResult:
        from tqdm.auto import tqdm
        t, env = self.t, self.env
        start, resumed_from = 0, None
        if resume:
            found = latest_checkpoint(self.out)
            if found is None:
                if env.is_main:
                    log.warning(f"--resume but no checkpoint in {self.out / CHECKPOINT_DIR}: starting at step 0")
            else:
                resumed_from, state = found
                start = self.restore(state)
                if env.is_main:
                    log.info(f"resuming from {resumed_from} (step {start})")
        elif list_checkpoints(self.out):
            raise ReaudioError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose "
                               "another --out")
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.stage.skipped:
                write_skip_report(self.out, self.stage.skipped)
                log.warning(f"skipped {len(self.stage.skipped)} unusable clip(s), listed in {self.out / SKIP_REPORT}:")
                for p, r in self.stage.skipped[:10]:
                    log.warning(f"  {p}: {r}")
            save_config(self.cfg, self.out)
        runlog = RunLog(self.out, env.is_main, start if resume else None)
        stop = int(t["max_steps"])
        kill_at = int(os.environ.get(KILL_HOOK, "0") or 0)
        nan_at = int(os.environ.get(NAN_HOOK, "0") or 0)
        last_ckpt = resumed_from
        last_loss = None
        window: list[float] = []
        t0 = time.perf_counter()
        t_window, n_window = time.perf_counter(), 0
        trained_samples = 0
        bar = tqdm(total=stop, initial=min(start, stop), desc=f"train {t['stage']}", unit="step",
                   disable=not (self.progress and env.is_main), dynamic_ncols=True)
        try:
            for step, batch in zip(range(start, stop), self.loader(start, stop)):
                seed = step_seed(t["seed"], step, env.rank)  # the objective's generator (noise, t, dropout)
                # a separate stream for randomness inside components (dropout layers, VAE posterior
                # sampling in LdmStage.prepare): never the same numbers as the diffusion noise
                torch.manual_seed(step_seed(t["seed"], step, env.rank, GLOBAL_SLOT))
                inputs = self.stage.prepare(batch, env.device)
                with autocast_context(t["precision"], env.device):
                    losses = self.model(inputs, seed)
                loss = losses["loss"].float()
                done = step + 1
                if nan_at and done == nan_at:
                    loss = loss * float("nan")
                names = sorted(losses)
                reduced = distributed.all_reduce_mean(env, torch.stack([losses[n].detach().float().reshape(())
                                                                        if n != "loss" else loss.detach()
                                                                        for n in names]))
                values = dict(zip(names, reduced.tolist()))
                if not math.isfinite(values["loss"]):
                    where = last_ckpt or "none written yet"
                    raise NonFiniteLoss(
                        f"non-finite loss ({values['loss']}) at step {done}: training stopped without applying "
                        f"it. Last good checkpoint: {where}. Lower training.lr, raise training.warmup_steps or "
                        "use training.precision=fp32, then rerun with --resume")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                grad_norm = None
                if t["grad_clip"] and float(t["grad_clip"]) > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, float(t["grad_clip"])))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.lr_schedule.step()
                if self.ema is not None:
                    self.ema.step(self.params)
                n = len(batch["pos"]) * env.world
                trained_samples += n
                n_window += n
                last_loss = values["loss"]
                window.append(last_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4g}")
                if done % t["log_every"] == 0 or done == stop:
                    now = time.perf_counter()
                    row = {"step": done, **values, "loss_avg": float(np.mean(window)),
                           "lr": self.lr_schedule.get_last_lr()[0], "samples_per_s": n_window / max(now - t_window, 1e-9),
                           "elapsed_s": now - t0}
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    runlog.write(row)
                    window, t_window, n_window = [], now, 0
                if done % t["checkpoint_every"] == 0 and done != stop:
                    last_ckpt = self.checkpoint(done)
                if kill_at and done == kill_at:
                    import signal
                    os.kill(os.getpid(), signal.SIGKILL)
            seconds = time.perf_counter() - t0
            final = self.finish()
            last_ckpt = self.checkpoint(stop) if start < stop or last_ckpt is None else last_ckpt
        finally:
            bar.close()
            runlog.close()
        return TrainResult(t["stage"], self.out, start, stop, final, last_loss, seconds,
                           trained_samples / seconds if trained_samples and seconds > 0 else None,
                           self.stage.skipped, last_ckpt if env.is_main else None, self.extra_state())

    def finish(self) -> Path | None:
        """Stage-specific end work (VAE scale factor) and the final export (rank 0)."""
        t, env = self.t, self.env
        use_ema = self.ema is not None and t["export_ema"]
        if use_ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            if isinstance(self.stage, VaeStage):  # on the batch of step 0, whether or not the run was resumed
                sampler = StepBatches(len(self.stage.dataset), t["batch_size"], self.env, t["seed"], 0, 1)
                first_batch = collate([self.stage.dataset[key] for key in next(iter(sampler))])
                mel = first_batch["mel"].to(env.device)
                self.stage.finish({"mel": mel}, step_seed(t["seed"], 0, env.rank, 99))
            final = None
            if env.is_main:
                final = self.out / FINAL_DIR
                tmp = self.out / f".{FINAL_DIR}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                self.objective.eval()
                self.stage.export(tmp)
                self.objective.train()
                replace_dir(tmp, final)
            distributed.barrier(env)
            return final
        finally:
            if use_ema:
                self.ema.restore(self.params)


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or '(root)'}: checkpoint {a!r}, now {b!r}"


def train(cfg: dict, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> TrainResult | None:
    """Run ``cfg['training']``; returns the result on rank 0 (``None`` on other ranks)."""
    t = cfg.get("training")
    if not t:
        raise ReaudioError("no training section in the configuration")
    out = out or t.get("out")
    if not out:
        raise ReaudioError("no output directory: pass --out DIR or set training.out")
    cfg = copy.deepcopy(cfg)
    cfg["training"]["out"] = str(out)
    env = distributed.init(t.get("device", "auto"))
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, Path(out), env, progress)
        result = trainer.run(resume)
        return result if env.is_main else None
    finally:
        torch.set_num_threads(threads)  # training.threads applies to this run only
        distributed.shutdown(env)

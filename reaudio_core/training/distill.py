"""``training.stage: distill`` (``reaudio distill --teacher MODEL``): a few-step, guidance-distilled student.

What it distils, in one phase:

* **guidance** (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one): the student
  takes the guidance scale ``w`` as an input (``Conditioning.guidance``; ``unet-ldm``'s
  ``guidance_embedding``) and is trained against the teacher's classifier-free-guided prediction
  ``u + w (c - u)``, with ``w`` drawn per sample from ``training.distill_guidance``; at generation it makes
  one batch-1 call per step instead of the batched conditional/unconditional pair;
* **steps** (progressive distillation, Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
  Diffusion Models", with a teacher of ``training.distill_substeps`` DDIM steps per student step in one phase
  instead of two, as in TRACT, Berthelot et al. 2023): the student's grid is the ``ddim-trailing`` sampler's
  for ``training.distill_steps`` steps (4: 999, 749, 499, 249, then to alpha 1). For a training latent ``x0``
  noised to a grid time ``t`` (``x_t``), the teacher takes ``distill_substeps`` deterministic DDIM steps with
  guidance from ``t`` to the next grid time ``s``; the target is the ``x0`` for which one DDIM step of the
  student from ``x_t`` lands exactly there: ``x0~ = (x_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t)
  alpha_t)`` (Salimans & Ho, Algorithm 2), expressed as the student's own prediction target (v or epsilon),
  MSE.

The student starts as a copy of the teacher (its guidance projection at zero) and is conditioned on the
retrieval streams exactly as the teacher: the data, neighbours, feature caches and conditions are the
``ldm`` stage's (:class:`~reaudio_core.training.ldm.LdmStage`), on the teacher's database. Everything else is
``reaudio train``'s machinery: resume, DDP, log.jsonl, atomic checkpoints, EMA, and an export with
``save_pretrained`` whose ``config.yaml`` runs the student (``generation.sampler: ddim-trailing``,
``generation.steps`` = the student's). The teacher's encoders, decoder, vocoder and database are reused as they
are; the database is copied into ``OUT/db`` first, so that the feature caches this stage writes never change the
teacher's.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..conditioning import Conditioning
from ..pretrained import Pretrained, read_json
from ..registry import ReaudioError, get_registry
from .components import torch_module
from .ldm import LdmStage

log = logging.getLogger("reaudio.train")


def distill_config(teacher: str, files=(), overrides=()) -> dict:
    """The configuration ``reaudio distill --teacher MODEL [--config FILE] [key=value ...]`` trains with: the
    teacher's saved ``config.yaml`` (its components, database, diffusion and generation settings), a fresh
    ``training`` section (registry defaults, ``stage: distill``, ``teacher: MODEL``), then ``files`` and
    ``overrides``."""
    from ..config import compose, load_config
    from ..loading import resolve_path
    path = resolve_path(teacher)
    if path is None or not (path / "config.yaml").is_file():
        raise ReaudioError(f"--teacher {teacher}: no saved pipeline there (config.yaml missing); give a directory "
                           "written by save_pretrained / `reaudio train` (OUT/final)")
    saved = load_config(path)
    saved["training"] = {"stage": "distill", "teacher": str(teacher)}
    cfg = compose(None, files, overrides, base=saved)
    cfg["preset"] = cfg.get("preset") or saved.get("preset")
    if cfg["training"]["stage"] != "distill":
        raise ReaudioError("reaudio distill trains training.stage=distill; use `reaudio train` for other stages")
    return cfg


def student_entry(name: str, directory: Path, width: int) -> dict:
    """The ``{name, params}`` of a student of the denoiser saved in ``directory`` (``save_pretrained``): the
    same component and sizes, loaded from those weights, with a guidance input of ``width`` features.
    ``experts`` gets one per expert (``directory/high``, ``directory/low``)."""
    saved = read_json(directory / "config.json") if (directory / "config.json").is_file() else None
    if saved is None:
        raise ReaudioError(f"{directory} holds no denoiser saved by save_pretrained (config.json missing)")
    if name == "experts":
        return {"name": "experts", "params": {
            "boundary": saved["boundary"], "checkpoint": None,
            "high": student_entry(saved["high"], directory / "high", width),
            "low": student_entry(saved["low"], directory / "low", width)}}
    known = get_registry().resolve_params("denoiser", name, {})
    if "guidance_embedding" not in known or "checkpoint" not in known:
        raise ReaudioError(f"denoiser '{name}' has no guidance_embedding parameter: reaudio distill needs a denoiser "
                           "that can take the guidance scale as an input (unet-ldm, or experts of unet-ldm)")
    params = {k: v for k, v in saved.items() if k in known}
    return {"name": name, "params": {**params, "guidance_embedding": int(width), "checkpoint": str(directory)}}


def grid(scheduler_cfg: dict, steps: int) -> list[int]:
    """The student's timesteps: the ``ddim-trailing`` sampler's for ``steps`` steps, then -1 (alpha = 1)."""
    from ..pipeline import make_scheduler
    s = make_scheduler(scheduler_cfg, "ddim-trailing")
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps] + [-1]


class DistillObjective(nn.Module):
    """Guidance + step distillation loss of one batch (module docstring)."""

    def __init__(self, student, teacher, alphas_cumprod: torch.Tensor, uncond: Conditioning, timesteps: list[int],
                 substeps: int, guidance: tuple[float, float], prediction_type: str):
        super().__init__()
        self.net = torch_module(student, "denoiser")
        self.__dict__["student"] = student
        self.__dict__["teacher"] = teacher  # frozen, not a submodule: not trained, saved or EMA'd
        self.register_buffer("alphas", torch.cat([alphas_cumprod.float(), torch.ones(1)]), persistent=False)  # [-1] = 1
        self.uncond = uncond
        self.grid = timesteps
        self.substeps, self.w_lo, self.w_hi = int(substeps), float(guidance[0]), float(guidance[1])
        self.v = prediction_type == "v_prediction"

    def _ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas[t].view(-1, 1, 1, 1)  # t = -1 picks the appended 1.0
        return a.sqrt(), (1 - a).clamp(min=0).sqrt()

    def _x0_eps(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        a, s = self._ab(t)
        if self.v:
            return a * x - s * pred, s * x + a * pred
        return (x - s * pred) / a, pred

    def _target(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the student predicts at ``(x, t)`` when its ``x0`` estimate is ``x0``."""
        a, s = self._ab(t)
        return (a * x - x0) / s if self.v else (x - a * x0) / s

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning,
                     uncond: Conditioning, w: torch.Tensor) -> torch.Tensor:
        """``x`` at ``t`` -> at ``s`` (< t) by ``substeps`` guided deterministic DDIM steps of the teacher."""
        both = uncond.cat(cond)
        for j in range(self.substeps):
            a = t - torch.div((t - s) * j, self.substeps, rounding_mode="floor")
            b = t - torch.div((t - s) * (j + 1), self.substeps, rounding_mode="floor")
            pred = self.teacher(torch.cat([x, x]), torch.cat([a, a]).clamp(min=0), both).float()
            p_u, p_c = pred.chunk(2)
            x0, eps = self._x0_eps(p_u + w.view(-1, 1, 1, 1) * (p_c - p_u), x, a)
            ab, sb = self._ab(b)
            x = ab * x0 + sb * eps
        return x

    def x0_target(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning,
                  uncond: Conditioning, w: torch.Tensor) -> torch.Tensor:
        """The ``x0`` whose DDIM step from ``(x_t, t)`` lands where the guided teacher's ``substeps`` land at
        ``s`` (Salimans & Ho 2022, Algorithm 2); at ``s = -1`` (alpha 1) the teacher's endpoint itself."""
        x_s = self.teacher_step(x_t, t, s, cond, uncond, w)
        (a_t, s_t), (a_s, s_s) = self._ab(t), self._ab(s)
        ratio = s_s / s_t
        return (x_s - ratio * x_t) / (a_s - ratio * a_t)

    def forward(self, batch: dict, seed: int) -> dict:
        x0 = batch["latents"]
        B, dev = x0.shape[0], x0.device
        g = torch.Generator(device=dev).manual_seed(seed)
        i = torch.randint(0, len(self.grid) - 1, (B,), generator=g, device=dev)
        grid = torch.tensor(self.grid, device=dev)
        t, s = grid[i], grid[i + 1]
        noise = torch.randn(x0.shape, generator=g, device=dev, dtype=x0.dtype)
        a_t, s_t = self._ab(t)
        x_t = a_t * x0 + s_t * noise
        w = self.w_lo + (self.w_hi - self.w_lo) * torch.rand(B, generator=g, device=dev)
        cond = batch["cond"]
        uncond = _rows_on(self.uncond, B, dev)
        x0_target = self.x0_target(x_t, t, s, cond, uncond, w)
        pred = self.student(x_t, t, dataclasses.replace(cond, guidance=w)).float()
        loss = nn.functional.mse_loss(pred, self._target(x0_target, x_t, t).float())
        return {"loss": loss, "guidance": w.mean().detach(), "t": t.float().mean().detach()}


def _rows_on(c: Conditioning, B: int, device) -> Conditioning:
    """``B`` copies of a one-row conditioning, on ``device``."""
    return Conditioning(**{f.name: (None if getattr(c, f.name) is None else
                                    getattr(c, f.name)[:1].expand(B, *getattr(c, f.name).shape[1:]).to(device))
                           for f in dataclasses.fields(c)})


class DistillStage(LdmStage):
    """The ``ldm`` stage's data and conditions; the teacher's components; a guidance-input student."""

    name = "distill"

    def __init__(self, cfg, env, progress):
        t = cfg["training"]
        if not t.get("teacher"):
            raise ReaudioError("the distill stage needs training.teacher (a saved pipeline: `reaudio distill "
                               "--teacher MODEL`)")
        from ..loading import resolve_path
        self.teacher_dir = resolve_path(t["teacher"])
        if not (self.teacher_dir / "config.yaml").is_file() or not (self.teacher_dir / "denoiser").is_dir():
            raise ReaudioError(f"--teacher {t['teacher']}: not a saved pipeline with a denoiser/ folder "
                               "(written by save_pretrained / `reaudio train`)")
        for key, ok in (("distill_steps", lambda v: isinstance(v, int) and v >= 1),
                        ("distill_substeps", lambda v: isinstance(v, int) and v >= 1),
                        ("guidance_embedding", lambda v: isinstance(v, int) and v >= 2 and v % 2 == 0),
                        ("distill_guidance", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                         and all(isinstance(x, (int, float)) for x in v) and 0 <= v[0] <= v[1])):
            if not ok(t.get(key)):
                raise ReaudioError(f"training.{key}: invalid value {t.get(key)!r} (registry.yaml says what it takes)")
        self.teacher_db = t.get("database") or cfg["generation"].get("database")
        if not self.teacher_db and (self.teacher_dir / "db").is_dir():  # a model folder that carries its database
            self.teacher_db = f"{str(t['teacher']).rstrip('/')}/db"
        db_src = resolve_path(self.teacher_db)
        if db_src is None:
            raise ReaudioError("the distill stage needs the teacher's database: set training.database=DIR")
        out = Path(t["out"])
        copy_db = out / "db"
        if env.is_main and not copy_db.exists():
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".db.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(db_src, tmp)
            tmp.rename(copy_db)
        from .. import distributed
        distributed.barrier(env)
        cfg = copy.deepcopy(cfg)
        cfg["training"]["database"] = str(copy_db)
        super().__init__(cfg, env, progress)

    def build_components(self, cfg) -> None:
        from ..pipeline import ReAudioPipeline
        teacher = ReAudioPipeline.from_pretrained(self.teacher_dir, db=cfg["training"]["database"])
        self.text_encoder, self.decoder, self.vocoder = teacher.text_encoder, teacher.decoder, teacher.vocoder
        self.teacher = teacher.denoiser
        if getattr(self.teacher, "guidance_input", False):
            raise ReaudioError(f"{self.teacher_dir}: its denoiser is already guidance-distilled; distil from the "
                               "20-step teacher it came from")
        if isinstance(getattr(self.teacher, "model", None), nn.Module):  # frozen (the objective holds it outside)
            self.teacher.model.requires_grad_(False).eval()
        entry = student_entry(cfg["denoiser"]["name"], self._student_from(cfg), cfg["training"]["guidance_embedding"])
        reg = get_registry()
        params = reg.resolve_params("denoiser", entry["name"], entry["params"])
        self.denoiser = reg.create("denoiser", entry["name"], **params)
        if not isinstance(self.denoiser, Pretrained):
            raise ReaudioError(f"denoiser '{entry['name']}' cannot be saved (not a Pretrained component)")
        self.caption_encoder = teacher.caption_encoder if self.denoiser.text_dim else None
        self.audio_encoder = teacher.audio_encoder if self.denoiser.audio_dim else None

    def _student_from(self, cfg) -> Path:
        """Where the student's weights start: the teacher's denoiser, or ``training.student_init`` (the denoiser
        folder of a saved student, e.g. a 4-step student continued as an 8-step one)."""
        init = cfg["training"].get("student_init")
        if not init:
            return self.teacher_dir / "denoiser"
        from ..loading import resolve_path
        d = resolve_path(init)
        d = d / "denoiser" if (d / "denoiser").is_dir() else d
        if not (d / "config.json").is_file():
            raise ReaudioError(f"training.student_init={init}: not a saved denoiser (no config.json)")
        saved, teacher = read_json(d / "config.json"), read_json(self.teacher_dir / "denoiser" / "config.json")
        parts = [read_json(d / e / "config.json") for e in ("high", "low")] if "high" in saved else [saved]
        same = {k: v for k, v in saved.items() if k not in ("guidance_embedding", "checkpoint")} == \
            {k: v for k, v in teacher.items() if k not in ("guidance_embedding", "checkpoint")}
        if not same or any(p.get("guidance_embedding") != cfg["training"]["guidance_embedding"] for p in parts):
            raise ReaudioError(f"training.student_init={init}: not a student of this teacher's denoiser with "
                               f"guidance_embedding {cfg['training']['guidance_embedding']} (its config.json differs)")
        return d

    def make_objective(self) -> nn.Module:
        t = self.t
        if t.get("timesteps") is not None:
            raise ReaudioError("training.timesteps does not apply to the distill stage (the student's grid is "
                               "training.distill_steps)")
        return DistillObjective(self.denoiser, self.teacher, self.scheduler.alphas_cumprod, self.uncond,
                                grid(self.cfg, int(t["distill_steps"])), int(t["distill_substeps"]),
                                tuple(t["distill_guidance"]), self.scheduler.config.prediction_type)

    def components(self) -> list:
        return [*super().components(), self.teacher]

    def export_cfg(self) -> dict:
        cfg = super().export_cfg()
        cfg["generation"].update(sampler="ddim-trailing", steps=int(self.t["distill_steps"]),
                                 database=self.teacher_db)
        cfg["training"]["database"] = self.teacher_db
        return cfg

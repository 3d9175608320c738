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
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import SLOTS, build, save_config
from .interfaces import SAMPLE_RATE, Conditioning
from .registry import ReaudioError, get_registry

log = logging.getLogger("reaudio.train")

STAGES = ("vae", "ldm", "vocoder")
TRAINABLE = ("all", "retrieval")
PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "reaudio-train-checkpoint"
CHECKPOINT_VERSION = 1
LOG_FILE = "log.jsonl"
SKIP_REPORT = "skipped.csv"
FINAL_DIR = "final"
MEL_FPS = 100  # mel frames per second (hop 160 at 16 kHz)
HOP = SAMPLE_RATE // MEL_FPS

#: test hooks (environment): stop the process with SIGKILL right after this step completes /
#: make the loss of this step NaN. Used by tests/test_training.py; harmless when unset.
KILL_HOOK = "REAUDIO_TEST_KILL_AT_STEP"
NAN_HOOK = "REAUDIO_TEST_NAN_AT_STEP"


class NonFiniteLoss(ReaudioError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is untouched."""


# ---------------------------------------------------------------------------------------------
# determinism helpers
# ---------------------------------------------------------------------------------------------
GLOBAL_SLOT = 1 << 30  #: step_seed slot of the global torch RNG (slots 1..batch are the items' crops)


def step_seed(seed: int, step: int, rank: int = 0, slot: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, step, rank, slot)``."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(slot)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) global RNG states as tensors (loadable with weights_only)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python_version": int(version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# atomic checkpoints
# ---------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``.

    Whatever happens mid-way (exception, full disk, kill -9), ``path`` holds either its previous
    content or the complete new one; the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint file in ``out/checkpoints``, oldest first."""
    directory = Path(out) / CHECKPOINT_DIR
    found = []
    if directory.is_dir():
        for p in directory.glob("step-*.pt"):
            try:
                found.append((int(p.stem.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(found)


def save_checkpoint(out: str | Path, state: dict, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-N.pt``; then prune to the newest ``keep``.

    Older checkpoints are deleted only after the new one is complete on disk.
    """
    path = atomic_save(state, checkpoint_path(out, state["step"]))
    if keep > 0:
        for _, old in list_checkpoints(out)[:-keep]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (never executes code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReaudioError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ReaudioError(f"{path} is not a reaudio training checkpoint")
    return state


def latest_checkpoint(out: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; unreadable newer files are reported and passed over."""
    for step, path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path)
        except ReaudioError as exc:
            print(f"warning: {exc}; trying an older checkpoint", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------------------
# data: manifest rows -> validity scan -> random crops -> log-mel
# ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    path: str
    caption: str = ""
    label: str | None = None
    index: int = -1  #: database id (ldm stage) or manifest row


@dataclass
class ScanResult:
    clips: list[Clip]
    audio: list[np.ndarray] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason)


def read_manifest_clips(manifests: Sequence[str | Path]) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Rows of the manifest CSV(s) (audio path relative to the CSV, caption, optional label), parsed by
    :func:`reaudio_core.database.read_manifest`; returns ``(clips, skipped (path, reason))``."""
    from .database import read_manifest
    clips, skipped = [], []
    for m in ([manifests] if isinstance(manifests, (str, Path)) else manifests):
        rows, bad, _ = read_manifest(m)
        clips += [Clip(r.path, r.caption, r.label) for r in rows]
        skipped += [(f"{s['path']} ({Path(s['manifest']).name}:{s['line']})", s["reason"]) for s in bad]
    for i, c in enumerate(clips):
        c.index = i
    return clips, skipped


def scan_clips(clips: list[Clip], min_duration: float, keep_audio: bool, env: distributed.DistEnv,
               progress: bool = False, silence_db: float | None = None) -> ScanResult:
    """Load every clip once; unreadable / empty / non-finite / too-short / silent ones are skipped, by the
    rules ``reaudio index build`` applies (:func:`reaudio_core.audio.load_audio`; ``silence_db``: peak at or
    below it in dBFS is silent, ``database.silence_db`` in a training run).

    With ``keep_audio`` every rank keeps all waveforms (each rank trains on all of them across
    epochs); otherwise the ranks check a shard each and share the verdicts.
    """
    from tqdm.auto import tqdm

    from .audio import AudioProblem, load_audio

    def check(part: Sequence[Clip], keep: bool):
        verdicts, audio = [], []
        for c in tqdm(part, desc="reading clips", disable=not progress, leave=False):
            try:
                wav = load_audio(c.path, min_duration=min_duration, silence_db=silence_db)
                verdicts.append(None)
                audio.append(wav if keep else None)
            except AudioProblem as exc:
                verdicts.append(str(exc))
                audio.append(None)
        return verdicts, audio

    if keep_audio:
        verdicts, audio = check(clips, True)
    else:
        shards = distributed.map_sharded(env, clips, lambda part: check(part, False)[0])
        verdicts, audio = [v for s in shards for v in s], None
    good = [i for i, v in enumerate(verdicts) if v is None]
    skipped = [(clips[i].path, v) for i, v in enumerate(verdicts) if v is not None]
    return ScanResult([clips[i] for i in good], [audio[i] for i in good] if audio is not None else None, skipped)


def crop_waveform(wav: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """The reference training segment: a random ``samples``-long crop, normalised (mean 0, peak 0.5),
    then zero-padded at the end when the clip is shorter (ALDM-T's order: crop, normalise, pad)."""
    if len(wav) > samples:
        start = int(rng.integers(0, len(wav) - samples + 1))
        wav = wav[start:start + samples]
    wav = normalise_waveform(np.ascontiguousarray(wav, dtype=np.float32))
    if len(wav) < samples:
        wav = np.pad(wav, (0, samples - len(wav)))
    return np.ascontiguousarray(wav, dtype=np.float32)


class ClipDataset(torch.utils.data.Dataset):
    """Indexed by ``(position, seed)`` keys from :class:`StepBatches`: the crop depends on the seed only."""

    def __init__(self, scan: ScanResult, crop_seconds: float, want_wave: bool = False, multiple: int = 1):
        self.clips, self.audio = scan.clips, scan.audio
        self.samples = int(round(float(crop_seconds) * SAMPLE_RATE))
        frames = self.samples / HOP
        if self.samples <= 0 or frames != int(frames) or int(frames) % multiple:
            raise ReaudioError(f"training.crop_seconds={crop_seconds} is {frames:g} mel frames; it must be a positive "
                               f"whole multiple of {multiple} frames ({multiple / MEL_FPS:g} s) for this model")
        self.want_wave = want_wave
        self.want_mel = True

    def __len__(self) -> int:
        return len(self.clips)

    def waveform(self, pos: int) -> np.ndarray:
        if self.audio is not None:
            return self.audio[pos]
        from .audio import AudioProblem, load_audio
        try:
            return load_audio(self.clips[pos].path)
        except AudioProblem as exc:  # the file changed since the scan
            raise ReaudioError(f"{self.clips[pos].path}: {exc} (it was readable when training started)") from None

    def __getitem__(self, key):
        pos, seed = key
        wav = crop_waveform(self.waveform(pos), self.samples, np.random.default_rng(seed))
        item = {"pos": pos}
        if self.want_mel:
            item["mel"] = waveform_to_mel(torch.from_numpy(wav)[None])[0]
        if self.want_wave:
            item["wave"] = torch.from_numpy(wav)
        return item


def normalise_waveform(wav: np.ndarray) -> np.ndarray:
    """Reference section 1: subtract the mean, scale the peak to 0.5."""
    from . import mel
    return np.asarray(mel.normalize_waveform(wav), dtype=np.float32)


def waveform_to_mel(wav: torch.Tensor) -> torch.Tensor:
    """``[B, samples]`` -> reference log-mel ``[B, samples // 160, 64]`` (differentiable)."""
    from . import mel
    return mel.log_mel(wav)


def collate(items: list[dict]) -> dict:
    out = {"pos": torch.tensor([i["pos"] for i in items])}
    for key in ("mel", "wave"):
        if key in items[0]:
            out[key] = torch.stack([i[key] for i in items])
    return out


class StepBatches(torch.utils.data.Sampler):
    """Batches of ``(position, seed)`` keys for steps ``start .. max_steps``; step-indexable.

    Each epoch's order is :class:`torch.utils.data.distributed.DistributedSampler`'s (shuffled with
    ``seed + epoch``, one shard per rank), cut into ``batch`` sized batches; step ``s`` is batch
    ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. A resumed run re-creates exactly the
    batches an uninterrupted one would have seen.
    """

    def __init__(self, n: int, batch: int, env: distributed.DistEnv, seed: int, start: int, stop: int):
        from torch.utils.data.distributed import DistributedSampler
        self.sampler = DistributedSampler(range(n), num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.batch, self.rank, self.seed, self.start, self.stop = batch, env.rank, seed, start, stop
        self.per_epoch = max(1, len(self.sampler) // batch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        step = self.start
        while step < self.stop:
            epoch, b = divmod(step, self.per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for bb in range(b, self.per_epoch):
                if step >= self.stop:
                    return
                chunk = order[bb * self.batch:(bb + 1) * self.batch]
                yield [(i, step_seed(self.seed, step, self.rank, 1 + j)) for j, i in enumerate(chunk)]
                step += 1


def write_skip_report(out: Path, skipped: list[tuple[str, str]]) -> None:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    atomic_write_text(out / SKIP_REPORT, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# component access
# ---------------------------------------------------------------------------------------------
def torch_module(component, what: str) -> nn.Module:
    """The ``nn.Module`` holding a component's trainable weights."""
    if isinstance(component, nn.Module):
        return component
    for attr in ("model", "module", "unet", "vae", "net"):
        m = getattr(component, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise ReaudioError(f"{what} {type(component).__name__} exposes no torch module to train (a component made of "
                       "others trains one part at a time: name that part's component in the config; docs/training.md)")


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


def load_or_build(cfg: dict, slot: str):
    """The component in ``slot``, built from its entry. Weights come through the component's own
    parameters (``checkpoint: DIR`` for vae, hifigan, unet-ldm; ``weights: DIR`` for vae-latent), e.g.
    ``decoder: {name: vae, params: {checkpoint: runs/offline-vae/final/decoder}}``."""
    return build(cfg, slot) if cfg.get(slot) is not None else None


def _params_of(component) -> dict | None:
    """Constructor keywords of a loaded component (its ``config()`` or ``params``), for the exported config."""
    for attr in ("config", "params"):
        value = getattr(component, attr, None)
        value = value() if callable(value) else value
        if isinstance(value, dict):
            return dict(value)
    return None


def component_fingerprint(component) -> str:
    """SHA-1 over the weights of every torch module a component holds (its attributes, one level deep),
    plus its class name: identifies cached features computed by these exact weights."""
    import hashlib
    h = hashlib.sha1(type(component).__name__.encode())
    modules = [component] if isinstance(component, nn.Module) else []
    for name in sorted(vars(component)) if not isinstance(component, nn.Module) else []:
        value = getattr(component, name)
        if isinstance(value, nn.Module):
            modules.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):  # e.g. a wrapped VAE component
            modules += [v for _, v in sorted(vars(value).items()) if isinstance(v, nn.Module)]
    for module in modules:
        for key, tensor in module.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def feature_info(db, key: str) -> dict:
    """The ``info`` a feature cache was saved with (``features/NAME/meta.json``), or {}."""
    try:
        return json.loads((db.version_dir / "features" / key / "meta.json").read_text(encoding="utf-8")).get("info") or {}
    except (OSError, ValueError):
        return {}


def move_component(component, device: torch.device) -> None:
    """Put a component's weights (and its notion of its device) on ``device``."""
    if component is None:
        return
    if hasattr(component, "to") and not isinstance(component, nn.Module):
        component.to(device)
    elif isinstance(component, nn.Module):
        component.to(device)


# ---------------------------------------------------------------------------------------------
# stage objectives: nn.Modules whose forward returns a dict of losses (``loss`` is optimised)
# ---------------------------------------------------------------------------------------------
class VaeObjective(nn.Module):
    """Mel reconstruction (L1 or L2, mean per element) + ``kl_weight`` x KL.

    The KL is summed over latent elements and averaged over the batch, then divided by the mel
    elements per clip, so that ``kl_weight`` has the reference's meaning (AudioLDM: sum-reconstruction
    per clip + 1e-6 x sum-KL per clip). The reference's learned output log-variance and LPIPS-style
    perceptual term are left out; its discriminator is optional (``adversarial_weight`` > 0: a
    :class:`MelDiscriminator` on the log-mel, hinge losses, the generator term scaled by the reference's
    adaptive weight ``|grad recon| / |grad adv|`` at the decoder's last layer).
    """

    def __init__(self, decoder, recon: str, kl_weight: float, adversarial_weight: float = 0.0):
        super().__init__()
        if recon not in ("l1", "l2"):
            raise ReaudioError(f"training.recon_loss must be l1 or l2, got {recon!r}")
        if not callable(getattr(decoder, "posterior", None)):
            raise ReaudioError(f"decoder {type(decoder).__name__} has no posterior(mel) method: the vae stage trains "
                               "KL autoencoders (decoder: vae)")
        self.ae = torch_module(decoder, "decoder")
        self.__dict__["decoder"] = decoder  # not a submodule: its weights are self.ae's
        self.recon, self.kl_weight = recon, kl_weight
        self.adversarial_weight = float(adversarial_weight)
        self.disc = MelDiscriminator() if self.adversarial_weight > 0 else None

    def adversarial(self, rec: torch.Tensor, mel: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Discriminator hinge loss (on ``rec`` detached: trains only the discriminator) plus the decoder's
        adversarial term (through the discriminator with its weights detached: trains only the decoder),
        summed so that one optimizer step trains both."""
        d_real = self.disc(mel[:, None])
        d_fake = self.disc(rec.detach()[:, None])
        relu = torch.nn.functional.relu
        d_loss = relu(1.0 - d_real).mean() + relu(1.0 + d_fake).mean()
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        g_adv = -torch.func.functional_call(self.disc, frozen, (rec[:, None],)).mean()
        last = self.ae.decoder.conv_out.weight
        if torch.is_grad_enabled() and last.requires_grad:
            g_rec = torch.autograd.grad(recon, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        else:
            weight = torch.ones(())
        weight = weight * self.adversarial_weight
        return weight * g_adv + d_loss, {"g_adv": g_adv.detach(), "d_loss": d_loss.detach(),
                                          "adv_weight": weight, "d_real": d_real.detach().mean(),
                                          "d_fake": d_fake.detach().mean()}

    def forward(self, batch: dict, seed: int) -> dict:
        mel = batch["mel"]
        g = torch.Generator(device=mel.device).manual_seed(seed)
        posterior = self.decoder.posterior(mel)  # [B, 1, T, 64] through self.ae's encoder
        z = posterior.sample(generator=g)
        rec = self.ae.decode(z).sample.squeeze(1).float()
        err = (rec - mel).abs() if self.recon == "l1" else (rec - mel) ** 2
        recon = err.mean()
        kl = posterior.kl().float().mean() / mel[0].numel()
        out = {"loss": recon + self.kl_weight * kl, "recon": recon.detach(), "kl": kl.detach()}
        if self.disc is not None:
            adv, stats = self.adversarial(rec, mel, recon)
            out = {**out, **stats, "loss": out["loss"] + adv}
        return out


class MelDiscriminator(nn.Module):
    """A patch discriminator on the log-mel ``[B, 1, T, n_mels]``: four strided 4x4 convolutions with
    spectral norm and leaky ReLU, then a 3x3 convolution to one logit per patch (about 70 ms x 10 bins at
    the 10 ms hop: real and fake are judged on local texture, such as sharp harmonics and onsets)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c = [], 1
        for i, co in enumerate(channels):
            layers += [sn(nn.Conv2d(c, co, 4, stride=2 if i < 3 else 1, padding=1)), nn.LeakyReLU(0.2)]
            c = co
        layers.append(sn(nn.Conv2d(c, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return self.net(logmel)


def timestep_range(value, num_train_timesteps: int) -> tuple[int, int] | None:
    """``training.timesteps``: null (all of ``[0, num_train_timesteps)``) or ``[lo, hi]`` with
    ``0 <= lo < hi <= num_train_timesteps``, the half-open range the LDM stage draws timesteps from."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1] <= num_train_timesteps:
        raise ReaudioError(f"training.timesteps must be null or [lo, hi] with 0 <= lo < hi <= "
                           f"{num_train_timesteps}, got {value!r}")
    return int(value[0]), int(value[1])


class LdmObjective(nn.Module):
    """Epsilon MSE on ``DDPMScheduler.add_noise`` with classifier-free guidance dropout (or, with
    ``diffusion.prediction_type: v_prediction``, the MSE to ``v = sqrt(a) eps - sqrt(1-a) x0``).

    Per batch, with probability ``drop_all`` every condition is replaced by its unconditional input;
    otherwise each sample's prompt embedding is replaced with probability ``drop_prompt``
    (reference section 5). The unconditional inputs are exactly those of
    :meth:`ReAudioPipeline.condition`.
    """

    def __init__(self, denoiser, scheduler, uncond: Conditioning, drop_all: float, drop_prompt: float,
                 timesteps: tuple[int, int] | None = None):
        super().__init__()
        self.net = torch_module(denoiser, "denoiser")
        self.__dict__["denoiser"] = denoiser
        self.scheduler = scheduler
        self.uncond = uncond  # batch of one, expanded per batch
        self.drop_all, self.drop_prompt = drop_all, drop_prompt
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        # timesteps drawn uniformly from [lo, hi) (training.timesteps; a low-noise expert trains on [0, b))
        self.t_lo, self.t_hi = timesteps if timesteps is not None else (0, self.num_train_timesteps)

    def dropout(self, cond: Conditioning, g: torch.Generator) -> tuple[Conditioning, dict]:
        B, dev = cond.prompt.shape[0], cond.prompt.device
        all_ = bool(torch.rand((), generator=g, device=dev) < self.drop_all)
        per = torch.rand(B, generator=g, device=dev) < self.drop_prompt
        u = self.uncond

        def pick(c, uc, mask):
            if c is None:
                return None
            uc = uc.to(c.device).expand(B, *c.shape[1:])
            m = mask.view(B, *([1] * (c.dim() - 1)))
            return torch.where(m, uc, c)

        every = torch.full((B,), all_, device=dev)
        out = Conditioning(prompt=pick(cond.prompt, u.prompt, every | per),
                           captions=pick(cond.captions, u.captions, every),
                           caption_mask=pick(cond.caption_mask, u.caption_mask, every),
                           audio=pick(cond.audio, u.audio, every),
                           audio_mask=pick(cond.audio_mask, u.audio_mask, every))
        return out, {"dropped_all": float(all_), "dropped_prompt": float((every | per).float().mean())}

    def forward(self, batch: dict, seed: int) -> dict:
        latents = batch["latents"]
        g = torch.Generator(device=latents.device).manual_seed(seed)
        B = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.randint(self.t_lo, self.t_hi, (B,), generator=g, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        cond, stats = self.dropout(batch["cond"], g)
        pred = self.denoiser(noisy, t, cond).float()
        target = (self.scheduler.get_velocity(latents, noise, t)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)
        loss = torch.nn.functional.mse_loss(pred, target.float())
        return {"loss": loss, **{k: torch.tensor(v) for k, v in stats.items()}}


class VocoderObjective(nn.Module):
    """Mel L1 between the target log-mel and the log-mel of the generated waveform, plus a
    multi-resolution STFT loss (spectral convergence + log magnitude). No discriminator: a recipe
    that trains a usable HiFi-GAN on a CPU budget, not the reference's adversarial training."""

    RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256))

    def __init__(self, vocoder, stft_weight: float):
        super().__init__()
        self.net = torch_module(vocoder, "vocoder")
        self.__dict__["vocoder"] = vocoder
        self.stft_weight = stft_weight

    @staticmethod
    def _magnitude(y: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        spec = torch.stft(y, n_fft, hop, win, torch.hann_window(win, device=y.device), return_complex=True)
        return (spec.real ** 2 + spec.imag ** 2 + 1e-12).sqrt()

    def stft_loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Spectral convergence + L1 of log magnitudes, averaged over three resolutions. The log uses a
        soft floor (``log(x + 1e-5)``), so a near-silent untrained generator still gets gradients."""
        total = y.new_zeros(())
        for n_fft, hop, win in self.RESOLUTIONS:
            s_hat, s = self._magnitude(y_hat, n_fft, hop, win), self._magnitude(y, n_fft, hop, win)
            sc = torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp(min=1e-7)
            mag = (torch.log(s + 1e-5) - torch.log(s_hat + 1e-5)).abs().mean()
            total = total + sc + mag
        return total / len(self.RESOLUTIONS)

    @staticmethod
    def soft_log_mel(y: torch.Tensor) -> torch.Tensor:
        """The reference log-mel with ``log(x + 1e-5)`` in place of ``log(clamp(x, 1e-5))`` (same values
        above the floor; non-zero gradient below it)."""
        from . import mel as M
        mag = M.stft_magnitude(y)
        return torch.log(torch.matmul(M.mel_basis(mag.device, mag.dtype), mag) + M.LOG_CLAMP).transpose(1, 2)

    def forward(self, batch: dict, seed: int) -> dict:
        mel, wave = batch["mel"], batch["wave"]
        y_hat = self.vocoder(mel).float()
        n = min(y_hat.shape[-1], wave.shape[-1])
        y_hat, wave = y_hat[..., :n], wave[..., :n]
        mel_hat = self.soft_log_mel(y_hat)
        t = min(mel_hat.shape[1], mel.shape[1])
        mel_l1 = (mel_hat[:, :t] - mel[:, :t]).abs().mean()
        stft = self.stft_loss(y_hat, wave) if self.stft_weight else mel_l1.new_zeros(())
        return {"loss": mel_l1 + self.stft_weight * stft, "mel_l1": mel_l1.detach(), "stft": stft.detach()}


# ---------------------------------------------------------------------------------------------
# stages: data + objective + export
# ---------------------------------------------------------------------------------------------
class Stage:
    name = ""
    export_slots: tuple[str, ...] = ()

    def __init__(self, cfg: dict, env: distributed.DistEnv, progress: bool):
        self.cfg, self.t, self.env, self.progress = cfg, cfg["training"], env, progress
        self.skipped: list[tuple[str, str]] = []

    # data ----------------------------------------------------------------------------------
    def clips(self) -> list[Clip]:
        manifests = self.t.get("manifest") or []
        if isinstance(manifests, str):
            manifests = [manifests]
        if not manifests:
            raise ReaudioError(f"the {self.name} stage needs training.manifest (CSV with path, caption, label)")
        clips, self.skipped = read_manifest_clips(manifests)
        return clips

    def make_dataset(self, clips: list[Clip], want_wave: bool = False, multiple: int = 1) -> ClipDataset:
        silence_db = (self.cfg.get("database") or {}).get("silence_db")  # index build's rule
        scan = scan_clips(clips, self.t["min_duration"], self.t["cache_audio"], self.env,
                          self.progress and self.env.is_main, silence_db=silence_db)
        self.skipped = self.skipped + scan.skipped
        if not scan.clips:
            raise ReaudioError(f"no usable training clip: all {len(clips)} were skipped "
                               f"(first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped
                               else "no training clip given")
        return ClipDataset(scan, self.t["crop_seconds"], want_wave, multiple)

    def components(self) -> list:
        """Every component this stage runs (moved to the training device)."""
        return [getattr(self, s, None) for s in SLOTS]

    def prepare(self, batch: dict, device: torch.device) -> dict:
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def export(self, final: Path) -> None:
        raise NotImplementedError

    def export_cfg(self) -> dict:
        """The resolved config written beside the exported weights (loaded components' params)."""
        cfg = copy.deepcopy(self.cfg)
        for slot in self.export_slots:
            comp = getattr(self, slot, None)
            params = _params_of(comp) if comp is not None else None
            if params is not None and cfg.get(slot):
                known = set(get_registry().spec(SLOTS[slot], cfg[slot]["name"]).parameters())
                cfg[slot]["params"] = {**cfg[slot]["params"], **{k: v for k, v in params.items() if k in known}}
        return cfg


class VaeStage(Stage):
    name = "vae"
    export_slots = ("decoder",)

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        if cfg.get("decoder") is None:
            raise ReaudioError("the vae stage trains the decoder slot: set decoder (e.g. decoder: vae)")
        clips = self.clips()
        self.decoder = load_or_build(cfg, "decoder")
        self.dataset = self.make_dataset(clips, multiple=self.decoder.compression)
        self.objective = VaeObjective(self.decoder, self.t["recon_loss"], float(self.t["kl_weight"]),
                                      float(self.t["adversarial_weight"]))
        self.freeze_encoder = bool(self.t["freeze_encoder"])
        if self.freeze_encoder:
            # A better decoder for an LDM already trained on this VAE's latents: the encoder (and so the
            # latent space and its scale_factor) stays exactly as loaded; only the decoder side trains.
            if not cfg["decoder"].get("params", {}).get("checkpoint"):
                raise ReaudioError("training.freeze_encoder needs a trained VAE to start from: set "
                                   "decoder.params.checkpoint=DIR (OUT/final/decoder of a vae run)")
            self.objective.ae.encoder.requires_grad_(False)
            self.objective.ae.quant_conv.requires_grad_(False)

    @torch.no_grad()
    def measure_scale_factor(self, mel: torch.Tensor, seed: int) -> float:
        """``1 / std(z)`` of posterior samples of one batch (reference section 2)."""
        ae = self.objective.ae
        was = ae.training
        ae.eval()
        g = torch.Generator(device=mel.device).manual_seed(seed)
        z = self.decoder.posterior(mel).sample(generator=g)
        ae.train(was)
        std = float(z.float().std())
        if not math.isfinite(std) or std <= 0:
            raise ReaudioError(f"cannot measure the VAE scale factor: latent std is {std}")
        return 1.0 / std

    def finish(self, first_batch: dict, seed: int) -> None:
        if self.freeze_encoder:  # same encoder, same latents: the LDM's scale_factor must not move
            self.scale_factor = self.decoder.scale_factor
            return
        self.scale_factor = self.measure_scale_factor(first_batch["mel"], seed)
        self.decoder.scale_factor = self.scale_factor

    def export(self, final: Path) -> None:
        self.decoder.save_pretrained(final / "decoder")
        save_config(self.export_cfg(), final)


class VocoderStage(Stage):
    name = "vocoder"
    export_slots = ("vocoder",)

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        if cfg.get("vocoder") is None:
            raise ReaudioError("the vocoder stage trains the vocoder slot: set vocoder (e.g. vocoder: hifigan)")
        clips = self.clips()
        self.vocoder = load_or_build(cfg, "vocoder")
        self.dataset = self.make_dataset(clips, want_wave=True)
        if not hasattr(self.vocoder, "save_pretrained"):
            raise ReaudioError(f"vocoder '{cfg['vocoder']['name']}' has no weights to train")
        self.objective = VocoderObjective(self.vocoder, float(self.t["stft_loss_weight"]))

    def export(self, final: Path) -> None:
        self.vocoder.save_pretrained(final / "vocoder")
        save_config(self.export_cfg(), final)


def text_feature_key(cfg: dict) -> str:
    """Database feature name for the prompt embeddings of every item and the unconditional text inputs
    (empty prompt, empty caption states) under this config's text and caption encoders."""
    import hashlib
    entries = [cfg.get("text_encoder"), cfg.get("caption_encoder"), cfg["generation"]["caption_tokens"]]
    h = hashlib.sha1(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"text_conditions-{cfg['text_encoder']['name']}-{h}"


class UnloadedTextEncoder:
    """Stands in for a text encoder that could not be built on this machine (say its weights are not
    installed on a GPU box) while the training database already caches everything the ldm stage needs
    from it (:func:`text_feature_key`, caption states). Its dims are known; running it raises."""

    def __init__(self, entry_name: str, dim: int, token_dim: int | None, why: str):
        self.entry_name, self.dim, self.token_dim, self.why = entry_name, dim, token_dim, why

    def embed(self, texts):
        raise ReaudioError(f"text encoder {self.entry_name!r} is not available here: {self.why}")

    encode_tokens = embed


class LdmStage(Stage):
    """Retrieval-conditioned denoiser training on the items of a database.

    Conditions per training item (the item itself is never its own neighbour): the prompt is the
    text encoder's embedding of its caption; the first ``generation.k`` columns of the database's
    neighbour table (or, with ``training.neighbour_pool`` > k, k of its first neighbour_pool columns drawn
    afresh each step) give the retrieved captions (caption encoder states, ``generation.caption_tokens``
    each) and clips (audio encoder tokens). Neighbour features are computed once and cached in the
    database (``Database.save_features``) under :func:`reaudio_core.pipeline.feature_key`, where
    generation reads them too.
    """

    name = "ldm"
    export_slots = ("decoder", "vocoder", "denoiser")  # audio_encoder keeps its entry: the feature-cache key

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        self._fingerprints: dict[int, str] = {}  # id(encoder) -> component_fingerprint, see _fingerprint
        from .pipeline import RETRIEVAL_TYPES
        gen = cfg["generation"]
        if gen["retrieval"] not in RETRIEVAL_TYPES:
            raise ReaudioError(f"generation.retrieval must be one of {RETRIEVAL_TYPES}, got {gen['retrieval']!r}")
        for slot in ("text_encoder", "denoiser", "decoder", "vocoder"):
            if cfg.get(slot) is None:
                raise ReaudioError(f"the ldm stage needs the {slot} slot configured")
        if not self.t.get("database"):
            raise ReaudioError("the ldm stage needs training.database (a directory built with `reaudio index build`)")
        from .database import Database
        self.db = Database.open(self.t["database"])
        self.k = int(gen["k"])
        if self.k < 1:
            raise ReaudioError(f"generation.k must be >= 1, got {self.k}")
        # components --------------------------------------------------------------------------
        self.denoiser = load_or_build(cfg, "denoiser")
        try:
            self.text_encoder = build(cfg, "text_encoder")
        except ReaudioError as exc:  # e.g. its weights are not installed on this (GPU) machine
            self.text_encoder = self._text_encoder_from_cache(exc)
        self.decoder = load_or_build(cfg, "decoder")
        if "checkpoint" in cfg["decoder"]["params"] and not cfg["decoder"]["params"]["checkpoint"]:
            raise ReaudioError("the ldm stage needs a trained VAE: set decoder.params.checkpoint=DIR "
                               "(OUT/final/decoder of `reaudio train` with training.stage=vae)")
        self.vocoder = load_or_build(cfg, "vocoder")
        d = self.denoiser
        self.caption_encoder = None
        if d.text_dim:  # often the prompt encoder itself (offline: MiniLM for both): build it once
            self.caption_encoder = (self.text_encoder if cfg.get("caption_encoder") == cfg["text_encoder"]
                                    else load_or_build(cfg, "caption_encoder"))
        self.audio_encoder = load_or_build(cfg, "audio_encoder") if d.audio_dim else None
        self._check_wiring()
        # data ------------------------------------------------------------------------------
        excluded = set(self.t.get("exclude_labels") or [])
        items = self.db.items
        include = self.t.get("include_ids")
        if include is not None:  # a training subset (e.g. a long-tailed one); the rest stays retrievable
            bad = [i for i in include if not isinstance(i, int) or not 0 <= i < len(items)]
            if bad:
                raise ReaudioError(f"training.include_ids: {bad[:5]} are not item ids of {self.t['database']} "
                                   f"(0..{len(items) - 1})")
            include = set(include)
        clips = [Clip(it["path"], it.get("caption") or "", it.get("label") or None, i)
                 for i, it in enumerate(items) if (it.get("label") or None) not in excluded
                 and (include is None or i in include)]
        if excluded and len(clips) == len(items):
            print(f"note: training.exclude_labels {sorted(excluded)} matched no database item", file=sys.stderr)
        self.dataset = self.make_dataset(clips, multiple=self.decoder.compression * self.denoiser.downsample)
        self.dataset.want_mel = not self.t["cache_latents"]
        for component in (self.decoder, self.audio_encoder):  # the caches below are computed on the training device
            move_component(component, env.device)
        self.features()
        from diffusers import DDPMScheduler

        from .pipeline import noise_schedule  # the samplers' schedule too
        self.scheduler = DDPMScheduler(**noise_schedule(cfg))
        self.objective = LdmObjective(self.denoiser, self.scheduler, self.uncond,
                                      float(self.t["cfg_drop_all"]), float(self.t["cfg_drop_prompt"]),
                                      timestep_range(self.t.get("timesteps"), self.scheduler.config.num_train_timesteps))
        if self.t["cache_latents"]:
            self.cache_latents()

    def _check_wiring(self) -> None:
        d, te = self.denoiser, self.text_encoder
        if te.dim != d.prompt_dim:
            raise ReaudioError(f"text_encoder gives {te.dim}-d embeddings, the denoiser expects {d.prompt_dim}")
        if d.text_dim and self.caption_encoder is None:
            raise ReaudioError("the denoiser has a caption stream but no caption_encoder is configured")
        if d.text_dim and self.caption_encoder.token_dim != d.text_dim:
            raise ReaudioError(f"caption_encoder gives {self.caption_encoder.token_dim}-d states, "
                               f"the denoiser expects {d.text_dim}")
        if d.audio_dim and self.audio_encoder is None:
            raise ReaudioError("the denoiser has an audio stream but no audio_encoder is configured")
        if d.audio_dim and self.audio_encoder.token_dim != d.audio_dim:
            raise ReaudioError(f"audio_encoder gives {self.audio_encoder.token_dim}-d tokens, "
                               f"the denoiser expects {d.audio_dim}")
        retrieval = self.cfg["generation"]["retrieval"]
        if retrieval in ("text", "audio+text") and not d.text_dim or retrieval in ("audio", "audio+text") and not d.audio_dim:
            raise ReaudioError(f"generation.retrieval={retrieval} needs a denoiser with that stream "
                               f"(text_dim={d.text_dim}, audio_dim={d.audio_dim})")
        db_enc = self.db.config.get("text_encoder") or {}
        if db_enc and db_enc != self.cfg["text_encoder"]:
            raise ReaudioError(f"the database was embedded with text_encoder {db_enc.get('name')!r}, the training "
                               f"config uses {self.cfg['text_encoder']['name']!r}: rebuild the database or align them")

    # features (computed once, cached) --------------------------------------------------------
    def features(self) -> None:
        from .pipeline import feature_key
        gen, d = self.cfg["generation"], self.denoiser
        retrieval, k, n_tok = gen["retrieval"], self.k, gen["caption_tokens"]
        clips = self.dataset.clips
        # prompt embeddings of every database item (cached in the database, like the neighbour features)
        def embed(part):
            e = self.text_encoder.embed([it.get("caption") or "" for it in part]).float()
            return e[:, None], torch.ones(len(part), 1, dtype=torch.bool)

        def empties():  # the unconditional inputs' text parts, exactly as ReAudioPipeline.condition builds them
            out = {"empty_prompt": self.text_encoder.embed([""]).float()[0].tolist()}
            if d.text_dim:
                states, _ = self.caption_encoder.encode_tokens([""], max_tokens=n_tok)
                out["empty_caption"] = states[0].float().tolist()  # [n_tok, token_dim]
            return out

        prompts, _, info = self.cached_features(text_feature_key(self.cfg), embed, "prompt embeddings",
                                                self.text_encoder, extra=empties)
        rows = np.array([c.index for c in clips])
        self.prompts = prompts[torch.from_numpy(rows), 0]
        # neighbour ids of the training items: [N, k], -1 = no neighbour
        table = np.asarray(self.db.neighbours.ids)
        if table.ndim != 2:
            raise ReaudioError(f"database {self.t['database']} has no neighbour table")
        ids = np.full((len(clips), k), -1, dtype=np.int64)
        width = min(k, table.shape[1])
        ids[:, :width] = table[rows, :width]
        if k > table.shape[1]:
            print(f"note: generation.k={k} exceeds the neighbour table width {table.shape[1]}: "
                  "the extra slots get unconditional inputs", file=sys.stderr)
        self.neighbour_ids = torch.from_numpy(ids)
        # training.neighbour_pool > k: the k neighbours of each item are drawn per step from a wider pool,
        # so items whose captions tie (one caption per class) do not all share the same k neighbours
        pool = self.t.get("neighbour_pool") or 0
        if not isinstance(pool, int) or pool < 0:
            raise ReaudioError(f"training.neighbour_pool must be an integer >= 0, got {pool!r}")
        self.neighbour_pool = None
        if pool > k:
            if pool > table.shape[1]:
                raise ReaudioError(f"training.neighbour_pool={pool} exceeds the neighbour table width "
                                   f"{table.shape[1]} of {self.t['database']} (database.neighbours)")
            self.neighbour_pool = torch.from_numpy(table[rows, :pool].astype(np.int64))
        # unconditional inputs, exactly as ReAudioPipeline.condition builds them
        uncond = Conditioning(prompt=torch.tensor(info["empty_prompt"], dtype=torch.float32)[None])
        if d.text_dim:
            empty = torch.tensor(info["empty_caption"], dtype=torch.float32)  # [n_tok, token_dim]
            uncond.captions = empty.repeat(k, 1)[None]
            uncond.caption_mask = torch.ones(1, uncond.captions.shape[1], dtype=torch.bool)
        if d.audio_dim:
            n = k * self.audio_encoder.num_tokens
            uncond.audio = torch.zeros(1, n, d.audio_dim)
            uncond.audio_mask = torch.ones(1, n, dtype=torch.bool)
        self.uncond = uncond
        # per-database-item neighbour features
        self.caption_feats = self.audio_feats = None
        if d.text_dim and retrieval in ("text", "audio+text"):
            self.caption_feats = self.cached_features(
                feature_key(self.cfg, "caption_encoder"),
                lambda part: self.caption_encoder.encode_tokens([it.get("caption") or "" for it in part],
                                                                max_tokens=n_tok), "caption states",
                self.caption_encoder)[:2]
            self.empty_caption = uncond.captions[0, :n_tok], uncond.caption_mask[0, :n_tok]
        if d.audio_dim and retrieval in ("audio", "audio+text"):
            self.audio_feats = self.cached_features(feature_key(self.cfg, "audio_encoder"),
                                                    self._audio_tokens, "audio tokens", self.audio_encoder)[:2]

    def _audio_tokens(self, part):
        from .audio import AudioProblem, load_audio
        states, masks = [], []
        n, dim = self.audio_encoder.num_tokens, self.audio_encoder.token_dim
        for it in part:
            try:
                s, m = self.audio_encoder.encode_tokens([load_audio(it["path"])])
            except AudioProblem:  # an unreadable neighbour clip: an unconditional slot
                s, m = torch.zeros(1, n, dim), torch.ones(1, n, dtype=torch.bool)
            states.append(s)
            masks.append(m)
        return torch.cat(states), torch.cat(masks)

    def cached_features(self, key: str, compute, what: str, encoder, extra=None):
        """``(states [N_db, L, d], mask [N_db, L], info)`` for every database item, from the database's
        feature cache or computed (sharded over ranks) and saved into it by rank 0; ``extra()`` gives
        more values for the cache's ``info`` (computed with it).

        The cache records a fingerprint of the encoder's weights; a cache written by other weights
        under the same configuration (e.g. a retrained VAE at the same path) is recomputed, never reused.
        An encoder whose weights are not installed here (:class:`UnloadedTextEncoder`) uses the cache as
        it is: nothing here could recompute or check it.
        """
        unloaded = isinstance(encoder, UnloadedTextEncoder)
        cached = self.db.features(key)
        info = feature_info(self.db, key)
        if cached is not None and unloaded:
            if self.env.is_main:
                print(f"note: {encoder.entry_name} weights are not installed here ({encoder.why}); using the "
                      f"{what} cached in the database as feature '{key}' (computed with fingerprint "
                      f"{str(info.get('fingerprint'))[:12]})", file=sys.stderr)
        elif cached is not None and info.get("fingerprint") != self._fingerprint(encoder):
            if self.env.is_main:
                print(f"note: cached feature '{key}' was computed with other weights: recomputing it",
                      file=sys.stderr)
            cached = None
        if cached is None:
            if unloaded:
                raise ReaudioError(f"{encoder.why}; the database {self.t['database']} holds no cached {what} "
                                   f"(feature '{key}') to train without it")
            fp = self._fingerprint(encoder)
            items = list(self.db.items)
            if self.env.is_main:
                print(f"caching {what} of {len(items)} database items as feature '{key}'", file=sys.stderr)

            def run(part):
                if not len(part):
                    return None
                out_s, out_m = [], []
                for i in range(0, len(part), 32):
                    s, m = compute(part[i:i + 32])
                    out_s.append(s.float().numpy())
                    out_m.append(m.numpy().astype(bool))
                return np.concatenate(out_s), np.concatenate(out_m)

            shards = [s for s in distributed.map_sharded(self.env, items, run) if s is not None]
            states = np.concatenate([s[0] for s in shards])
            mask = np.concatenate([s[1] for s in shards])
            info = {"what": what, "fingerprint": fp, **(extra() if extra else {})}
            if self.env.is_main:
                self.db.save_features(key, {"states": states, "mask": mask}, info=info)
            distributed.barrier(self.env)
            return torch.from_numpy(states), torch.from_numpy(mask), info
        return (torch.from_numpy(np.array(cached["states"], dtype=np.float32)),
                torch.from_numpy(np.array(cached["mask"], dtype=bool)), info)

    def _fingerprint(self, encoder) -> str:
        """:func:`component_fingerprint`, once per encoder object (the text encoder often serves two caches)."""
        if id(encoder) not in self._fingerprints:
            self._fingerprints[id(encoder)] = component_fingerprint(encoder)
        return self._fingerprints[id(encoder)]

    def _text_encoder_from_cache(self, exc: ReaudioError) -> "UnloadedTextEncoder":
        """A stand-in for a text encoder that cannot be built here, when the database caches every text
        feature this stage needs from it (prompt embeddings, and caption states where the caption
        encoder is the same entry); otherwise ``exc`` is raised."""
        key = text_feature_key(self.cfg)
        cached = self.db.features(key)
        if cached is None:
            raise exc
        d = self.denoiser
        if d.text_dim and self.cfg.get("caption_encoder") != self.cfg["text_encoder"]:
            raise exc
        info = feature_info(self.db, key)
        token_dim = len(info["empty_caption"][0]) if info.get("empty_caption") else None
        return UnloadedTextEncoder(self.cfg["text_encoder"]["name"], int(cached["states"].shape[-1]), token_dim,
                                   str(exc))

    def cache_latents(self) -> None:
        """Encode every training clip's first crop once (posterior mean): no VAE encoder per step.
        The ranks encode a shard each and share the results."""
        from tqdm.auto import tqdm
        ds = self.dataset

        def encode(positions):
            out = []
            with torch.no_grad():
                for pos in tqdm(positions, desc="encoding latents", leave=False,
                                disable=not (self.progress and self.env.is_main)):
                    wav = crop_waveform(ds.waveform(pos)[:ds.samples], ds.samples, np.random.default_rng(0))
                    mel = waveform_to_mel(torch.from_numpy(wav)[None])
                    out.append(self.decoder.encode(mel.to(self.env.device), sample=False).float().cpu())
            return torch.cat(out) if out else None

        shards = distributed.map_sharded(self.env, list(range(len(ds))), encode)
        self.latents = torch.cat([s for s in shards if s is not None])

    # per batch ---------------------------------------------------------------------------------
    def draw_neighbours(self, pos: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` neighbour ids drawn without replacement from each item's pool (``training.neighbour_pool``
        first columns of its table), kept in table order (best first); empty slots (-1) only when the pool
        holds fewer than k. Uses the global torch RNG, which the training loop seeds per step (resumable)."""
        pool = self.neighbour_pool[pos]  # [B, P]
        keys = torch.rand(pool.shape)
        keys[pool < 0] = -1.0  # real neighbours first
        chosen = keys.topk(self.k, dim=1).indices.sort(dim=1).values
        return pool.gather(1, chosen)

    def condition(self, pos: torch.Tensor) -> Conditioning:
        """Training-item positions -> conditional inputs (before guidance dropout)."""
        B = len(pos)
        cond = Conditioning(prompt=self.prompts[pos])
        u = self.uncond
        nb = self.neighbour_ids[pos] if self.neighbour_pool is None else self.draw_neighbours(pos)  # [B, k]
        if u.captions is not None:
            if self.caption_feats is None:
                cond.captions, cond.caption_mask = u.captions.expand(B, -1, -1), u.caption_mask.expand(B, -1)
            else:
                states, mask = self.caption_feats
                es, em = self.empty_caption
                safe = nb.clamp(min=0)
                s, m = states[safe], mask[safe]  # [B, k, L, d], [B, k, L]
                missing = (nb < 0)
                s = torch.where(missing[..., None, None], es.expand_as(s), s)
                m = torch.where(missing[..., None], torch.ones_like(m), m)
                cond.captions, cond.caption_mask = s.reshape(B, -1, s.shape[-1]), m.reshape(B, -1)
        if u.audio is not None:
            if self.audio_feats is None:
                cond.audio, cond.audio_mask = u.audio.expand(B, -1, -1), u.audio_mask.expand(B, -1)
            else:
                states, mask = self.audio_feats
                safe = nb.clamp(min=0)
                s, m = states[safe], mask[safe]
                missing = (nb < 0)
                s = torch.where(missing[..., None, None], torch.zeros_like(s), s)
                m = torch.where(missing[..., None], torch.ones_like(m), m)
                cond.audio, cond.audio_mask = s.reshape(B, -1, s.shape[-1]), m.reshape(B, -1)
        return cond

    def prepare(self, batch: dict, device: torch.device) -> dict:
        pos = batch["pos"]
        if self.t["cache_latents"]:
            latents = self.latents[pos]
        else:
            with torch.no_grad():
                latents = self.decoder.encode(batch["mel"], sample=bool(self.t["latent_sample"])).float()
        cond = self.condition(pos)
        cond = Conditioning(*(None if v is None else v.to(device) for v in
                              (cond.prompt, cond.captions, cond.caption_mask, cond.audio, cond.audio_mask)))
        return {"latents": latents.to(device), "cond": cond}

    def export_cfg(self) -> dict:
        cfg = super().export_cfg()
        if not cfg["generation"].get("database"):
            cfg["generation"]["database"] = str(self.t["database"])
        return cfg

    def export(self, final: Path) -> None:
        from .pipeline import ReAudioPipeline
        cfg = self.export_cfg()
        components = {"text_encoder": self.text_encoder, "caption_encoder": self.caption_encoder,
                      "audio_encoder": self.audio_encoder, "denoiser": self.denoiser, "decoder": self.decoder,
                      "vocoder": self.vocoder}
        ReAudioPipeline(cfg, components).save_pretrained(final)


STAGE_CLASSES = {"vae": VaeStage, "ldm": LdmStage, "vocoder": VocoderStage}


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
            print(f"training.trainable={t['trainable']}: {sum(p.numel() for p in self.params)} of {total} "
                  "parameters trained, the rest frozen", file=sys.stderr)
        self.model: nn.Module = self.objective
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(
                self.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=bool(t["ddp_find_unused"]))
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
        from .config import _merge
        from .registry import get_registry
        # keys added to the defaults after the checkpoint was written take their default value
        saved = _merge(get_registry().defaults, yaml.safe_load(state["config"]))
        if _cfg_fingerprint(saved) != _cfg_fingerprint(self.cfg):
            diff = _first_difference(_cfg_fingerprint(saved), _cfg_fingerprint(self.cfg))
            raise ReaudioError(f"--resume: the configuration differs from the checkpoint's at {diff}; resume with "
                               "the same config (only training.max_steps, checkpoint/log intervals, num_workers "
                               "may change) or train into a new --out")
        if state.get("world_size", 1) != self.env.world:
            print(f"note: checkpoint written with {state.get('world_size')} process(es), resuming with "
                  f"{self.env.world}: the data order differs from an uninterrupted run", file=sys.stderr)
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
                    print(f"note: --resume but no checkpoint in {self.out / CHECKPOINT_DIR}: starting at step 0",
                          file=sys.stderr)
            else:
                resumed_from, state = found
                start = self.restore(state)
                if env.is_main:
                    print(f"resuming from {resumed_from} (step {start})", file=sys.stderr)
        elif list_checkpoints(self.out):
            raise ReaudioError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose "
                               "another --out")
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.stage.skipped:
                write_skip_report(self.out, self.stage.skipped)
                print(f"skipped {len(self.stage.skipped)} unusable clip(s), listed in {self.out / SKIP_REPORT}:",
                      file=sys.stderr)
                for p, r in self.stage.skipped[:10]:
                    print(f"  {p}: {r}", file=sys.stderr)
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
                old = self.out / f".{FINAL_DIR}.old-{os.getpid()}"
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
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

"""Training data: manifest rows -> validity scan -> random crops -> log-mel.

:class:`StepBatches` makes the batches of any step range reproducible (resumption); the crop of an item
depends only on its ``(position, seed)`` key (:class:`ClipDataset`). Clips that fail the scan are
skipped and listed in ``OUT/skipped.csv`` (:func:`write_skip_report`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import distributed
from ..interfaces import SAMPLE_RATE
from ..io import atomic_write_text
from ..mel import MEL_FPS
from ..registry import ReaudioError
from .checkpoint import step_seed

SKIP_REPORT = "skipped.csv"
HOP = SAMPLE_RATE // MEL_FPS


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
    from ..database import read_manifest
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

    from ..audio import AudioProblem, load_audio

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
        from ..audio import AudioProblem, load_audio
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
    from .. import mel
    return np.asarray(mel.normalize_waveform(wav), dtype=np.float32)


def waveform_to_mel(wav: torch.Tensor) -> torch.Tensor:
    """``[B, samples]`` -> reference log-mel ``[B, samples // 160, 64]`` (differentiable)."""
    from .. import mel
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

"""Generation modes beyond text-to-audio, as :meth:`ReAudioPipeline.__call__` runs them:

* **audio-to-audio** (SDEdit, Meng et al. 2022): the input clip's log-mel is VAE-encoded (posterior mean), noised
  to ``t0 = strength * T`` and only the sampler steps at or below ``t0`` run. ``strength=0`` runs no step: the
  output is the VAE round trip. ``strength=1`` is ordinary generation from pure noise (the same output as without
  the input, for the same seed).
* **inpainting** (RePaint-style blending, Lugmayr et al. 2022, without resampling): before every denoiser call the
  latent outside the mask is replaced by the known latent noised to the current timestep (the same noise draw as
  the initial latents, so the known region follows one deterministic trajectory); after the last step by the known
  latent itself.
* **retrieval from the input clip** (``retrieve_from``): neighbours from the prompt's text embedding (``text``, as
  text-to-audio does), from the input clip's audio embedding (``audio``), or ``both``: the two ranked lists
  interleaved text first (t1, a1, t2, a2, ...), an item already taken skipped, the first ``k`` kept.

Long clips (``duration`` beyond ``generation.max_duration``) are :mod:`reaudio_core.longclip`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import mel as M
from .interfaces import SAMPLE_RATE
from .registry import ReaudioError

log = logging.getLogger("reaudio")

RETRIEVE_FROM = ("text", "audio", "both")


@dataclass
class Mode:
    """A call's mode, resolved and checked: what :meth:`ReAudioPipeline.sample` and ``condition`` need, and
    :attr:`record` (what ran, in the :class:`~reaudio_core.pipeline.Generation`)."""
    name: str = "text-to-audio"  #: text-to-audio | audio-to-audio | inpainting | long-clip
    strength: float = 1.0
    known: torch.Tensor | None = None  #: [1, C, t, f] scaled latent of the input clip
    keep: torch.Tensor | None = None  #: [1, 1, t, 1]: 1 where the known latent is kept (outside the mask)
    wave: np.ndarray | None = None  #: the input clip at 16 kHz, cut / padded to the duration
    retrieve_from: str = "text"
    record: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve(pipe, duration: float, audio=None, strength=None, mask=None, retrieve_from=None) -> Mode:
    """Check a call's mode arguments (``None`` = ``generation.<key>``) and load and encode the input clip.
    Every bad value is one :class:`ReaudioError` line."""
    gen = pipe.cfg["generation"]
    audio = gen.get("audio") if audio is None else audio
    strength = gen.get("strength") if strength is None else strength
    mask = gen.get("mask") if mask is None else mask
    retrieve_from = (gen.get("retrieve_from") or "text") if retrieve_from is None else retrieve_from
    if retrieve_from not in RETRIEVE_FROM:
        raise ReaudioError(f"retrieve_from (--retrieve-from) must be one of {', '.join(RETRIEVE_FROM)}, "
                           f"got {retrieve_from!r}")
    if audio is None:
        for what, value in (("strength (--strength)", strength), ("mask (--mask)", mask)):
            if value not in (None, [], ""):
                raise ReaudioError(f"{what} needs an input clip: give --audio FILE (audio= in Python)")
        if retrieve_from != "text":
            raise ReaudioError(f"retrieve_from={retrieve_from} needs an input clip: give --audio FILE")
        mode = Mode(retrieve_from=retrieve_from)
        return mode
    if duration > gen["max_duration"]:
        raise ReaudioError(f"an input clip is generated at most {gen['max_duration']} s long (generation.max_duration); "
                           f"duration {duration} s is a long clip, which starts from the prompt alone")
    strength = 1.0 if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ReaudioError(f"strength (--strength) must be a number from 0 (the input's VAE round trip) to 1 "
                           f"(ordinary generation), got {strength!r}")
    if gen["retrieval"] == "none" and retrieve_from != "text":
        raise ReaudioError(f"retrieve_from={retrieve_from} needs retrieval; this pipeline has generation.retrieval=none")
    frames = M.seconds_to_frames(duration)
    wave, name, notes = load_input(audio, duration)
    known = pipe.decoder.encode(M.waveform_to_mel(wave, frames))  # posterior mean: deterministic
    ranges = parse_mask(mask, duration)
    keep = latent_keep(ranges, known.shape[2], pipe.decoder.compression) if ranges else None
    record = {"input": name, "strength": float(strength), "retrieve_from": retrieve_from}
    if ranges:
        record["mask"] = [list(r) for r in ranges]
    return Mode("inpainting" if ranges else "audio-to-audio", float(strength), known, keep, wave, retrieve_from,
                record, notes)


def load_input(audio, duration: float) -> tuple[np.ndarray, str, list[str]]:
    """``audio`` (a path, or ``(samples, sample_rate)``: any rate, mono or ``[samples, channels]``) -> 16 kHz mono
    float32 cut (with a note) or zero-padded to ``duration`` seconds, its name, and the notes."""
    from .audio import AudioProblem, load_audio, resample
    if isinstance(audio, (str, Path)):
        try:
            wave = load_audio(audio)
        except AudioProblem as exc:
            raise ReaudioError(f"--audio {audio}: {exc} (give a WAV, FLAC or OGG file soundfile reads)") from None
        name = str(audio)
    elif isinstance(audio, (tuple, list)) and len(audio) == 2:
        data, rate = np.asarray(audio[0], dtype=np.float32), audio[1]
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0 or data.ndim not in (1, 2):
            raise ReaudioError(f"audio=(samples, sample_rate) needs 1-D or [samples, channels] samples and a rate > 0, "
                               f"got shape {data.shape} at {rate!r}")
        data = data.mean(axis=1) if data.ndim == 2 else data
        if data.size == 0 or not np.isfinite(data).all():
            raise ReaudioError("the input clip is empty or has non-finite samples")
        wave, name = resample(data, int(rate)), f"<array {len(data)} samples at {rate} Hz>"
    else:
        raise ReaudioError(f"audio must be a file path or (samples, sample_rate), got {type(audio).__name__}")
    samples = M.seconds_to_samples(duration)
    notes = []
    if len(wave) < M.HOP_LENGTH:
        raise ReaudioError(f"the input clip {name} has {len(wave)} samples: less than one mel frame (10 ms)")
    if not np.abs(wave).max() > 0:
        raise ReaudioError(f"the input clip {name} is silent: nothing to transform")
    if len(wave) > samples:
        notes.append(f"input clip {name} is {len(wave) / SAMPLE_RATE:.2f} s: cut to its first {duration:g} s "
                     "(--duration, at most generation.max_duration)")
        wave = wave[:samples]
    elif len(wave) < samples:
        notes.append(f"input clip {name} is {len(wave) / SAMPLE_RATE:.2f} s: padded with silence to {duration:g} s")
    return np.ascontiguousarray(wave, dtype=np.float32), name, notes  # as loaded: the mel normalises (as training)


def parse_mask(mask, duration: float) -> list[tuple[float, float]]:
    """``"START-END[,START-END...]"`` (seconds) or ``[(start, end), ...]`` -> sorted ranges inside
    ``[0, duration]``; overlapping, empty or out-of-range ones are an error."""
    if mask in (None, "", []):
        return []
    if isinstance(mask, str):
        ranges = []
        for part in mask.split(","):
            lo, sep, hi = part.strip().partition("-")
            try:
                ranges.append((float(lo), float(hi)))
            except ValueError:
                raise ReaudioError(f"--mask {mask!r}: {part.strip()!r} is not START-END in seconds "
                                   "(e.g. --mask 1.0-2.5,4-4.5)") from None
    else:
        try:
            ranges = [(float(a), float(b)) for a, b in mask]
        except (TypeError, ValueError):
            raise ReaudioError(f"mask must be a list of (start, end) seconds, got {mask!r}") from None
    ranges.sort()
    for i, (a, b) in enumerate(ranges):
        if not (math.isfinite(a) and math.isfinite(b)) or not 0 <= a < b <= duration + 1e-9:
            raise ReaudioError(f"mask range {a:g}-{b:g} s must have 0 <= start < end <= {duration:g} s (the duration)")
        if i and a < ranges[i - 1][1]:
            raise ReaudioError(f"mask ranges {ranges[i - 1][0]:g}-{ranges[i - 1][1]:g} and {a:g}-{b:g} s overlap")
    return ranges


def latent_keep(ranges, latent_frames: int, compression: int) -> torch.Tensor:
    """``[1, 1, latent_frames, 1]`` float: 0 inside the masked ranges (mel frames ``seconds * MEL_FPS``, a latent
    frame per ``compression`` of them, widened outwards to whole latent frames), 1 where the input is kept."""
    keep = torch.ones(1, 1, latent_frames, 1)
    for a, b in ranges:
        lo = int(math.floor(a * M.MEL_FPS / compression + 1e-9))
        hi = int(math.ceil(b * M.MEL_FPS / compression - 1e-9))
        keep[:, :, lo:max(hi, lo + 1)] = 0
    return keep


# -- the sampler's part (ReAudioPipeline.sample) ---------------------------------------------------------
def start(scheduler, noise: torch.Tensor, known: torch.Tensor | None, strength: float, train_steps: int):
    """SDEdit's start: ``(timesteps, latents)``: every step from ``noise`` at ``strength`` 1 (or without an
    input), else only the steps at or below ``strength * train_steps`` from the known latent noised to the
    first of them (no step: the known latent itself)."""
    if known is None or strength >= 1:
        return scheduler.timesteps, noise
    kept = [i for i, t in enumerate(scheduler.timesteps) if float(t) <= strength * train_steps]
    if not kept:
        return scheduler.timesteps[:0], known.expand_as(noise).clone()
    if hasattr(scheduler, "set_begin_index"):  # multistep solvers count their steps from here
        scheduler.set_begin_index(kept[0])
    timesteps = scheduler.timesteps[kept[0]:]
    return timesteps, scheduler.add_noise(known.expand_as(noise), noise, timesteps[:1])


def blend(scheduler, latents: torch.Tensor, known: torch.Tensor | None, keep: torch.Tensor | None,
          noise: torch.Tensor, t=None) -> torch.Tensor:
    """Inpainting: the known latent (noised to ``t``; ``None`` = clean, after the last step) where ``keep`` is 1."""
    if keep is None:
        return latents
    target = known.expand_as(latents) if t is None else scheduler.add_noise(known.expand_as(latents), noise,
                                                                             t.reshape(1))
    return keep * target + (1 - keep) * latents


# -- neighbours from the input clip ----------------------------------------------------------------------
def audio_neighbours(pipe, wave: np.ndarray, k: int) -> list[dict]:
    """The ``k`` database items whose audio embeddings are nearest (cosine) to the input clip's, embedded by the
    pipeline's audio encoder, which must be the one the database was built with."""
    db = pipe.database
    built = (db.meta.get("audio") or {}).get("encoder") or {}
    if not built:
        raise ReaudioError(
            f"--retrieve-from audio: the database {db.root} holds no audio embeddings (built with "
            "database.embed_audio=false); build one that does: `reaudio index build --manifest CSV --out DIR "
            "database.embed_audio=true` (with this model's preset), then pass --db DIR")
    mine = pipe.cfg.get("audio_encoder") or {}
    if pipe.audio_encoder is None or built.get("name") != mine.get("name"):
        raise ReaudioError(f"--retrieve-from audio: {db.root} was embedded with audio_encoder {built.get('name')!r}, "
                           f"this pipeline's is {mine.get('name')!r}: rebuild the database with the model's encoder")
    query = pipe.audio_encoder.embed([wave]).float().numpy()[0]
    table = np.asarray(db.embeddings("audio"), dtype=np.float32)
    if table.shape[1] != query.shape[0]:
        raise ReaudioError(f"--retrieve-from audio: {db.root} holds {table.shape[1]}-d audio embeddings, the audio "
                           f"encoder gives {query.shape[0]}-d: rebuild the database with the model's encoder")
    scores = table @ query / (np.linalg.norm(table, axis=1) * np.linalg.norm(query) + 1e-12)
    hidden = set(pipe.cfg["generation"].get("exclude_labels") or [])
    order = [int(i) for i in np.argsort(-scores, kind="stable") if db.items[i].get("label") not in hidden][:k]
    return [{**db.items[i], "id": i, "score": float(scores[i])} for i in order]


def merge(text: list[dict], audio: list[dict], k: int) -> list[dict]:
    """``retrieve_from=both``: text and audio neighbours interleaved, text first, each item once, ``k`` kept."""
    out, seen = [], set()
    for pair in zip(text + [None] * len(audio), audio + [None] * len(text)):
        for item in pair:
            if item is not None and item["id"] not in seen and len(out) < k:
                seen.add(item["id"])
                out.append(item)
    return out

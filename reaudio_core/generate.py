"""The pieces of ``reaudio generate`` shared by one-shot runs, batch runs (:mod:`reaudio_core.batch`) and the web
page (:mod:`reaudio_core.serve`): the model flags, the pipeline they load, the checked generation numbers, file
names from prompts, and the neighbour lines printed under each output."""
from __future__ import annotations

import argparse
import math
import re
import unicodedata
from typing import Sequence

from .registry import ReaudioError

DEFAULT_PRESET = "offline-fast"
MAX_CANDIDATES = 64  #: all candidates of all prompts are sampled in one batch: more is a memory error, not a result
FLAGS = ("seed", "steps", "guidance", "duration", "candidates", "engine")  #: flags that are ``generation.<flag>`` overrides


MAX_PROMPT_CHARS = 2000


def clean_prompt(prompt: str) -> tuple[str, list[str]]:
    """Normalise a prompt; reject empty ones; truncate absurdly long ones (with a warning)."""
    if not isinstance(prompt, str):
        raise ReaudioError(f"a prompt must be text, got {type(prompt).__name__}")
    notes = []
    text = unicodedata.normalize("NFC", prompt)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" or ch in "\t\n" else " " for ch in text)
    text = " ".join(text.split())
    if not text:
        raise ReaudioError(f"empty prompt {prompt!r}: describe the sound to generate")
    if len(text) > MAX_PROMPT_CHARS:
        notes.append(f"prompt of {len(text)} characters truncated to {MAX_PROMPT_CHARS} "
                     "(text encoders also truncate to their token limit)")
        text = text[:MAX_PROMPT_CHARS]
    return text, notes


def latent_shape(duration: float, max_duration: float, latent_channels: int, compression: int, downsample: int,
                 mel_fps: int) -> tuple[int, int, int]:
    """``(C, T, F)`` of the latent a ``duration``-second clip needs (the decoder's ``compression`` and the
    denoiser's ``downsample``, ``mel_fps`` mel frames per second), or :class:`ReaudioError` naming the nearest
    durations that fit. Both engines' (``ReAudioPipeline.latent_shape``, :mod:`reaudio_core.lite.run`)."""
    if not math.isfinite(duration) or duration <= 0:
        raise ReaudioError(f"duration must be > 0 seconds, got {duration}")
    if duration > max_duration:
        raise ReaudioError(f"duration {duration} s is beyond this model's limit of {max_duration} s")
    frames = duration * mel_fps
    step = compression * downsample
    if abs(frames - round(frames / step) * step) > 1e-6:
        lo = max(step, int(frames // step) * step)
        raise ReaudioError(f"duration {duration} s is {frames:g} mel frames, not a multiple of {step} "
                           f"(decoder x{compression} times denoiser x{downsample}); try "
                           f"{lo / mel_fps:g} s or {(lo + step) / mel_fps:g} s")
    return latent_channels, int(round(frames)) // compression, 64 // compression


def write_clip(out, single: bool, i: int, prompt: str, wave, mel, neighbours: list[dict], sample_rate: int,
               png: bool):
    """One clip of ``reaudio generate -o OUT`` written (OUT itself, or ``OUT/NN_<slug>.wav``), its neighbours
    printed, and with ``png`` its spectrogram beside it. Returns the path."""
    from pathlib import Path

    from .audio import save_wav
    out = Path(out)
    path = out if single else out / f"{i:02d}_{slug(prompt)}.wav"
    save_wav(path, wave, sample_rate)
    print(f"{path}  <- {prompt!r}")
    for line in neighbour_lines(neighbours):
        print(line)
    if png:
        from .plots import save_mel_png
        save_mel_png(path.with_suffix(".png"), mel, prompt, [n["caption"] for n in neighbours])
    return path


def write_config(out, single: bool, cfg: dict) -> None:
    """The resolved configuration beside the output: ``OUT.config.yaml`` for one file, ``OUT/config.yaml`` for a
    folder."""
    from pathlib import Path

    import yaml

    from .config import save_config
    if single:
        Path(str(out) + ".config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    else:
        save_config(cfg, Path(out))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose a model and its generation defaults (``generate`` and ``serve``)."""
    p.add_argument("--preset", default=None, help=f"named preset (default: {DEFAULT_PRESET})")
    p.add_argument("--config", action="append", default=[], metavar="FILE")
    p.add_argument("--model", metavar="DIR", help="a saved pipeline (save_pretrained / reaudio train)")
    p.add_argument("--db", metavar="DIR", help="retrieval database (reaudio index build)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--duration", type=float, metavar="S")
    p.add_argument("--candidates", type=int)


def flag_overrides(args) -> list[str]:
    """``generation.<flag>=value`` for each of :data:`FLAGS` given on the command line."""
    out = []
    for flag in FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ReaudioError(f"--{flag} must be a finite number, got {value}")
            out.append(f"generation.{flag}={value}")
    return out


def check_generation(cfg: dict) -> None:
    """The resolved ``generation`` numbers (flags and ``generation.*`` overrides alike): finite and in range,
    checked before anything is sampled. Raises :class:`ReaudioError` naming the key and its flag."""
    gen, most_steps = cfg["generation"], cfg["diffusion"]["num_train_timesteps"]
    rules = {  # key: (integer?, test, what it must be)
        "guidance": (False, lambda v: v >= 0, "a finite number >= 0 (1 = no guidance, 0 = the unconditional model)"),
        "duration": (False, lambda v: v > 0, f"a finite number of seconds > 0 (at most {gen.get('max_duration')})"),
        "steps": (True, lambda v: 1 <= v <= most_steps,
                  f"an integer from 1 to {most_steps} (diffusion.num_train_timesteps)"),
        "candidates": (True, lambda v: 1 <= v <= MAX_CANDIDATES, f"an integer from 1 to {MAX_CANDIDATES}"),
        "seed": (True, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1"),
    }
    for key, (integer, test, what) in rules.items():
        v = gen.get(key)
        kinds = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds) or not math.isfinite(v) or not test(v):
            raise ReaudioError(f"generation.{key} (--{key}) must be {what}, got {v!r}")


def load_pipeline(args, overrides: Sequence[str]):
    """The pipeline ``--model`` / ``--preset`` / ``--config`` / ``--db`` and ``overrides`` name, its generation
    numbers checked (:func:`check_generation`)."""
    from .config import compose
    from .pipeline import ReAudioPipeline
    if args.model:
        pipe = ReAudioPipeline.from_pretrained(args.model, list(overrides), db=args.db)
        check_generation(pipe.cfg)
        return pipe
    cfg = compose(args.preset or DEFAULT_PRESET, args.config, list(overrides))
    check_generation(cfg)
    return ReAudioPipeline.from_config(cfg, db=args.db)


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe lower-case stem of ``text``: letters, digits, ``_`` and ``-`` only (never empty)."""
    return re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")[:n] or "prompt"


def neighbour_lines(neighbours: list[dict]) -> list[str]:
    """The lines printed under an output for the neighbours it conditioned on."""
    return [f"    neighbour {n['score']:.3f}  {n['caption']}  ({n.get('path', '')})" for n in neighbours]


def print_notes(notes: Sequence[str], shown: set[str]) -> None:
    """Each generation note on stderr once: one in ``shown`` (warnings already printed as one line, notes printed
    before) is not printed again; the printed ones are added to it."""
    import sys
    for note in notes:
        line = " ".join(str(note).split())
        if line not in shown:
            shown.add(line)
            print(f"note: {note}", file=sys.stderr)


# -- `reaudio generate` flags ----------------------------------------------------------------------------
def add_mode_args(p) -> None:
    """The mode flags of ``reaudio generate`` (cli.py; what they do: :mod:`reaudio_core.modes`)."""
    p.add_argument("--audio", metavar="IN", help="input clip (any rate / channels): audio-to-audio, or inpainting "
                   "with --mask")
    p.add_argument("--strength", type=float, metavar="S", help="with --audio: 0 = the input's VAE round trip .. "
                   "1 = ordinary generation (default 1)")
    p.add_argument("--mask", metavar="START-END[,...]", help="with --audio: seconds to regenerate (inpainting)")
    p.add_argument("--retrieve-from", choices=("text", "audio", "both"), help="neighbours from the prompt (text, default), "
                   "the input clip's audio embedding (audio), or both")


def mode_settings(args) -> dict:
    """The mode flags given, as ``generation`` keys (so the configuration saved beside the output records them)."""
    flags = {"audio": args.audio, "strength": args.strength, "mask": args.mask, "retrieve_from": args.retrieve_from}
    return {k: v for k, v in flags.items() if v is not None}

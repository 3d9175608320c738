"""Audio I/O and checks: anything soundfile reads -> 16 kHz mono float32.

The reference mel front end (reference section 1) lives in :mod:`reaudio_core.mel`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .interfaces import SAMPLE_RATE
from .optional import is_tensor


class AudioProblem(Exception):
    """A clip that cannot be used; the message says why (for skip reports)."""


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    if orig_sr == target_sr:
        return wav
    import torch
    import torchaudio.functional as AF
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), orig_sr, target_sr).numpy()


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, min_duration: float = 0.0,
               silence_db: float | None = None) -> np.ndarray:
    """Read ``path``, average channels, resample to ``sample_rate``; float32 1-D.

    Raises :class:`AudioProblem` for a missing/unreadable file, no samples, non-finite
    samples, a clip shorter than ``min_duration`` seconds, or one whose peak is below
    ``silence_db`` dBFS.
    """
    path = Path(path)
    if not path.exists():
        raise AudioProblem(f"missing file: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioProblem(f"unreadable audio ({type(exc).__name__}: {str(exc).strip()})") from None
    if data.size == 0:
        raise AudioProblem("empty: no samples")
    wav = data.mean(axis=1)
    if not np.isfinite(wav).all():
        raise AudioProblem("non-finite samples")
    duration = len(wav) / sr
    if duration < min_duration:
        raise AudioProblem(f"too short: {duration:.3f} s < {min_duration} s")
    if silence_db is not None:
        peak = float(np.abs(wav).max())
        if peak <= 10 ** (silence_db / 20):
            raise AudioProblem(f"silent: peak {20 * np.log10(peak + 1e-12):.1f} dBFS <= {silence_db} dBFS")
    return np.ascontiguousarray(resample(wav, sr, sample_rate), dtype=np.float32)


def save_wav(path: str | Path, wav, sample_rate: int = SAMPLE_RATE) -> None:
    wav = np.asarray(wav.detach().cpu() if is_tensor(wav) else wav, dtype=np.float32).reshape(-1)
    from .io import atomic_write  # a temporary file beside it, then renamed: never a half-written WAV
    atomic_write(path, lambda tmp: sf.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16"))

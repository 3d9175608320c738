"""Numpy-only twin of the ``griffin-lim`` vocoder (``plugins/griffin_lim.py``, ``mel_inverse="pinv"``,
``seed=None``): a process that must never import torch turns log-mels into waveforms with it.

``log-mel [B, T, 64]`` -> ``exp`` -> ``relu(pinv @ mel)`` linear magnitude -> fast Griffin-Lim from zero
phase, step for step as ``torchaudio.functional.griffinlim`` with ``rand_init=False`` (centred STFT,
reflect padding, periodic Hann, window-square-normalised overlap-add, ``length`` trim) -> shifted by
80 samples to the reference framing -> ``[B, T * 160]`` float32.

Computed in float32 / complex64 as torch does (:func:`_griffin_lim` also runs in float64). Imports numpy
only. Fast Griffin-Lim from zero phase is ill-conditioned: the first inverse STFT of a zero-phase spectrum
is nearly silent (each frame's pulse sits at the frame edges, where the Hann window is ~0), so the phases
of the first rebuilt spectrum come from rounding noise. Float32 results of this module and of torch
therefore differ by a few percent of the peak after 32 iterations (torch float32 differs from torch float64
as much); in float64 the two agree to ~1e-9 of the peak.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# Constants of the reference front end (reaudio_core/mel.py, which imports torch) and of the vocoder
# (plugins/griffin_lim.py): they must stay equal to those.
N_FFT = 1024  #: reaudio_core.mel.N_FFT
WIN_LENGTH = 1024  #: reaudio_core.mel.WIN_LENGTH
HOP_LENGTH = 160  #: reaudio_core.mel.HOP_LENGTH
N_MELS = 64  #: reaudio_core.mel.N_MELS
N_FREQS = N_FFT // 2 + 1  #: 513 one-sided FFT bins
SHIFT = HOP_LENGTH // 2  #: plugins/griffin_lim.SHIFT: reference frame centre (160 t + 80) minus centred (160 t)
MIN_FRAMES = 4  #: plugins/griffin_lim.MIN_FRAMES: the least frames a centred, reflect-padded STFT allows
_HALF = N_FFT // 2  #: centre padding of torch.stft / torch.istft (center=True)
_BLOCKS = -(-N_FFT // HOP_LENGTH)  #: 7: a frame spans this many hop-sized blocks (zero-padded to 1120)


@lru_cache(maxsize=4)
def _window(dtype: str = "float32") -> np.ndarray:
    """Periodic Hann of 1024 samples, as ``torch.hann_window(1024)``; read-only."""
    n = np.arange(WIN_LENGTH, dtype=np.float64)
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN_LENGTH)).astype(dtype)
    w.setflags(write=False)
    return w


def _overlap_add(frames: np.ndarray) -> np.ndarray:
    """``[B, F, 1024]`` frames at hop 160 -> ``[B, 160 * (F - 1) + 1024]`` sum, without a loop over frames:
    each frame is cut into 7 hop-sized blocks and block ``k`` of every frame is added at once."""
    B, F, _ = frames.shape
    blocks = np.zeros((B, F, _BLOCKS * HOP_LENGTH), dtype=frames.dtype)
    blocks[:, :, :N_FFT] = frames
    blocks = blocks.reshape(B, F, _BLOCKS, HOP_LENGTH)
    out = np.zeros((B, F + _BLOCKS - 1, HOP_LENGTH), dtype=frames.dtype)
    for k in range(_BLOCKS):
        out[:, k:k + F] += blocks[:, :, k]
    return out.reshape(B, -1)[:, :HOP_LENGTH * (F - 1) + N_FFT]


@lru_cache(maxsize=4)
def _scaled_window(dtype: str = "float32") -> np.ndarray:
    """``1024 * window``, for the forward STFT; read-only."""
    w = _window(dtype) * np.dtype(dtype).type(N_FFT)
    w.setflags(write=False)
    return w


@lru_cache(maxsize=16)
def _inverse_envelope(frames: int, length: int, dtype: str = "float32") -> np.ndarray:
    """``1 / sum_t window^2(n - 160 t)`` over the kept samples ``[512, 512 + length)``; read-only."""
    w2 = np.broadcast_to(_window("float64") ** 2, (1, frames, N_FFT))
    env = _overlap_add(np.ascontiguousarray(w2))[0, _HALF:_HALF + length]
    if env.min() < 1e-11:  # torch.istft's "window overlap add min" check; never hit with Hann at hop 160
        raise ValueError("griffin-lim: the window envelope vanishes (NOLA fails)")
    inv = (1.0 / env).astype(dtype)
    inv.setflags(write=False)
    return inv


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """``torch.istft(spec, 1024, 160, 1024, hann, center=True, length=length)`` for one-sided
    ``spec [B, F, 513]`` (frames first) -> ``[B, length]``."""
    frames = np.fft.irfft(spec, n=N_FFT, axis=-1)
    frames *= _window(frames.dtype.name)
    wav = _overlap_add(frames)[:, _HALF:_HALF + length]
    return wav * _inverse_envelope(spec.shape[1], length, wav.dtype.name)


def _stft(wav: np.ndarray) -> np.ndarray:
    """``torch.stft(wav, 1024, 160, 1024, hann, center=True, pad_mode='reflect', onesided=True)``
    -> complex ``[B, 1 + N // 160, 513]`` (frames first)."""
    padded = np.pad(wav, ((0, 0), (_HALF, _HALF)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)[:, ::HOP_LENGTH]
    # norm="forward" with the window scaled by 1024 (exact: a power of two) is the unscaled transform; numpy 2.4's
    # default-norm rfft is ~5x slower on [F, 1024] float32 frames here
    return np.fft.rfft(frames * _scaled_window(wav.dtype.name), n=N_FFT, axis=-1, norm="forward")


def _griffin_lim(spec: np.ndarray, n_iter: int, momentum: float, length: int) -> np.ndarray:
    """``torchaudio.functional.griffinlim(spec, hann, 1024, 160, 1024, power=1, n_iter, momentum, length,
    rand_init=False)`` for a real magnitude ``spec [B, F, 513]`` (frames first, F >= 4) -> ``[B, length]``, in
    ``spec``'s float dtype (float32 or float64)."""
    step = momentum / (1 + momentum)
    angles = np.ones(spec.shape, dtype=np.result_type(spec.dtype, np.complex64))  # zero initial phase
    eps = spec.dtype.type(1e-16)
    tprev = None
    for _ in range(n_iter):
        rebuilt = _stft(_istft(spec * angles, length))
        angles = rebuilt - step * tprev if (step and tprev is not None) else rebuilt
        angles = angles / (np.abs(angles) + eps)  # not in place: angles may be rebuilt, kept as tprev
        tprev = rebuilt
    return _istft(spec * angles, length)


def griffin_lim(mel: np.ndarray, pinv: np.ndarray, n_iter: int, momentum: float) -> np.ndarray:
    """log-mel [B, T, 64] float32 -> waveform [B, T*160] float32, as plugins/griffin_lim.GriffinLim(n_iter, momentum,
    seed=None, mel_inverse='pinv') computes it; pinv is the [513, 64] float32 non-negative pseudo-inverse of the mel basis."""
    mel = np.asarray(mel)
    pinv = np.asarray(pinv, dtype=np.float32)
    if mel.ndim != 3 or mel.shape[-1] != N_MELS or mel.shape[1] == 0:
        raise ValueError(f"griffin-lim: mel must be an array [B, T, {N_MELS}] with T > 0, got {mel.shape}")
    if pinv.shape != (N_FREQS, N_MELS):
        raise ValueError(f"griffin-lim: pinv must be [{N_FREQS}, {N_MELS}], got {pinv.shape}")
    if not np.isfinite(mel).all():
        raise ValueError("griffin-lim: mel has non-finite values")
    n_iter, momentum = int(n_iter), float(momentum)
    if n_iter < 0:
        raise ValueError(f"griffin-lim: n_iter must be >= 0, got {n_iter}")
    if not 0 <= momentum < 1:
        raise ValueError(f"griffin-lim: momentum must be in [0, 1), got {momentum}")

    B, T, _ = mel.shape
    # magnitude: relu(pinv @ exp(mel)^T), kept frames-first: [B, T, 513]
    spec = np.maximum(np.exp(mel.astype(np.float32)) @ pinv.T, 0)
    if T < MIN_FRAMES:  # silent frames so the centred STFT can reflect-pad; cropped at the end
        spec = np.pad(spec, ((0, 0), (0, MIN_FRAMES - T), (0, 0)))
    length = max(T, MIN_FRAMES) * HOP_LENGTH - SHIFT

    wav = _griffin_lim(spec, n_iter, momentum, length)
    out = np.zeros((B, T * HOP_LENGTH), dtype=np.float32)
    keep = min(T * HOP_LENGTH - SHIFT, length)
    out[:, SHIFT:SHIFT + keep] = wav[:, :keep]
    return out

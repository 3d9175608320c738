"""reaudio_core.lite.griffinlim: the numpy Griffin-Lim twin of the ``griffin-lim`` vocoder (pinv inverse, zero
initial phase) matches the plugin and never imports torch.

Tolerances: zero-phase fast Griffin-Lim is ill-conditioned (the first inverse STFT of a zero-phase spectrum is
nearly silent, so the first phases come from float32 rounding), so float32 numpy vs float32 torch drifts with the
iterations: ~1e-6 of the peak at 0 iterations, ~0.1 % at 1, 3-8 % (max abs) and 1-7 % (L2) at 32 across ESC-50 /
Clotho clips: as far as torch float32 is from torch float64 (3.9 % on the clip below). In float64 the core agrees
with torchaudio to ~1e-9, which is what pins the algorithm down.
"""
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import single_torch_thread
from reaudio_core.lite import griffinlim as lite
from reaudio_core.mel import N_MELS, mel_basis, waveform_to_mel

MOMENTUM = 0.99


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch single-threaded, as numpy's FFT is: a fair timing, and no thread contention on a busy machine."""
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def pinv() -> torch.Tensor:
    return torch.linalg.pinv(mel_basis().double()).float()  # as plugins/griffin_lim.GriffinLim.magnitude


def _plugin(n_iter: int):
    from reaudio_plugins.griffin_lim import GriffinLim
    return GriffinLim(n_iter=n_iter, momentum=MOMENTUM, seed=None, mel_inverse="pinv")


def _errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    diff = np.abs(out.astype(np.float64) - ref)
    peak = float(np.abs(ref).max())
    return float(diff.max()), float(diff.max()) / peak, float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_constants_match_plugin():
    from reaudio_core import mel
    from reaudio_plugins import griffin_lim as plugin
    assert (lite.N_FFT, lite.WIN_LENGTH, lite.HOP_LENGTH, lite.N_MELS) == (mel.N_FFT, mel.WIN_LENGTH,
                                                                           mel.HOP_LENGTH, mel.N_MELS)
    assert (lite.SHIFT, lite.MIN_FRAMES) == (plugin.SHIFT, plugin.MIN_FRAMES)
    # torch.hann_window computes cos in float32: a few ulps off the correctly rounded window
    np.testing.assert_allclose(lite._window(), torch.hann_window(lite.WIN_LENGTH).numpy(), rtol=0, atol=1e-6)


def test_real_clip_matches_plugin(shared_data, pinv):
    from reaudio_core.audio import load_audio
    flacs = sorted(shared_data.rglob("*.flac"))
    if not flacs:
        pytest.skip(f"no .flac under {shared_data}")
    mel = waveform_to_mel(load_audio(flacs[0])[:32_000], 200)  # 2 s -> [1, 200, 64]
    plugin, mel_np, pinv_np = _plugin(32), mel.numpy(), pinv.numpy()

    ref = plugin(mel).numpy()
    out = lite.griffin_lim(mel_np, pinv_np, 32, MOMENTUM)
    assert out.shape == ref.shape == (1, 200 * 160) and out.dtype == np.float32
    assert not out[:, :lite.SHIFT].any()
    max_abs, max_rel, l2_rel = _errors(out, ref)
    print(f"\n{flacs[0].name}: n_iter 32, max |diff| {max_abs:.4g} ({max_rel:.2%} of peak), L2 {l2_rel:.2%}")
    assert max_rel < 0.15 and l2_rel < 0.10

    t_np, t_torch = [], []  # timing, printed only: interleaved, best of 3
    for _ in range(3):
        t = time.perf_counter(); lite.griffin_lim(mel_np, pinv_np, 32, MOMENTUM); t_np.append(time.perf_counter() - t)
        t = time.perf_counter(); plugin(mel); t_torch.append(time.perf_counter() - t)
    print(f"2 s clip, 32 iterations, 1 thread (best of 3): numpy {min(t_np) * 1e3:.0f} ms, "
          f"torch {min(t_torch) * 1e3:.0f} ms")


@pytest.mark.parametrize("n_iter, momentum", [(16, MOMENTUM), (3, 0.0)])
def test_float64_core_matches_torchaudio(pinv, n_iter, momentum):
    import torchaudio.functional as AF
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    wav = 0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(len(t))
    mel = waveform_to_mel(wav.astype(np.float32), 50)
    spec = torch.relu(pinv @ torch.exp(mel).transpose(1, 2)).double()  # [1, 513, 50]
    length = 50 * 160 - lite.SHIFT
    ref = AF.griffinlim(spec, torch.hann_window(1024, dtype=torch.float64), 1024, 160, 1024, 1.0, n_iter,
                        momentum, length, False).numpy()
    out = lite._griffin_lim(np.ascontiguousarray(spec.numpy().transpose(0, 2, 1)), n_iter, momentum, length)
    assert out.dtype == np.float64 and out.shape == ref.shape
    assert _errors(out, ref)[1] < 1e-6


@pytest.mark.parametrize("frames", [3, 1])
def test_short_mel_min_frames_path(pinv, frames):
    mel = np.random.default_rng(frames).normal(-4.0, 2.0, (2, frames, N_MELS)).astype(np.float32)
    ref = _plugin(4)(torch.from_numpy(mel)).numpy()
    out = lite.griffin_lim(mel, pinv.numpy(), 4, MOMENTUM)
    assert out.shape == ref.shape == (2, frames * 160) and out.dtype == np.float32
    max_abs, max_rel, l2_rel = _errors(out, ref)
    print(f"\nT={frames}, n_iter 4: max |diff| {max_abs:.3g} ({max_rel:.2e} of peak), L2 {l2_rel:.2e}")
    assert max_rel < 1e-2


def test_rejects_bad_input(pinv):
    p = pinv.numpy()
    for mel in (np.zeros((1, 0, N_MELS), np.float32), np.zeros((5, N_MELS), np.float32),
                np.full((1, 4, N_MELS), np.nan, np.float32)):
        with pytest.raises(ValueError):
            lite.griffin_lim(mel, p, 2, MOMENTUM)
    with pytest.raises(ValueError):
        lite.griffin_lim(np.zeros((1, 4, N_MELS), np.float32), p, 2, 1.0)


def test_imports_no_torch():
    code = "import reaudio_core.lite.griffinlim, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

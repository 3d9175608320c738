"""Generation end to end on the tiny preset: every stage, determinism, save/load, bad input."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import make_clip
from reaudio_core.config import compose
from reaudio_core.database import build_database
from reaudio_core.pipeline import ReAudioPipeline
from reaudio_core.registry import ReaudioError

CAPTIONS = ["a dog barking", "rain falling on a roof", "church bells ringing", "a siren wailing",
            "birds chirping in the morning", "a car engine idling"]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydb")
    rows = ["path,caption,label"]
    for i, caption in enumerate(CAPTIONS):
        make_clip(root / f"c{i}.wav", seconds=1.5, freq=200 + 150 * i, seed=i)
        rows.append(f"c{i}.wav,{caption},{caption.split()[1]}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    build_database([root / "m.csv"], root / "db", compose("tiny", [], ["database.neighbours=5"]), progress=False)
    return root / "db"


@pytest.fixture(scope="module")
def pipe(tiny_db):
    torch.manual_seed(0)
    return ReAudioPipeline.from_config(compose("tiny"), db=tiny_db)


def test_tiny_generates_through_every_stage(pipe):
    out = pipe(["a dog barks", "heavy rain"], seed=3, progress=False)
    assert out.waveforms.shape == (2, 128 * 160) and out.waveforms.dtype == torch.float32
    assert out.mels.shape == (2, 128, 64)
    assert torch.isfinite(out.waveforms).all()
    assert len(out.neighbours[0]) == 2 and out.neighbours[0][0]["caption"] == "a dog barking"
    assert out.neighbours[1][0]["caption"] == "rain falling on a roof"


def test_excluded_labels_are_never_retrieved(tiny_db):
    hide = ReAudioPipeline.from_config(compose("tiny", [], ["generation.exclude_labels=[dog,siren]"]), db=tiny_db)
    nb = hide(["a dog barks", "a siren"], steps=1, progress=False).neighbours
    assert all(len(n) == 2 and n[0]["label"] not in ("dog", "siren") for n in nb)
    bad = ReAudioPipeline.from_config(compose("tiny", [], ["generation.exclude_labels=[cat]"]), db=tiny_db)
    with pytest.raises(ReaudioError, match="matched no database item"):
        bad("a cat", steps=1, progress=False)


@pytest.mark.slow  # three end-to-end generations
def test_same_seed_is_bit_identical_and_other_seed_differs(pipe):
    a = pipe("a dog barks", seed=7, progress=False).waveforms
    b = pipe("a dog barks", seed=7, progress=False).waveforms
    c = pipe("a dog barks", seed=8, progress=False).waveforms
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_and_candidates(pipe):
    out = pipe("a siren", seed=1, sampler="ddim", steps=3, candidates=2, progress=False)
    assert out.waveforms.shape == (1, 128 * 160)
    assert any("no reranker" in w for w in out.warnings)


@pytest.mark.slow  # end to end twice, with and without cached features
def test_cached_features_give_the_same_output(pipe, tiny_db, tmp_path):
    before = pipe("church bells", seed=2, progress=False).waveforms
    names = pipe.cache_features(progress=False)
    assert len(names) == 2 and all(pipe.database.features(n) is not None for n in names)
    after = pipe("church bells", seed=2, progress=False).waveforms
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_save_and_load_pretrained_round_trip(pipe, tiny_db, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "config.yaml").exists()
    again = ReAudioPipeline.from_pretrained(tmp_path / "model", db=tiny_db)
    a = pipe("birds", seed=4, progress=False).waveforms
    b = again("birds", seed=4, progress=False).waveforms
    assert torch.equal(a, b)


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt(pipe, prompt):
    with pytest.raises(ReaudioError, match="empty prompt"):
        pipe(prompt, progress=False)


def test_long_and_unusual_prompts(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe("dog " * 2500, steps=1, progress=False)
    assert any("truncated" in str(w.message) for w in caught)
    assert torch.isfinite(out.waveforms).all()
    out = pipe("犬が吠える 🐕 ‏שלום\u200b e\u0301", steps=1, progress=False)
    assert torch.isfinite(out.waveforms).all()


def test_k_larger_than_database_is_clamped_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="larger than the database"):
        out = pipe("dog", k=50, steps=1, progress=False)
    assert len(out.neighbours[0]) == len(CAPTIONS)


@pytest.mark.parametrize("duration,message", [(0, "must be > 0"), (-1, "must be > 0"), (601, "beyond the longest clip"),
                                              (1.0, "not a multiple"), (float("nan"), "must be > 0")])
def test_bad_duration(pipe, duration, message):
    with pytest.raises(ReaudioError, match=message):
        pipe("dog", duration=duration, progress=False)


def test_other_durations(pipe):
    assert pipe("dog", duration=0.64, steps=1, progress=False).waveforms.shape == (1, 64 * 160)


def test_zero_steps(pipe):
    with pytest.raises(ReaudioError, match="steps must be >= 1"):
        pipe("dog", steps=0, progress=False)


def test_non_finite_latents_are_an_error(pipe, monkeypatch):
    real = pipe.denoiser
    monkeypatch.setattr(pipe, "denoiser", lambda x, t, c: torch.full_like(x, float("nan")))
    pipe.denoiser.__dict__.update(vars(real)) if hasattr(real, "__dict__") else None
    with pytest.raises(ReaudioError, match="non-finite latents"):
        pipe("dog", steps=2, progress=False)


def test_database_from_another_encoder_is_refused(tiny_db, tmp_path):
    cfg = compose("tiny", [], ["text_encoder.params.max_length=32", "caption_encoder.params.max_length=32"])
    with pytest.raises(ReaudioError, match="embedded with text_encoder"):
        ReAudioPipeline.from_config(cfg, db=tiny_db)


def test_mismatched_wiring_is_refused(tiny_db):
    cfg = compose("tiny", [], ["denoiser.params.prompt_dim=512"])
    with pytest.raises(ReaudioError, match="denoiser expects 512"):
        ReAudioPipeline.from_config(cfg, db=tiny_db)


def test_retrieval_without_database_is_refused():
    with pytest.raises(ReaudioError, match="needs a database"):
        ReAudioPipeline.from_config(compose("tiny"))


def test_no_retrieval_needs_no_database():
    pipe = ReAudioPipeline.from_config(compose("tiny", [], ["generation.retrieval=none"]))
    assert pipe("dog", steps=1, progress=False).neighbours == [[]]


@pytest.mark.parametrize("preset", ["audioldm-s", "re-audioldm-s", "re-audioldm-l"])
def test_real_size_preset_without_weights_names_what_is_missing(preset):
    with pytest.raises(ReaudioError, match="needs trained weights.*--model DIR.*denoiser/"):
        ReAudioPipeline.from_config(compose(preset))


@pytest.mark.slow  # `reaudio generate` end to end
def test_cli_generate_writes_wav_png_and_config(tiny_db, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "reaudio_core.cli", "generate", "a dog barks", "rain",
                           "-o", str(tmp_path / "out"), "--preset", "tiny", "--db", str(tiny_db), "--seed", "5",
                           "--steps", "2", "--png", "--quiet", "generation.k=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wavs = sorted((tmp_path / "out").glob("*.wav"))
    assert [w.name for w in wavs] == ["00_a-dog-barks.wav", "01_rain.wav"]
    data, sr = sf.read(wavs[0])
    assert sr == 16000 and len(data) == 128 * 160 and np.abs(data).max() > 0
    assert (tmp_path / "out" / "00_a-dog-barks.png").stat().st_size > 1000
    assert (tmp_path / "out" / "config.yaml").exists()
    assert "neighbour" in proc.stdout and "a dog barking" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "reaudio_core.cli", "generate", " ", "-o", str(tmp_path / "x.wav"),
                          "--preset", "tiny", "--db", str(tiny_db)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert bad.returncode == 2 and "empty prompt" in bad.stderr


@pytest.mark.slow  # end-to-end generations at several guidance settings
def test_guidance_rescale_matches_the_conditional_std(pipe, monkeypatch):
    """generation.guidance_rescale: the prediction handed to the scheduler is the guided one blended with
    itself rescaled to the conditional prediction's per-sample std; 0 is plain guidance; outside [0, 1] fails."""
    import reaudio_core.pipeline as P
    seen, outputs = [], []
    real_make, real_denoiser = P.make_scheduler, pipe.denoiser

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, model_output, *a, **kw):
            seen.append(model_output.clone())
            return self.inner.step(model_output, *a, **kw)

    class Denoiser(Recording):
        def __call__(self, x, t, cond):
            out = self.inner(x, t, cond)
            outputs.append(out.float().clone())
            return out

    monkeypatch.setattr(P, "make_scheduler", lambda cfg, sampler: Recording(real_make(cfg, sampler)))
    monkeypatch.setattr(pipe, "denoiser", Denoiser(real_denoiser))
    for rescale in (0.0, 0.6):
        seen.clear(), outputs.clear()
        pipe.cfg["generation"]["guidance_rescale"] = rescale
        try:
            pipe("a dog barks", seed=4, steps=2, guidance=3.0, progress=False)
        finally:
            pipe.cfg["generation"]["guidance_rescale"] = 0.0
        assert len(seen) == len(outputs) == 2
        for eps, both in zip(seen, outputs):
            u, c = both.chunk(2)
            guided = u + 3.0 * (c - u)
            expected = rescale * guided * (c.std() / guided.std()) + (1 - rescale) * guided
            torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-5)
        assert rescale == 0.0 or not torch.allclose(seen[0], (outputs[0].chunk(2)[0] + 3.0 * (
            outputs[0].chunk(2)[1] - outputs[0].chunk(2)[0])))
    pipe.cfg["generation"]["guidance_rescale"] = 1.5
    try:
        with pytest.raises(ReaudioError, match="guidance_rescale"):
            pipe("a dog barks", steps=1, progress=False)
    finally:
        pipe.cfg["generation"]["guidance_rescale"] = 0.0

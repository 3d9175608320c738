"""The ONNX engine (reaudio_core/lite): export, the torch-free runner against the torch pipeline, and the CLI plan."""
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_database
from reaudio_core import lite
from reaudio_core.lite.run import trailing_timesteps

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """The tiny preset on ddim-trailing over a three-clip faiss database with cached audio tokens, exported."""
    from reaudio_core.lite.export import export_bundle
    from reaudio_core.pipeline import ReAudioPipeline
    root = tmp_path_factory.mktemp("lite")
    # faiss: a retriever plugin without torch
    cfg = tiny_database(root, ["retriever=faiss", "generation.sampler=ddim-trailing"])
    torch.manual_seed(0)
    pipe = ReAudioPipeline.from_config(cfg, db=root / "db")
    pipe.cache_features(progress=False, streams=("audio",))
    export_bundle(pipe, root / "bundle")
    return pipe, root / "bundle"


def _torch_generation(pipe, noise: np.ndarray, prompt: str, **kw):
    """The torch pipeline's generation with ``noise`` as its initial latents."""
    orig = torch.randn
    torch.randn = lambda shape, generator=None: torch.from_numpy(noise[0]).clone()
    try:
        return pipe(prompt, progress=False, **kw)
    finally:
        torch.randn = orig


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_bundle_generates_what_the_torch_pipeline_does(tiny_bundle, guidance):
    from reaudio_core.lite.run import Lite
    pipe, bundle = tiny_bundle
    runner = Lite(bundle)
    shape = runner.latent_shape(1.28)
    noise = np.random.default_rng(5).standard_normal((1, *shape), dtype=np.float32)
    ref = _torch_generation(pipe, noise, "a dog barks", seed=5, steps=3, guidance=guidance, duration=1.28, k=2)
    wave, mel, neighbours = runner("a dog barks", seed=5, steps=3, guidance=guidance, duration=1.28, k=2)
    assert [n["id"] for n in neighbours] == [n["id"] for n in ref.neighbours[0]]
    assert [n["score"] for n in neighbours] == pytest.approx([n["score"] for n in ref.neighbours[0]], abs=1e-5)
    ref_mel = ref.mels[0].numpy()
    assert mel.shape == ref_mel.shape
    assert np.abs(mel - ref_mel).max() <= 1e-3 * max(1.0, np.abs(ref_mel).max())
    assert wave.shape == ref.waveforms[0].shape
    assert np.corrcoef(wave, ref.waveforms[0].numpy())[0, 1] > 0.99


def test_prompt_and_caption_encoding_match_the_minilm_plugin(tiny_bundle):
    from reaudio_core.lite.run import Lite
    pipe, bundle = tiny_bundle
    runner = Lite(bundle)
    prompt = "Heavy rain on a tin roof, with distant thunder and a dog barking now and then"
    assert np.abs(runner.embed(prompt) - pipe.text_encoder.embed([prompt]).numpy()).max() < 1e-5
    captions = ["a dog barking", "church bells ringing out over a small town square at noon on a sunday"]
    states, mask = runner.caption_states(captions)
    ref_states, ref_mask = pipe.caption_encoder.encode_tokens(captions, max_tokens=pipe.cfg["generation"]["caption_tokens"])
    assert np.array_equal(mask, ref_mask.numpy())
    assert np.abs(states - ref_states.numpy()).max() < 1e-4


@pytest.mark.parametrize("steps", [1, 3, 4, 8, 20])
def test_trailing_grid_is_diffusers(steps):
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", set_alpha_to_one=True)
    s.set_timesteps(steps)
    assert trailing_timesteps(steps, 1000).tolist() == s.timesteps.tolist()


def test_the_runner_imports_no_torch(tiny_bundle):
    _, bundle = tiny_bundle
    code = ("import sys; from reaudio_core.lite.run import Lite; r = Lite(sys.argv[1]); "
            "w, m, n = r('rain', seed=0, steps=2, guidance=2.0, duration=1.28, k=1); "
            "heavy = [x for x in ('torch', 'transformers', 'diffusers') if x in sys.modules]; "
            "print(w.shape, heavy); assert not heavy")
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _args(**kw):
    base = dict(config=[], preset=None, model=None, db=None, prompts=None, audio=None, mask=None, strength=None,
                retrieve_from=None)
    return Namespace(**{**base, **kw})


def test_the_plan_reads_the_engine_without_torch():
    code = ("import sys; from argparse import Namespace; from reaudio_core import lite; "
            "a = Namespace(config=[], preset='offline-fast', model=None, db=None, prompts=None, audio=None, mask=None, "
            "strength=None, retrieve_from=None); p = lite.plan(a, ['x'], ['generation.seed=3']); "
            "print(p.engine, p.per_run); assert p.engine == 'onnx' and p.per_run == {'seed': 3}; "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("kw, overrides, what", [
    ({"prompts": "p.txt"}, [], "--prompts"),
    ({"audio": "in.wav"}, [], "--audio"),
    ({}, ["generation.candidates=2"], "--candidates"),
    ({}, ["generation.duration=20.48"], "long clip"),
])
def test_what_the_engine_does_not_cover_runs_on_torch_with_a_note(kw, overrides, what):
    p = lite.plan(_args(preset="offline-fast", **kw), ["x"], overrides)
    assert p.engine == "torch" and what in p.note and "uses torch" in p.note


def test_torch_presets_plan_torch_silently_and_a_bad_engine_is_refused():
    assert lite.plan(_args(preset=None), ["x"], []).engine == "onnx"  # the default preset is offline-fast
    assert lite.plan(_args(preset="offline"), ["x"], []) == lite.Plan()
    assert lite.plan(_args(preset="offline"), ["x"], ["generation.engine=onnx"]).engine == "onnx"
    with pytest.raises(lite.ReaudioError, match="generation.engine must be one of torch, onnx"):
        lite.plan(_args(preset="offline"), ["x"], ["generation.engine=tensorrt"])


def test_the_key_changes_with_the_model_not_with_per_run_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("REAUDIO_CACHE", str(tmp_path))
    a = lite.plan(_args(preset="offline-fast"), ["x"], ["generation.seed=1", "generation.steps=8"])
    b = lite.plan(_args(preset="offline-fast"), ["y"], ["generation.guidance=3"])
    c = lite.plan(_args(preset="offline-fast"), ["x"], ["generation.caption_tokens=8"])
    assert a.bundle == b.bundle != c.bundle and a.bundle.parent == tmp_path / "lite"


def test_an_uncovered_pipeline_is_refused_once_then_remembered(tmp_path, monkeypatch, capsys):
    from reaudio_core import cli
    monkeypatch.setenv("REAUDIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x.wav"
    cmd = ["generate", "a dog", "-o", str(out), "--preset", "tiny", "--engine", "onnx", "generation.retrieval=none"]
    assert cli.main(cmd) == 0
    err = capsys.readouterr().err
    assert "cannot run on the ONNX engine" in err and "sampler 'dpm-solver'" in err and "uses torch" in err
    saved = (tmp_path / "x.wav.config.yaml").read_text()
    assert "engine: torch" in saved
    assert len(list((tmp_path / "cache" / "lite").glob(f"*/{lite.UNSUPPORTED_FILE}"))) == 1
    cli._SHOWN.clear()  # notes print once per process
    assert cli.main([*cmd, "--seed", "2"]) == 0
    assert "sampler 'dpm-solver'" in capsys.readouterr().err  # from the cache: the same bundle key


@pytest.mark.slow
def test_the_default_offline_fast_exports_once_then_runs_without_torch(tmp_path):
    """The README's command (the default preset, offline-fast): the first run says it exports its bundle and does;
    the second runs from it without importing torch and writes the same file (numpy noise on both runs); the
    configuration beside it records the preset and the engine."""
    env = {**__import__("os").environ, "REAUDIO_CACHE": str(tmp_path / "cache")}
    probe = ("import sys, runpy; sys.argv = ['reaudio'] + sys.argv[1:]; from reaudio_core.cli import main; rc = main(); "
             "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    runs = []
    for name in ("a.wav", "b.wav"):
        cmd = [sys.executable, "-c", probe, "generate", "a dog barks", "-o", str(tmp_path / name), "--seed", "3"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout + out.stderr)
    assert "TORCH True" in runs[0] and "TORCH False" in runs[1]
    assert "exporting it once" in runs[0] and "exporting" not in runs[1]
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    import yaml
    cfg = yaml.safe_load((tmp_path / "b.wav.config.yaml").read_text())
    assert cfg["generation"]["engine"] == "onnx" and cfg["generation"]["seed"] == 3 and cfg["preset"] == "offline-fast"
    assert cfg["weights"]["onnx_bundle"].startswith(str(tmp_path / "cache"))
    manifest = json.loads((Path(cfg["weights"]["onnx_bundle"]) / "manifest.json").read_text())
    assert [r[:2] for r in manifest["denoiser"]["routes"]] == [[0, 399], [400, 999]]  # the experts' two routes

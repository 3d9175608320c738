"""The ``vocos`` vocoder (plugins/vocos.py) beyond the shared contract rules: its framing (T + 1 STFT frames
-> exactly T * 160 samples), its parameter checks, and training it with ``reaudio train`` (vocoder stage) on
real clips, the export loading back through from_pretrained and as a pipeline's vocoder."""
import pytest
import torch
import yaml

from reaudio_core import ReaudioError
from reaudio_core.registry import get_registry

TINY = {"dim": 16, "intermediate_dim": 32, "num_layers": 2}


def make(**kw):
    return get_registry().create("vocoder", "vocos", **{**TINY, **kw})


@pytest.mark.parametrize("frames", [1, 3, 64])
def test_length_is_frames_times_hop_for_any_n_fft(frames):
    for n_fft in (320, 640, 1024):
        voc = make(n_fft=n_fft)
        wav = voc(torch.randn(2, frames, 64) - 4)
        assert wav.shape == (2, frames * 160) and wav.abs().max() <= 1.0
        spec = voc.model.spectrum(torch.randn(1, frames, 64))
        assert spec.shape == (1, n_fft // 2 + 1, frames + 1) and spec.is_complex()


def test_magnitude_head_is_clipped_and_phase_is_free():
    voc = make()
    with torch.no_grad():
        voc.model.head.bias.fill_(20.0)  # exp(20) would overflow the overlap-add without the clip
    spec = voc.model.spectrum(torch.randn(1, 5, 64))
    assert torch.allclose(spec.abs(), torch.full_like(spec.abs(), 100.0), rtol=1e-5)


def test_bad_parameters_and_input_are_one_line_errors(tmp_path):
    with pytest.raises(ReaudioError, match="n_fft must be even"):
        make(n_fft=200)
    with pytest.raises(ReaudioError, match="must be >= 1"):
        make(num_layers=0)
    with pytest.raises(ReaudioError, match=r"mel must be a tensor \[B, T, 64\]"):
        make()(torch.zeros(1, 4, 80))
    with pytest.raises(ReaudioError, match="checkpoint not found"):
        make(checkpoint=str(tmp_path / "none"))
    voc = make()
    voc.save_pretrained(tmp_path / "v")
    with pytest.raises(ReaudioError, match="checkpoint's sizes"):  # a bare weights file has no sizes of its own
        make(checkpoint=str(tmp_path / "v" / "model.safetensors"), dim=32)


def test_a_saved_folder_states_its_sizes(tmp_path):
    voc = make(n_fft=320)
    voc.save_pretrained(tmp_path / "v")
    mel = torch.randn(1, 5, 64) - 4
    # vocoder.params.checkpoint=DIR with the registry defaults (dim 512, n_fft 640) builds the saved sizes
    loaded = get_registry().create("vocoder", "vocos", checkpoint=str(tmp_path / "v"))
    assert loaded.config() == voc.config() and torch.equal(loaded(mel), voc(mel))


def test_trains_with_the_vocoder_stage_on_real_clips_and_exports(tmp_path, shared_data):
    from reaudio_core import training as T
    from reaudio_core.config import compose
    from reaudio_plugins.vocos import Vocos
    src = shared_data / "esc50-fold4"
    rows = (src / "metadata.csv").read_text().splitlines()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption,label\n" + "".join(
        f"{src / r.split(',')[0]},{r.split(',')[4]},{r.split(',')[1]}\n" for r in rows[1:4]))
    cfg = {"vocoder": {"name": "vocos", "params": TINY},
           "training": {"stage": "vocoder", "manifest": [str(manifest)], "batch_size": 2, "lr": 1e-3,
                        "warmup_steps": 0, "max_steps": 2, "log_every": 1, "crop_seconds": 0.32, "ema_decay": 0,
                        "threads": 1}}
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(cfg))
    T.train(compose(None, [tmp_path / "voc.yaml"]), tmp_path / "out", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "grad_norm" in r] == [1, 2]
    assert all(r["grad_norm"] > 0 and {"mel_l1", "stft"} <= set(r) for r in rows if "grad_norm" in r)
    final = tmp_path / "out" / "final"
    voc = Vocos.from_pretrained(final / "vocoder")
    assert voc.config() == {**TINY, "n_fft": 640, "checkpoint": None, "device": "cpu"}
    mel = torch.randn(1, 8, 64) - 4
    by_config = make(checkpoint=str(final / "vocoder"))  # vocoder.params.checkpoint=OUT/final/vocoder
    assert voc(mel).shape == (1, 1280) and torch.equal(voc(mel), by_config(mel))
    exported = yaml.safe_load((final / "config.yaml").read_text())
    assert exported["vocoder"]["name"] == "vocos" and exported["vocoder"]["params"]["dim"] == TINY["dim"]


@pytest.mark.slow  # builds HiFi-GAN V1 at its registry size (55 M parameters)
def test_vocoder_benchmark_times_the_three_vocoders(tmp_path, capsys):
    import json

    from reaudio_core.cli import main as cli
    cli(["bench", "generation", "--vocoders", "--duration", "0.08", "--repeats", "2", "--threads", "1",
         "--out", str(tmp_path)])
    result = json.loads((tmp_path / "vocoders.json").read_text())
    assert result["frames"] == 8 and set(result["rows"]) == {"hifigan", "griffin-lim", "vocos"}
    rows = result["rows"]
    assert rows["hifigan"]["ratio_to_hifigan"] == 1.0 and rows["griffin-lim"]["params"] == 0
    d, i, n_fft = 512, 1536, 640  # embed conv + norm, 8 x (depthwise conv, norm, two linears, layer scale), norm, head
    block = d * 7 + d + 2 * d + d * i + i + i * d + d + d
    assert rows["vocos"]["params"] == 64 * d * 7 + d + 2 * d + 8 * block + 2 * d + d * (n_fft + 2) + n_fft + 2
    assert rows["hifigan"]["params"] > 50e6
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in rows.values())
    md = (tmp_path / "vocoders.md").read_text()
    assert "| vocos | dim 512, intermediate_dim 1536, num_layers 8, n_fft 640 | 13.21 M |" in md


def test_research_vocoder_table_has_a_row_per_set_and_vocoder():
    from research.offline_preset.vocoders import markdown
    row = {"top1": 0.5, "top5": 0.9, "fad": 3.0, "vocoder_s_per_clip": 0.1, "clips": 4}
    out = {"vocos": "runs/x/final/vocoder", "vocos_config": {**TINY, "n_fft": 640, "checkpoint": None, "device": "cpu"},
           "vocos_params": 12345, "vocos_bytes": 2_000_000, "classifier": "esc50-classifier", "threads": 1,
           "seconds_per_clip": 5.12, "clips": 4, "prompts": 4,
           "rows": {"real clips": {"top1": 1.0, "top5": 1.0, "fad": 0.0},
                    **{f"{s} / {v}": row for s in ("real-mel", "vae", "generated") for v in ("griffin-lim", "vocos")}}}
    md = markdown(out)
    assert "dim 16, intermediate_dim 32, num_layers 2, n_fft 640; 0.01 M parameters, 2.0 MB" in md
    lines = [line for line in md.splitlines() if line.startswith("| (")]
    assert len(lines) == 6 and sum("| vocos |" in line for line in lines) == 3
    assert "| real clips as loaded (no vocoder) | - | 4 | 1.000 | 1.000 | 0.00 | - |" in md

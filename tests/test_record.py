"""What ran is what is recorded: an override is applied or refused, never dropped, and the configuration
saved beside an output names the weights and the retriever that actually ran (on the shipped offline
preset, 0.16 s clips with 2 steps)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from reaudio_core.cli import main
from reaudio_core.config import compose
from reaudio_core.pipeline import ReAudioPipeline, resolve_path
from reaudio_core.registry import ReaudioError, UnknownName, create

SHIPPED = resolve_path("pkg:reaudio_plugins/weights/offline")
UNET = compose("offline")["denoiser"]["params"]["high"]  # the preset's expert: {name: unet-ldm, params}
VAE_ARCH = {k: compose("offline")["decoder"]["params"][k]
            for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")}
FAST = dict(steps=2, duration=0.16, progress=False)  # 16 mel frames: decoder x4 times UNet x4


def mel(pipe) -> torch.Tensor:
    return pipe(["rain"], seed=0, **FAST).mels


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    return ReAudioPipeline.from_preset("offline")


@pytest.fixture(scope="module")
def shipped_mel(shipped):
    return mel(shipped)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A VAE and an expert pair of the shipped sizes with fresh random weights, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    create("decoder", "vae", **VAE_ARCH, scale_factor=0.22).save_pretrained(root / "vae")
    torch.manual_seed(2)
    create("denoiser", "experts", boundary=400, high=UNET, low=UNET).save_pretrained(root / "experts")
    return root


def test_shipped_run_records_its_weights_and_retriever(shipped):
    rec = shipped.cfg["weights"]
    # the preset names its audio encoder's trained VAE itself (audio_encoder.params.weights), so that is what ran
    assert rec == {"audio_encoder": "pkg:reaudio_plugins/weights/offline/audio_encoder/vae",
                   "denoiser": "pkg:reaudio_plugins/weights/offline/denoiser",
                   "decoder": "pkg:reaudio_plugins/weights/offline/decoder", "vocoder": None}
    assert shipped.cfg["retriever"] == shipped.database.config["retriever"]
    assert shipped.cfg["decoder"]["params"]["scale_factor"] == shipped.decoder.scale_factor  # taken from the weights


def test_decoder_checkpoint_is_applied(random_weights, shipped, shipped_mel):
    vae = random_weights / "vae"
    pipe = ReAudioPipeline.from_preset("offline", [f"decoder.params.checkpoint={vae}"])
    assert same_weights(pipe.decoder.model, create("decoder", "vae", **VAE_ARCH, scale_factor=None,
                                                   checkpoint=str(vae)).model)
    assert not same_weights(pipe.decoder.model, shipped.decoder.model)
    assert pipe.decoder.scale_factor == 0.22
    assert pipe.cfg["weights"]["decoder"] == str(vae.resolve()) == pipe.cfg["decoder"]["params"]["checkpoint"]
    assert pipe.cfg["weights"]["denoiser"].endswith("offline/denoiser")  # the rest still the shipped ones
    assert not torch.allclose(mel(pipe), shipped_mel, atol=1e-3)


def test_denoiser_checkpoint_and_one_experts_checkpoint_are_applied(random_weights, shipped, shipped_mel):
    experts = random_weights / "experts"
    whole = ReAudioPipeline.from_preset("offline", [f"denoiser.params.checkpoint={experts}"])
    assert same_weights(whole.denoiser.high.model, create("denoiser", "experts", boundary=400, high=UNET, low=UNET,
                                                          checkpoint=str(experts)).high.model)
    assert not same_weights(whole.denoiser.high.model, shipped.denoiser.high.model)
    assert whole.cfg["weights"]["denoiser"] == str(experts.resolve())
    assert not torch.allclose(mel(whole), shipped_mel, atol=1e-3)

    high = ReAudioPipeline.from_preset("offline", [f"denoiser.params.high.params.checkpoint={experts / 'high'}"])
    assert same_weights(high.denoiser.high.model, whole.denoiser.high.model)
    assert same_weights(high.denoiser.low.model, shipped.denoiser.low.model)  # low: still the shipped expert
    assert high.denoiser.boundary == shipped.denoiser.boundary
    assert high.cfg["weights"]["denoiser"] == {"high": str((experts / "high").resolve()),
                                               "low": "pkg:reaudio_plugins/weights/offline/denoiser/low"}
    assert not torch.allclose(mel(high), shipped_mel, atol=1e-3)


def test_other_params_of_saved_components_are_applied_or_refused():
    pipe = ReAudioPipeline.from_preset("offline", ["decoder.params.scale_factor=0.5"])  # the VAE honours it
    assert pipe.decoder.scale_factor == 0.5 and pipe.cfg["decoder"]["params"]["scale_factor"] == 0.5
    with pytest.raises(ReaudioError, match=r"block_out_channels=\[32, 64, 256\] was not applied.*\[32, 64, 128\]"):
        ReAudioPipeline.from_preset("offline", ["decoder.params.block_out_channels=[32,64,256]"])
    with pytest.raises(ReaudioError, match="boundary=300 cannot be applied.*takes only device"):
        ReAudioPipeline.from_preset("offline", ["denoiser.params.boundary=300"])
    with pytest.raises(ReaudioError, match="high.params.head_width=8 cannot be applied"):
        ReAudioPipeline.from_preset("offline", ["denoiser.params.high.params.head_width=8"])
    with pytest.raises(ReaudioError, match="'unet-ldm' cannot use the weights"):
        ReAudioPipeline.from_preset("offline", ["denoiser=unet-ldm"])


def test_retriever_the_database_cannot_honour_is_refused_search_time_params_applied(capsys):
    with pytest.raises(ReaudioError, match=r"built with the faiss retriever.*index build --manifest "
                                           r"esc50-fold4/metadata.csv --out NEWDB retriever=hnswlib"):
        ReAudioPipeline.from_preset("offline", ["retriever=hnswlib"])
    with pytest.raises(ReaudioError, match=r"index='flat', not 'hnsw'.*retriever.params.index=hnsw"):
        ReAudioPipeline.from_preset("offline", ["retriever.params.index=hnsw"])
    pipe = ReAudioPipeline.from_preset("offline", ["retriever.params.nprobe=4"])
    assert pipe.database.index.nprobe == 4 and pipe.cfg["retriever"]["params"]["nprobe"] == 4
    assert main(["generate", "rain", "-o", "unused.wav", "retriever=torch", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "retriever=torch" in err and "index build" in err


def test_generate_with_db_records_the_databases_retriever(tmp_path, clip_factory):
    from reaudio_core.database import build_database
    manifest = tmp_path / "m.csv"
    rows = [f"{clip_factory(f'c{i}.wav', freq=200 + 100 * i, seconds=0.5).name},tone {i},t{i}" for i in range(4)]
    manifest.write_text("path,caption,label\n" + "\n".join(rows) + "\n")
    build_database([manifest], tmp_path / "db", compose("offline", [], ["retriever=torch"]), progress=False)
    out = tmp_path / "a.wav"
    assert main(["generate", "tone", "-o", str(out), "--db", str(tmp_path / "db"), "--steps", "2",
                 "--duration", "0.16", "--quiet"]) == 0
    saved = yaml.safe_load(Path(str(out) + ".config.yaml").read_text())
    assert saved["retriever"] == {"name": "torch", "params": {"dim": None, "threads": 0}}
    assert saved["generation"]["database"] == str((tmp_path / "db").resolve())
    assert saved["weights"]["decoder"] == "pkg:reaudio_plugins/weights/offline/decoder"
    again = compose(None, [Path(str(out) + ".config.yaml")])  # composes again; a new run records its own weights
    assert "weights" not in again and again["retriever"] == saved["retriever"]


def test_unknown_keys_are_rejected_alike_in_files_and_overrides(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("denoiser:\n  _target_: os.system\n")
    with pytest.raises(UnknownName) as from_file:
        compose("offline", [f])
    with pytest.raises(UnknownName) as from_dot:
        compose("offline", [], ["denoiser._target_=os.system"])
    assert str(from_file.value) == str(from_dot.value) == \
        "denoiser: unknown key(s) ['_target_']; a component entry has 'name' and 'params'"
    # a nested override changes that one value and keeps the rest of the entry
    cfg = compose("offline", [], ["denoiser.params.high.params.checkpoint=X"])
    assert cfg["denoiser"]["params"]["high"] == {"name": "unet-ldm", "params": {**UNET["params"], "checkpoint": "X"}}
    with pytest.raises(ReaudioError, match="records where a run's weights were read"):
        compose("offline", [], ["weights.decoder=X"])


def test_a_yaml_tag_in_an_override_is_a_one_line_error_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    item = f'generation.seed=!!python/object/apply:os.system ["touch {marker}"]'
    with pytest.raises(ReaudioError, match="could not determine a constructor for the tag"):
        compose("offline", [], [item])
    assert main(["generate", "rain", "-o", str(tmp_path / "x.wav"), item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reaudio: error: override 'generation.seed=") and "\n" not in err
    assert not marker.exists()
    assert compose("offline", [], ["training.lr=1e-4"])["training"]["lr"] == 1e-4  # YAML 1.2 floats read as floats

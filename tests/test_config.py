"""Composition: preset -> files -> dot-overrides, validated against the registry."""
import pytest
import yaml

from reaudio_core.config import compose, load_config, save_config
from reaudio_core.registry import ReaudioError, UnknownName, get_registry


def test_preset_fills_every_default():
    cfg = compose("offline")
    assert cfg["retriever"]["name"] == "faiss"
    assert cfg["retriever"]["params"] == get_registry().components[("retriever", "faiss")].defaults
    assert cfg["database"]["neighbours"] == 50


def test_file_then_dotlist_layering(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"retriever": {"name": "faiss", "params": {"index": "hnsw", "ef_search": 10}},
                                 "database": {"neighbours": 20}}))
    cfg = compose("offline", [f], ["retriever.params.ef_search=99", "database.batch_size=4"])
    assert cfg["retriever"]["params"]["index"] == "hnsw"
    assert cfg["retriever"]["params"]["ef_search"] == 99
    assert cfg["database"]["neighbours"] == 20 and cfg["database"]["batch_size"] == 4


def test_changing_a_component_drops_the_old_components_params(tmp_path):
    cfg = compose("offline", [], ["retriever.params.index=hnsw", "retriever=torch"])
    assert cfg["retriever"] == {"name": "torch", "params": get_registry().components[("retriever", "torch")].defaults}


def test_preset_named_in_a_file(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("preset: offline\nretriever: torch\n")
    cfg = compose(None, [f])
    assert cfg["preset"] == "offline" and cfg["retriever"]["name"] == "torch"


@pytest.mark.parametrize("override,message", [
    ("retriever=fais", "Did you mean 'faiss'"),
    ("retriever.params.nprob=3", "Did you mean 'nprobe'"),
    ("databse.neighbours=3", "Did you mean 'database'"),
    ("database.neighbors=3", "Did you mean 'neighbours'"),
])
def test_unknown_names_are_errors_with_closest_match(override, message):
    with pytest.raises(UnknownName, match=message):
        compose("offline", [], [override])


def test_bad_override_and_file(tmp_path):
    with pytest.raises(ReaudioError, match="key=value"):
        compose("offline", [], ["retriever"])
    with pytest.raises(ReaudioError, match="not found"):
        compose("offline", [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ReaudioError, match="mapping"):
        compose("offline", [bad])


def test_saved_config_round_trips(tmp_path):
    cfg = compose("offline", [], ["retriever=torch"])
    save_config(cfg, tmp_path)
    assert load_config(tmp_path) == cfg
    assert compose(None, [tmp_path / "config.yaml"]) == cfg


def test_dot_overrides_apply_in_order_switch_then_params():
    cfg = compose("tiny", [], ["text_encoder=t5", "text_encoder.params.max_length=7"])
    assert cfg["text_encoder"]["name"] == "t5" and cfg["text_encoder"]["params"]["max_length"] == 7
    # the reverse order: the switch drops parameters given for the previous component
    cfg = compose("tiny", [], ["text_encoder.params.max_length=7", "text_encoder=t5"])
    assert cfg["text_encoder"]["params"]["max_length"] == 50


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_compose(path):
    """Every ready-made config in configs/ names registered components and known keys (a typo in a
    training key would otherwise only surface hours into `python -m research.offline_preset train`)."""
    cfg = compose(files=[path])
    assert cfg["training"]["stage"] in ("vae", "ldm", "vocoder")


def test_offline_stages_chain():
    """Each stage of the offline recipe starts from the export of the stage before it."""
    stages = {p: compose(files=[REPO / "configs" / p]) for p in
              ("offline-vae-decoder.yaml", "offline-ldm.yaml", "offline-ldm-v.yaml", "offline-ldm-v-anneal.yaml",
               "offline-ldm-v-pool7.yaml")}
    assert stages["offline-vae-decoder.yaml"]["decoder"]["params"]["checkpoint"] == "runs/offline-vae/final/decoder"
    assert stages["offline-ldm-v.yaml"]["denoiser"]["params"]["checkpoint"] == "runs/offline-ldm/final/denoiser"
    anneal = stages["offline-ldm-v-anneal.yaml"]
    assert anneal["denoiser"]["params"]["checkpoint"] == "runs/offline-ldm-v/final/denoiser"
    assert anneal["diffusion"]["prediction_type"] == "v_prediction"
    assert anneal["training"]["lr_decay"] == "cosine"
    pool7 = stages["offline-ldm-v-pool7.yaml"]
    assert pool7["denoiser"]["params"]["checkpoint"] == "runs/offline-ldm-v-anneal/final/denoiser"
    assert pool7["diffusion"]["prediction_type"] == "v_prediction" and pool7["training"]["neighbour_pool"] == 7
    for name in ("offline-ldm.yaml", "offline-ldm-v.yaml", "offline-ldm-v-anneal.yaml", "offline-ldm-v-pool7.yaml"):
        assert stages[name]["decoder"]["params"]["checkpoint"] == "runs/offline-vae-decoder/final/decoder"
    # the preset's denoiser is two UNets (experts): each stage trains one of them, at the preset's sizes; the
    # low-noise expert starts from stage 5 and trains on exactly the timesteps the preset sends it
    preset = compose("offline")["denoiser"]["params"]
    unet = preset["high"]["params"]
    assert preset["low"] == preset["high"]
    low = compose(files=[REPO / "configs" / "offline-ldm-v-low.yaml"])
    for cfg in [*stages.values(), low][1:]:
        assert cfg["denoiser"]["name"] == "unet-ldm"
        assert {k: cfg["denoiser"]["params"][k] for k in unet} == unet
    assert low["denoiser"]["params"]["checkpoint"] == "runs/offline-ldm-v-pool7/final/denoiser"
    assert low["training"]["timesteps"] == [0, preset["boundary"]]
    assert low["diffusion"]["prediction_type"] == "v_prediction" and low["training"]["neighbour_pool"] == 7
    # the second-VAE experiment: the stage-4 LDM fine-tuned onto that VAE, whose encoder also gives the
    # retrieved-audio tokens; the GPU recipe's LDM reads its own VAE in the same way
    for ldm, vae, start in (("offline-ldm-vae2.yaml", "runs/offline-vae2/final/decoder",
                             "runs/offline-ldm-v-anneal/final/denoiser"),
                            ("offline-gpu-ldm.yaml", "runs/offline-gpu-vae/final/decoder", None)):
        cfg = compose(files=[REPO / "configs" / ldm])
        assert cfg["decoder"]["params"]["checkpoint"] == vae and cfg["audio_encoder"]["params"]["weights"] == vae
        assert cfg["denoiser"]["params"].get("checkpoint") == start
        assert cfg["diffusion"]["prediction_type"] == "v_prediction" and cfg["training"]["neighbour_pool"] == 7
    assert compose(files=[REPO / "configs" / "offline-vae2.yaml"])["decoder"]["params"].get("checkpoint") is None

"""Re-AudioLDM from AudioLDM weights (docs/retrofit.md): the retrofitted UNet, ``training.trainable``.

* A retrieval UNet given an AudioLDM diffusers folder computes AudioLDM's output (to 1e-6) with non-trivial
  retrieval conditions, every AudioLDM weight in place and only the stream layers new. (The same for an
  original AudioLDM ``.ckpt``, for every stream combination: tests/test_unet.py,
  ``test_retrieval_unet_from_audioldm_is_exactly_audioldm``.)
* ``retrieval_parameters()`` names exactly those new layers.
* ``training.trainable: retrieval`` trains only them: end to end, a tiny AudioLDM (random weights, saved as a
  diffusers folder) is retrofitted, trained 20 steps, and every AudioLDM weight of the export is bit-identical
  to the source while the stream layers moved; the export generates a WAV with ``reaudio generate --model``.
"""
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_clip
from reaudio_core import ReaudioError, create
from reaudio_core import training as T
from reaudio_core.config import compose
from test_training import TINY_VAE, cli
from test_unet import AUDIO, CHANS, HEAD_WIDTH, PROMPT, TEXT, assert_same, inputs, ref_forward, \
    reference_audioldm_unet, tiny_unet
from test_unet import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)

STREAM_KEY = re.compile(r"((?:down|up)_blocks\.\d+\.attentions|mid_block\.attentions)\.(\d+)\.(.+)")


def save_diffusers_root(model, root):
    """An AudioLDM diffusers pipeline folder holding ``model`` as its UNet (the other parts are not read)."""
    model.save_pretrained(str(root / "unet"), safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    return root


def retrofitted_names(source_keys, n: int) -> dict:
    """AudioLDM key -> its key in a retrieval UNet with ``n - 1`` streams: each level's transformer ``j``
    is transformer ``j * n`` there (the self-attention one before its streams); everything else keeps its name."""
    out = {}
    for k in source_keys:
        m = STREAM_KEY.fullmatch(k)
        out[k] = f"{m[1]}.{int(m[2]) * n}.{m[3]}" if m else k
    return out


def retrieval_names(den) -> set:
    ids = {id(p) for p in den.retrieval_parameters()}
    return {k for k, p in den.model.named_parameters() if id(p) in ids}


# -- the retrofitted UNet ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_dim,audio_dim", [(TEXT, AUDIO), (None, AUDIO)])
def test_retrieval_unet_from_an_audioldm_diffusers_folder_is_exactly_audioldm(tmp_path, caplog, text_dim, audio_dim):
    reference = reference_audioldm_unet(seed=1)
    root = save_diffusers_root(reference, tmp_path / "audioldm-tiny")
    # the documented route: denoiser.params.checkpoint = the AudioLDM folder, text_dim / audio_dim set
    with caplog.at_level("INFO", logger="reaudio"):
        den = create("denoiser", "unet-ldm", size="tiny", prompt_dim=PROMPT, text_dim=text_dim, audio_dim=audio_dim,
                     checkpoint=str(root))
    assert type(den.model).__name__ == "AudioLDM2UNet2DConditionModel" and den.arch["head_width"] == HEAD_WIDTH
    assert den.arch["block_out_channels"] == CHANS
    n = 1 + (text_dim is not None) + (audio_dim is not None)
    # every AudioLDM weight is in the retrieval UNet, unchanged, under its new name; the rest are the streams
    source = reference.state_dict()
    names = retrofitted_names(source, n)
    own = den.model.state_dict()
    assert set(names.values()) <= set(own)
    assert all(torch.equal(own[names[k]], v) for k, v in source.items())
    new = set(own) - set(names.values())
    stream = retrieval_names(den)
    assert new == stream and stream  # the new tensors are exactly the retrieval layers' parameters
    assert all(int(STREAM_KEY.fullmatch(k)[2]) % n for k in stream)
    assert "every AudioLDM weight loaded" in caplog.text and f"{len(den.retrieval_modules())} new stream" in caplog.text
    assert all(not m.proj_out.weight.any() and not m.proj_out.bias.any() for m in den.retrieval_modules())
    # non-trivial retrieval conditions reach live layers, yet the output is AudioLDM's
    x, t, cond = inputs(B=3)
    assert cond.captions.abs().sum() > 0 and cond.audio.abs().sum() > 0 and not cond.audio_mask.all()
    with torch.no_grad():
        got = den(x, t, cond)
        assert_same(got, ref_forward(reference, x, t, cond))
        for m in den.retrieval_modules():  # trained (here: perturbed), the streams change the output
            m.proj_out.weight.normal_(0, 0.1)
        assert not torch.allclose(den(x, t, cond), got, atol=1e-4)


def test_retrieval_parameters_of_unet_and_experts():
    assert tiny_unet().retrieval_parameters() == [] and tiny_unet().retrieval_modules() == []
    den = tiny_unet(TEXT, AUDIO)
    ids = {id(p) for p in den.retrieval_parameters()}
    assert len(ids) == len(den.retrieval_parameters())
    # 3 attention levels down + 3 up (layers_per_block 1 down, 2 up) + middle: (3 + 6 + 1) x 2 streams
    assert len(den.retrieval_modules()) == (3 + 6 + 1) * 2
    widths = [m.transformer_blocks[0].attn2.to_k.weight.shape[1] for m in den.retrieval_modules()]
    assert set(widths) == {TEXT, AUDIO}  # cross-attention to the caption and audio streams, nothing else
    assert not any(id(p) in ids for p in den.model.conv_in.parameters())
    from reaudio_plugins.experts import ExpertDenoisers
    unet = {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": PROMPT, "text_dim": TEXT, "audio_dim": None}}
    experts = ExpertDenoisers(boundary=400, high=unet, low=unet, checkpoint=None, device="cpu")
    got = experts.retrieval_parameters()
    want = experts.high.retrieval_parameters() + experts.low.retrieval_parameters()
    assert [id(p) for p in got] == [id(p) for p in want] and len(got) == 2 * len(experts.high.retrieval_parameters())


def test_trainable_is_validated_before_any_work(tmp_path):
    cfg = compose(None, base={"decoder": {"name": "vae", "params": TINY_VAE},
                              "training": {"stage": "vae", "manifest": [str(tmp_path / "none.csv")]}})
    assert cfg["training"]["trainable"] == "all"  # the default, from registry.yaml
    with pytest.raises(ReaudioError, match="trainable=retrieval .* needs training.stage=ldm, not vae"):
        T.train({**cfg, "training": {**cfg["training"], "trainable": "retrieval"}}, tmp_path / "o", progress=False)
    with pytest.raises(ReaudioError, match=r"training.trainable must be one of \('all', 'retrieval'\)"):
        T.train({**cfg, "training": {**cfg["training"], "trainable": "streams"}}, tmp_path / "o", progress=False)


# -- end to end: retrofit, train the streams only, generate -------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Six 1 s clips, a database of them (MiniLM, torch retriever), an untrained tiny VAE and a tiny AudioLDM
    (no retrieval, random weights, MiniLM-width prompt) saved as a diffusers folder."""
    from reaudio_core.database import build_database
    root = tmp_path_factory.mktemp("retrofit")
    rows = ["path,caption,label"]
    names = ["a dog barks", "rain falls on a roof", "church bells ring"]
    for i in range(6):
        make_clip(root / "clips" / f"c{i}.wav", seconds=1.0, freq=220 * (1 + i % 3) + 30 * i, seed=i)
        rows.append(f"c{i}.wav,{names[i % 3]},class{i % 3}")
    (root / "clips" / "m.csv").write_text("\n".join(rows) + "\n")
    build_database([root / "clips" / "m.csv"], root / "db",
                   compose(None, overrides=["text_encoder=minilm", "retriever=torch", "database.neighbours=4"]),
                   progress=False)
    torch.manual_seed(0)
    create("decoder", "vae", **TINY_VAE, scale_factor=0.9).save_pretrained(root / "vae")
    audioldm = tiny_unet(prompt_dim=384).model
    with torch.no_grad():
        for p in audioldm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_diffusers_root(audioldm, root / "audioldm")
    return root


def retrofit_yaml(root, out_name="retrofit.yaml", **training):
    cfg = {"text_encoder": "minilm", "caption_encoder": "minilm",
           "audio_encoder": {"name": "vae-latent", "params": {"weights": str(root / "vae"), "num_tokens": 4}},
           "decoder": {"name": "vae", "params": {"checkpoint": str(root / "vae")}},
           "denoiser": {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 384, "text_dim": 384,
                                                       "audio_dim": 128, "checkpoint": str(root / "audioldm")}},
           "vocoder": {"name": "griffin-lim", "params": {"n_iter": 2}},
           "generation": {"retrieval": "audio+text", "k": 2, "caption_tokens": 8, "duration": 0.32, "steps": 2},
           "training": {"stage": "ldm", "database": str(root / "db"), "batch_size": 2, "lr": 1e-3,
                        "warmup_steps": 2, "max_steps": 20, "checkpoint_every": 20, "log_every": 5,
                        "crop_seconds": 0.32, "ema_decay": 0.9, "threads": 1, **training}}
    path = root / out_name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # about 25 s of CPU: 20 training steps, then `reaudio generate` in a fresh process
def test_train_only_the_retrieval_layers_then_generate(setup, tmp_path):
    from reaudio_plugins.unet_ldm import UNetLDM
    cfg = compose(None, [retrofit_yaml(setup)], overrides=["training.trainable=retrieval"])
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 20 and np.isfinite(result.last_loss)
    final = tmp_path / "run" / "final"
    source = load_file(setup / "audioldm" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(final / "denoiser" / "model.safetensors")
    names = retrofitted_names(source, 3)
    assert all(torch.equal(trained[names[k]], v) for k, v in source.items()), "an AudioLDM weight changed"
    den = UNetLDM.from_pretrained(final / "denoiser")
    stream = retrieval_names(den)
    assert set(trained) - set(names.values()) == stream
    assert all(trained[k].any() for k in stream if ".proj_out." in k)  # zero at the start: they learned
    # the optimizer and the EMA hold the retrieval parameters only
    state = T.load_checkpoint(T.list_checkpoints(tmp_path / "run")[-1][1])
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(stream)
    assert len(state["ema"]["shadow_params"]) == len(stream)
    # the export generates through the CLI
    wav = tmp_path / "out.wav"
    proc = cli("generate", "a dog barks", "-o", wav, "--model", final, "--steps", "2")
    assert wav.is_file(), proc.stderr[-2000:]
    audio, sr = sf.read(str(wav))
    assert sr == 16000 and len(audio) == 5120 and np.isfinite(audio).all()


def test_trainable_retrieval_needs_retrieval_layers(setup, tmp_path):
    cfg = compose(None, [retrofit_yaml(setup, "plain.yaml", trainable="retrieval")],
                  overrides=["denoiser.params.text_dim=null", "denoiser.params.audio_dim=null",
                             "generation.retrieval=none"])
    with pytest.raises(ReaudioError, match="denoiser 'unet-ldm' has no retrieval layers.*set text_dim / audio_dim"):
        T.train(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow  # two torchrun processes
def test_trainable_retrieval_under_ddp(setup, tmp_path):
    """DistributedDataParallel over the retrieval layers only, with the default find_unused_parameters=False:
    every trained parameter gets its gradient each step (DDP does not track the frozen ones)."""
    from test_training import TORCHRUN, run
    path = retrofit_yaml(setup, "ddp.yaml", max_steps=3, batch_size=1)
    proc = run([*TORCHRUN, "-m", "reaudio_core.cli", "train", "--config", str(path), "--out", str(tmp_path / "ddp"),
                "--quiet", "training.trainable=retrieval"])
    assert "trained ldm: steps 0 -> 3" in proc.stdout and "parameters trained, the rest frozen" in proc.stderr
    source = load_file(setup / "audioldm" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "ddp" / "final" / "denoiser" / "model.safetensors")
    names = retrofitted_names(source, 3)
    assert all(torch.equal(trained[names[k]], v) for k, v in source.items())
    assert any(trained[k].any() for k in set(trained) - set(names.values()) if ".proj_out." in k)

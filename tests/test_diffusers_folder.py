"""diffusers ``AudioLDMPipeline`` folders: ``reaudio generate --model DIR`` runs one as diffusers does, and
``reaudio export --format diffusers`` writes one that diffusers loads and runs.

The folders are tiny and random, written by diffusers' and transformers' own classes (the tokenizer is a
RoBERTa byte-level BPE built here from a few-entry vocabulary, no hub). The reference is diffusers'
``AudioLDMPipeline`` itself: same prompt, seed (one CPU generator: diffusers draws the initial noise as
``randn((1, C, T, F), generator)`` and, with DDIM and eta > 0, the step noise from the same generator, as
reaudio does for one candidate), scheduler, steps, guidance (uncond + g * (cond - uncond), both halves in one
batch) and eta. Its mel is the decoded final latents (``AudioLDMPipeline`` returns audio only; its step
callback gives the latents and ``decode_latents`` the mel it vocodes).
"""
import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch

from reaudio_core import diffusers_folder as DF
from reaudio_core.cli import main
from reaudio_core.config import compose, save_config
from reaudio_core.pipeline import ReAudioPipeline
from reaudio_core.registry import ReaudioError, create

PROMPT = "a dog barks"
SECONDS = 1.28  # the folders' default length: UNet sample_size 32 x VAE x4 x 10 ms
MEL_TOL = 1e-4


def roberta_tokenizer(max_length: int = 16):
    """A byte-level BPE RoBERTa tokenizer over lower-case letters and the space marker (offline)."""
    from transformers import RobertaTokenizer
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in [*"abcdefghijklmnopqrstuvwxyz", "\u0120"]:  # \u0120 = byte-level BPE's space
        vocab[ch] = len(vocab)
    merges = [("\u0120", "d"), ("o", "g"), ("\u0120d", "og")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def write_audioldm_folder(root, *, block_out_channels=(32, 64, 96), attention_head_dim=(2, 4, 6), scheduler=None,
                          seed=0):
    """A random ``AudioLDMPipeline`` folder written by diffusers' ``save_pretrained``."""
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig
    torch.manual_seed(seed)
    tok = roberta_tokenizer()
    text = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, projection_dim=16, pad_token_id=1))
    levels = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=8, out_channels=8, block_out_channels=list(block_out_channels), layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
        attention_head_dim=attention_head_dim if isinstance(attention_head_dim, int) else list(attention_head_dim),
        cross_attention_dim=list(block_out_channels), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=16, class_embeddings_concat=True)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                        latent_channels=8, norm_num_groups=4, scaling_factor=0.8)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=32, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[10, 8, 4, 4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]]))
    scheduler = scheduler or DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    AudioLDMPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                     vocoder=vocoder).save_pretrained(str(root), safe_serialization=True)
    return root


def diffusers_run(root, *, steps=3, guidance=2.5, eta=1.0, seed=0, seconds=SECONDS):
    """(mel [1, T, 64], audio [1, samples]) from diffusers' own AudioLDMPipeline."""
    from diffusers import AudioLDMPipeline
    ref = AudioLDMPipeline.from_pretrained(str(root))
    ref.set_progress_bar_config(disable=True)
    latents = []
    with torch.no_grad():
        audio = ref(PROMPT, audio_length_in_s=seconds, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                    generator=torch.Generator().manual_seed(seed), callback=lambda i, t, lat: latents.append(lat),
                    callback_steps=1, output_type="pt").audios
        mel = ref.decode_latents(latents[-1]).squeeze(1)
    assert len(latents) == steps
    return mel, audio


def ours(root, overrides=(), **call):
    pipe = ReAudioPipeline.from_pretrained(root, list(overrides))
    return pipe, pipe(PROMPT, progress=False, **call)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_audioldm_folder(tmp_path_factory.mktemp("audioldm") / "pipe")


# -- in -------------------------------------------------------------------------------------------------------
def test_folder_generates_as_diffusers_does(folder):
    mel_ref, audio_ref = diffusers_run(folder, steps=3, guidance=2.5, eta=1.0, seed=7)
    pipe, out = ours(folder, ["generation.eta=1.0"], steps=3, guidance=2.5, seed=7)
    assert pipe.cfg["generation"]["sampler"] == "ddim" and pipe.cfg["generation"]["duration"] == SECONDS
    assert out.mels.shape == mel_ref.shape == (1, 128, 64)
    assert (out.mels - mel_ref).abs().max() < MEL_TOL
    # same vocoder weights: the audio agrees too (relative: random HiFi-GAN output is tiny)
    assert out.waveforms.shape == audio_ref.shape
    assert (out.waveforms - audio_ref).abs().max() <= 1e-4 * audio_ref.abs().max()
    # another seed is another sample: the comparison can fail
    _, other = ours(folder, ["generation.eta=1.0"], steps=3, guidance=2.5, seed=8)
    assert (other.mels - mel_ref).abs().max() > 100 * MEL_TOL


def test_resolved_config_names_the_folder_and_what_ran(folder, tmp_path):
    wav = tmp_path / "dog.wav"
    assert main(["generate", PROMPT, "--model", str(folder), "-o", str(wav), "--steps", "2", "--quiet"]) == 0
    import yaml
    cfg = yaml.safe_load((tmp_path / "dog.wav.config.yaml").read_text())
    assert cfg["preset"] == "audioldm-s" and cfg["generation"]["retrieval"] == "none"
    assert cfg["caption_encoder"] is None and cfg["audio_encoder"] is None and cfg["reranker"] is None
    te = cfg["text_encoder"]
    assert te["name"] == "clap" and te["params"]["pretrained"] == str(folder / "text_encoder")
    assert te["params"]["processor"] == str(folder / "tokenizer") and te["params"]["max_length"] == 16
    for slot, name, sub in (("denoiser", "unet-ldm", "unet"), ("decoder", "vae", "vae"),
                            ("vocoder", "hifigan", "vocoder")):
        assert cfg[slot]["name"] == name and cfg[slot]["params"]["checkpoint"] == str(folder / sub)
    den = cfg["denoiser"]["params"]
    assert den["block_out_channels"] == [32, 64, 96] and den["head_width"] == 16 and den["num_heads"] is None
    assert den["text_dim"] is None and den["audio_dim"] is None and den["prompt_dim"] == 16
    assert cfg["decoder"]["params"]["scale_factor"] == pytest.approx(0.8)
    assert cfg["vocoder"]["params"]["upsample_initial_channel"] == 32
    assert cfg["diffusion"]["beta_schedule"] == "scaled_linear" and cfg["generation"]["sampler"] == "ddim"


def test_head_convention_and_num_heads(tmp_path, caplog):
    """diffusers reads attention_head_dim=8 as 8 heads everywhere; unet-ldm's default is channels / 16 here
    (4 heads at 64 channels): the folder runs differently until num_heads=8 says to run it as diffusers does."""
    root = write_audioldm_folder(tmp_path / "pipe", block_out_channels=(32, 64, 128), attention_head_dim=8)
    mel_ref, _ = diffusers_run(root, steps=2)
    with caplog.at_level(logging.WARNING, logger="reaudio"):
        pipe, default = ours(root, ["generation.eta=1.0"], steps=2)
    assert "num_heads=8" in caplog.text
    assert pipe.denoiser.model.config.attention_head_dim == [2, 4, 8]
    assert (default.mels - mel_ref).abs().max() > 10 * MEL_TOL
    pipe, exact = ours(root, ["generation.eta=1.0", "denoiser.params.num_heads=8"], steps=2)
    assert pipe.denoiser.model.config.attention_head_dim == [8, 8, 8]
    assert pipe.cfg["denoiser"]["params"]["num_heads"] == [8, 8, 8]
    assert (exact.mels - mel_ref).abs().max() < MEL_TOL
    with pytest.raises(ReaudioError, match="num_heads must divide"):
        ReAudioPipeline.from_pretrained(root, ["denoiser.params.num_heads=3"])


def test_scheduler_config_is_followed_unless_overridden(folder, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    root = tmp_path / "pipe"
    shutil.copytree(folder, root)
    sched = root / "scheduler" / "scheduler_config.json"
    DPMSolverMultistepScheduler(num_train_timesteps=500, beta_start=0.001, beta_end=0.02, beta_schedule="linear",
                                prediction_type="v_prediction", algorithm_type="dpmsolver++",
                                solver_order=2).save_pretrained(str(root / "scheduler"))
    cfg = DF.folder_config(root)
    assert cfg["generation"]["sampler"] == "dpm-solver"
    assert cfg["diffusion"] == {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.02,
                                "beta_schedule": "linear", "prediction_type": "v_prediction"}
    assert DF.scheduler_notes(root, cfg) == []
    cfg = DF.folder_config(root, ["generation.sampler=ddim", "diffusion.prediction_type=epsilon"])
    assert cfg["generation"]["sampler"] == "ddim" and cfg["diffusion"]["prediction_type"] == "epsilon"
    assert "DPMSolverMultistepScheduler" in DF.scheduler_notes(root, cfg)[0]
    # DDIM settings our sampler fixes are reported, not silently dropped
    DDIMScheduler(steps_offset=0, set_alpha_to_one=True, clip_sample=False).save_pretrained(str(root / "scheduler"))
    notes = DF.scheduler_notes(root, DF.folder_config(root))
    assert len(notes) == 1 and "steps_offset: folder 0, built 1" in notes[0] and "set_alpha_to_one" in notes[0]
    with pytest.warns(UserWarning, match="steps_offset"):
        ReAudioPipeline.from_pretrained(root)
    PNDMScheduler().save_pretrained(str(root / "scheduler"))
    assert "PNDMScheduler" in DF.scheduler_notes(root, DF.folder_config(root))[0]
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "trained_betas": [0.1] * 1000}))
    with pytest.raises(ReaudioError, match="trained_betas"):
        DF.folder_config(root)


def test_reranker_scores_against_the_folder_text_encoder(folder):
    tiny_clap = ["reranker=clap", "reranker.params.pretrained=null", "reranker.params.random_init=true",
                 "reranker.params.size=tiny", "generation.candidates=2", "generation.steps=1", "generation.eta=0"]
    pipe = ReAudioPipeline.from_pretrained(folder, tiny_clap)
    assert pipe.reranker is not None and pipe.reranker.dim == pipe.text_encoder.dim == 16
    text = pipe.text_encoder.embed([PROMPT])
    assert torch.equal(pipe.reranker_text([PROMPT]), text)
    out = pipe(PROMPT, progress=False)
    assert len(out.scores[0]) == 2
    # the scores are the reranker's audio embeddings of both candidates (seeds 0 and 1; eta 0: no step noise)
    # against the folder's CLAP text side
    cond, uncond, _ = pipe.condition([PROMPT], 1)
    with torch.inference_mode():
        waves = [pipe.vocoder(pipe.decoder.decode(pipe.sample(
            cond, uncond, pipe.latent_shape(SECONDS), [torch.Generator().manual_seed(c)], 1,
            pipe.cfg["generation"]["guidance"], "ddim", 0.0, progress=False)))[0].numpy() for c in range(2)]
    audio = pipe.reranker.embed(waves)
    np.testing.assert_allclose(out.scores[0], (audio @ text[0]).tolist(), atol=1e-5)


def test_folders_reaudio_cannot_run_as_diffusers_does_are_refused(folder, tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(folder, root)
    unet_cfg = root / "unet" / "config.json"
    original = unet_cfg.read_text()
    unet_cfg.write_text(json.dumps({**json.loads(original), "upcast_attention": True, "act_fn": "mish"}))
    with pytest.raises(ReaudioError, match=r"unet/ \(unet-ldm\): act_fn: folder 'mish', built 'silu'; "
                                           r"upcast_attention: folder True, built False"):
        ReAudioPipeline.from_pretrained(root)
    unet_cfg.write_text(original)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "AudioLDM2Pipeline"}))
    with pytest.raises(ReaudioError, match="AudioLDM2Pipeline folder; reaudio reads AudioLDMPipeline folders only"):
        ReAudioPipeline.from_pretrained(root)
    (root / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(ReaudioError, match="missing tokenizer"):
        ReAudioPipeline.from_pretrained(root)


# -- the clap text tower on its own -------------------------------------------------------------------------
def test_clap_loads_a_text_tower_folder(folder, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoTokenizer, ClapTextModelWithProjection
    ref = ClapTextModelWithProjection.from_pretrained(str(folder / "text_encoder")).eval()
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    texts = [PROMPT, ""]
    with torch.no_grad():
        batch = tok(texts, padding="max_length", max_length=16, return_tensors="pt")
        expected = F.normalize(ref(**batch).text_embeds, dim=-1)
    for source in (folder / "text_encoder", folder):  # the tower (tokenizer beside it) or the pipeline root
        enc = create("text_encoder", "clap", pretrained=str(source), max_length=16)
        assert (enc.dim, enc.token_dim) == (16, 32)
        assert (enc.embed(texts) - expected).abs().max() < 1e-5
    states, mask = enc.encode_tokens(texts, max_tokens=12)
    assert states.shape == (2, 12, 32) and mask.sum(1).tolist() == [len(tok(PROMPT)["input_ids"]), 2] == [10, 2]
    enc.save_pretrained(tmp_path / "saved")
    again = type(enc).from_pretrained(tmp_path / "saved")
    assert (again.embed(texts) - expected).abs().max() < 1e-5
    with pytest.raises(ReaudioError, match="text tower alone; the audio encoder needs a full ClapModel"):
        create("audio_encoder", "clap", pretrained=str(folder / "text_encoder"))
    lone = tmp_path / "lone"
    shutil.copytree(folder / "text_encoder", lone)
    with pytest.raises(ReaudioError, match="no tokenizer files.*processor=DIR"):
        create("text_encoder", "clap", pretrained=str(lone))
    enc = create("text_encoder", "clap", pretrained=str(lone), processor=str(folder / "tokenizer"), max_length=16)
    assert (enc.embed(texts) - expected).abs().max() < 1e-5


# -- out ------------------------------------------------------------------------------------------------------
TINY_AUDIOLDM = [
    "generation.require_weights=false", "reranker=null",
    "text_encoder.params.pretrained=null", "text_encoder.params.random_init=true", "text_encoder.params.size=tiny",
    "denoiser.params.size=tiny", "denoiser.params.block_out_channels=[32,64]", "denoiser.params.layers_per_block=1",
    "denoiser.params.prompt_dim=16", "decoder.params.block_out_channels=[8,16,16]",
    "decoder.params.layers_per_block=1", "decoder.params.norm_num_groups=4", "decoder.params.scale_factor=0.9",
    "vocoder.params.upsample_initial_channel=32", "vocoder.params.resblock_kernel_sizes=[3]",
    "vocoder.params.resblock_dilation_sizes=[[1,3]]", "generation.duration=1.28", "generation.steps=3"]


def test_export_round_trip(tmp_path):
    """A no-retrieval reaudio pipeline (audioldm-s at tiny size, random weights) -> diffusers folder: diffusers
    loads and runs it to our mel, and reaudio runs the folder to the same mel as before the export."""
    saved, out = tmp_path / "saved", tmp_path / "exported"
    ReAudioPipeline.from_config(compose("audioldm-s", [], TINY_AUDIOLDM)).save_pretrained(saved)
    _, before = ours(saved, seed=3, steps=3)
    assert main(["export", "--format", "diffusers", "--model", str(saved), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDMPipeline" and index["text_encoder"][1] == "ClapTextModelWithProjection"
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"  # the saved pipeline's dpm-solver sampler
    mel_ref, _ = diffusers_run(out, steps=3, guidance=2.5, seed=3)
    assert (before.mels - mel_ref).abs().max() < MEL_TOL
    pipe, after = ours(out, seed=3, steps=3)  # steps, guidance, seed are call settings, not in the folder
    assert pipe.cfg["generation"]["duration"] == 1.28 and pipe.cfg["generation"]["sampler"] == "dpm-solver"
    assert (after.mels - before.mels).abs().max() < MEL_TOL
    assert pipe.decoder.scale_factor == pytest.approx(0.9)
    with pytest.raises(ReaudioError, match="exists and is not empty"):
        DF.export(saved, out)


def test_export_refuses_what_diffusers_cannot_run(tmp_path):
    """The ``tiny`` preset has retrieval streams, a MiniLM text encoder and Griffin-Lim: each reason is named,
    before anything is built."""
    model = tmp_path / "tiny"
    model.mkdir()
    save_config(compose("tiny"), model)
    with pytest.raises(ReaudioError) as err:
        DF.export(model, tmp_path / "out")
    msg = str(err.value)
    for part in ("text_encoder 'minilm' is not 'clap'", "vocoder 'griffin-lim' is not 'hifigan'",
                 "retrieval streams (text_dim=384, audio_dim=32)"):
        assert part in msg
    assert not (tmp_path / "out").exists()
    cfg = compose("audioldm-s", [], [*TINY_AUDIOLDM, "denoiser.params.freq_channels=2"])
    assert DF.export_problems(cfg) == ["the denoiser reads 2 frequency maps beside the latents (freq_channels); "
                                       "AudioLDMPipeline feeds the latents alone"]
    assert DF.export_problems(compose("audioldm-s", [], TINY_AUDIOLDM)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--format", "diffusers", "--model", str(model), str(tmp_path / "out")]) == 2

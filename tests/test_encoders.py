"""Encoder plugins on checkpoints made here in exactly the published layouts (random weights, tiny sizes).

For each layout: every key is consumed or deliberately ignored (no missing / unexpected keys), the
loaded weights equal the source tensors, and the forward pass equals the same weights run by the
reference class (transformers ClapModel / T5ForConditionalGeneration, open_clip CLIP, and for
AudioMAE an independent functional ViT written here). Nothing touches the network.
"""
import argparse
import json

import numpy as np
import pytest
import torch

from reaudio_core import ReaudioError, create

TEXTS = ["a dog barks twice", "rain on a tin roof", "church bells ring in the distance"]


def clip_set():
    rng = np.random.default_rng(1)
    t = np.arange(16000 * 2) / 16000
    return [(0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32),
            (0.05 * rng.standard_normal(16000 * 11)).astype(np.float32),
            (0.1 * rng.standard_normal(4000)).astype(np.float32)]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values in every float parameter (so zero-initialised tables cannot hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def assert_same_weights(model: torch.nn.Module, reference: dict) -> None:
    own = model.state_dict()
    assert set(own) == set(reference)
    for k, v in reference.items():
        assert torch.equal(own[k], v), k


# ---------------------------------------------------------------------------------------------------------
# CLAP
# ---------------------------------------------------------------------------------------------------------
def roberta_tokenizer():
    """A byte-level BPE (RoBERTa-style) tokenizer built here: the 256 byte symbols, no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizer
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


TEXT_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=130, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
# depths[0] = 2: the second block of the first stage is a shifted window (LAION stores its attn_mask)
AUDIO_CFG = dict(patch_embeds_hidden_size=8, depths=[2, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                 hidden_size=64, window_size=8, spec_size=256, num_mel_bins=64)


@pytest.fixture(scope="module")
def clap_reference(tmp_path_factory):
    """A random tiny ClapModel + its processor files (tokenizer, feature extractor) in a folder."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor
    tok = roberta_tokenizer()
    cfg = ClapConfig(text_config={**TEXT_CFG, "vocab_size": len(tok)}, audio_config=AUDIO_CFG, projection_dim=16)
    torch.manual_seed(0)
    model = ClapModel(cfg).eval()
    perturb(model, 0)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    folder = tmp_path_factory.mktemp("clap-hf")
    model.save_pretrained(str(folder))
    ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tok).save_pretrained(
        str(folder))
    return model, tok, folder


def reference_text_embed(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)


def reference_audio_embed(model, waves16k):
    """transformers' own path: 48 kHz, ClapFeatureExtractor(rand_trunc, repeatpad), get_audio_features."""
    import torchaudio
    from transformers import ClapFeatureExtractor
    fe = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
    out = []
    for w in waves16k:
        w48 = torchaudio.functional.resample(torch.from_numpy(w), 16000, 48000).numpy()
        assert len(w48) <= fe.nb_max_samples, "keep reference clips <= 10 s: no random crop"
        x = fe(w48, sampling_rate=48000, return_tensors="pt")
        with torch.no_grad():
            a = model.audio_model(input_features=x["input_features"].float(), is_longer=x["is_longer"]).pooler_output
            out.append(torch.nn.functional.normalize(model.audio_projection(a), dim=-1))
    return torch.cat(out)


def short_clips():
    return [c[:16000 * 3] for c in clip_set()[:2]]


def test_clap_hf_folder_loads_and_matches_clapmodel(clap_reference):
    model, tok, folder = clap_reference
    text = create("text_encoder", "clap", pretrained=str(folder))
    audio = create("audio_encoder", "clap", pretrained=str(folder))
    assert text.model is audio.model, "text and audio side share one ClapModel"
    assert_same_weights(text.model, model.state_dict())
    assert text.dim == audio.dim == 16 and text.token_dim == 32 and audio.token_dim == 64 and audio.num_tokens == 32
    assert torch.allclose(text.embed(TEXTS), reference_text_embed(model, tok, TEXTS), atol=1e-6)
    assert torch.allclose(audio.embed(short_clips()), reference_audio_embed(model, short_clips()), atol=1e-5)


# LAION-CLAP's module tree (laion_clap/clap_module/{model,htsat}.py), written out here from the
# architecture, independently of the plugin's converter.
def laion_htsat_keys(cfg: dict, n_fft: int = 1024) -> dict:
    """key -> shape of an HTSAT audio_branch (non-fusion)."""
    C, depths, heads, w = cfg["patch_embeds_hidden_size"], cfg["depths"], cfg["num_attention_heads"], cfg["window_size"]
    mel, res = cfg["num_mel_bins"], cfg["spec_size"] // 4
    keys = {"spectrogram_extractor.stft.conv_real.weight": (n_fft // 2 + 1, 1, n_fft),
            "spectrogram_extractor.stft.conv_imag.weight": (n_fft // 2 + 1, 1, n_fft),
            "logmel_extractor.melW": (n_fft // 2 + 1, mel),
            "bn0.weight": (mel,), "bn0.bias": (mel,), "bn0.running_mean": (mel,), "bn0.running_var": (mel,),
            "bn0.num_batches_tracked": (), "patch_embed.proj.weight": (C, 1, 4, 4), "patch_embed.proj.bias": (C,),
            "patch_embed.norm.weight": (C,), "patch_embed.norm.bias": (C,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d, r = C * 2 ** i, res // 2 ** i
        win = min(w, r)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                         b + "attn.relative_position_bias_table": ((2 * win - 1) ** 2, h),
                         b + "attn.relative_position_index": (win * win, win * win),
                         b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                         b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                         b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                         b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                         b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
            if j % 2 == 1 and r > w:  # shifted window -> registered attn_mask buffer
                keys[b + "attn_mask"] = ((r // w) ** 2, w * w, w * w)
        if i < len(depths) - 1:
            keys.update({f"layers.{i}.downsample.reduction.weight": (2 * d, 4 * d),
                         f"layers.{i}.downsample.norm.weight": (4 * d,), f"layers.{i}.downsample.norm.bias": (4 * d,)})
    F = C * 2 ** (len(depths) - 1)
    sf = cfg["spec_size"] // 2 ** (len(depths) - 1) // 4 // (cfg["spec_size"] // mel)
    keys.update({"norm.weight": (F,), "norm.bias": (F,), "tscam_conv.weight": (527, F, sf, 3),
                 "tscam_conv.bias": (527,), "head.weight": (527, 527), "head.bias": (527,)})
    return keys


def laion_checkpoint(model, vocab_size: int) -> dict:
    """The LAION-CLAP state dict (no prefix) holding ``model``'s weights, built key by key."""
    from transformers import RobertaConfig, RobertaModel
    hf = model.state_dict()
    g = torch.Generator().manual_seed(3)
    sd = {}
    # text_branch: a transformers RobertaModel (as in LAION-CLAP), saved with its position_ids buffer
    roberta = RobertaModel(RobertaConfig(vocab_size=vocab_size, **TEXT_CFG))
    text_keys = [k for k in roberta.state_dict() if not k.endswith("token_type_ids")]
    text_keys += ["embeddings.position_ids"] if "embeddings.position_ids" not in text_keys else []
    for k in text_keys:
        sd["text_branch." + k] = hf["text_model." + k].clone()
    # audio_branch: HTSAT
    a = "audio_model.audio_encoder."
    block_map = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for k, shape in laion_htsat_keys(AUDIO_CFG).items():
        parts = k.split(".")
        if parts[0] in ("spectrogram_extractor", "logmel_extractor", "tscam_conv", "head") or k.endswith("attn_mask"):
            sd["audio_branch." + k] = torch.randn(shape, generator=g)
            continue
        if parts[0] == "bn0":
            src = a + "batch_norm." + parts[1]
        elif parts[0] == "layers" and parts[2] == "blocks":
            blk, leaf = ".".join(parts[:4]), ".".join(parts[4:])
            if leaf.startswith("attn.qkv."):
                p = parts[-1]
                sd["audio_branch." + k] = torch.cat([hf[f"{a}{blk}.attention.self.{n}.{p}"]
                                                     for n in ("query", "key", "value")])
                continue
            if leaf.startswith("attn.relative_position"):
                src = f"{a}{blk}.attention.self.{parts[-1]}"
            else:
                mod, p = leaf.rsplit(".", 1)
                src = f"{a}{blk}.{block_map[mod]}.{p}"
        else:
            src = a + k
        assert tuple(hf[src].shape) == tuple(shape), (k, src)
        sd["audio_branch." + k] = hf[src].clone()
    for side in ("text", "audio"):
        for idx, lin in (("0", "linear1"), ("2", "linear2")):
            for p in ("weight", "bias"):
                sd[f"{side}_projection.{idx}.{p}"] = hf[f"{side}_projection.{lin}.{p}"].clone()
                sd[f"{side}_transform.sequential.{'0' if idx == '0' else '3'}.{p}"] = torch.randn(
                    hf[f"{side}_projection.{lin}.{p}"].shape, generator=g)
    sd["logit_scale_a"] = hf["logit_scale_a"].clone()
    sd["logit_scale_t"] = hf["logit_scale_t"].clone()
    return sd


@pytest.fixture(scope="module")
def laion_pt(clap_reference, tmp_path_factory):
    model, tok, _ = clap_reference
    sd = laion_checkpoint(model, len(tok))
    folder = tmp_path_factory.mktemp("laion")
    path = folder / "630k-audioset-best.pt"
    torch.save({"epoch": 45, "name": "tiny", "args": argparse.Namespace(amodel="HTSAT-tiny"),
                "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    tok_dir = folder / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    return path, tok_dir, sd


def test_laion_clap_pt_converts_into_clapmodel(clap_reference, laion_pt):
    model, tok, _ = clap_reference
    path, tok_dir, sd = laion_pt
    params = dict(pretrained=str(path), processor=str(tok_dir), config={"text_config": {"num_attention_heads": 2}})
    text = create("text_encoder", "clap", **params)
    audio = create("audio_encoder", "clap", **params)
    assert_same_weights(text.model, model.state_dict())
    report = text.load_report
    expected_ignored = {k for k in sd if k.split(".")[0] in ("text_transform", "audio_transform") or
                        k.startswith(("audio_branch.spectrogram_extractor", "audio_branch.logmel_extractor",
                                      "audio_branch.tscam_conv", "audio_branch.head")) or k.endswith("attn_mask")}
    assert set(report["ignored"]) == expected_ignored and any(k.endswith("attn_mask") for k in expected_ignored)
    assert report["filled"] == ["text_model.embeddings.token_type_ids"]
    assert torch.allclose(text.embed(TEXTS), reference_text_embed(model, tok, TEXTS), atol=1e-6)
    assert torch.allclose(audio.embed(short_clips()), reference_audio_embed(model, short_clips()), atol=1e-5)


def test_laion_clap_fusion_checkpoint(tmp_path, laion_pt):
    """630k-audioset-fusion-best.pt layout: the HTSAT patch embedding carries an AFF block and mel_conv2d."""
    from transformers import ClapConfig, ClapModel
    _, tok_dir, _ = laion_pt
    tok = roberta_tokenizer()
    cfg = ClapConfig(text_config={**TEXT_CFG, "vocab_size": len(tok)},
                     audio_config={**AUDIO_CFG, "enable_fusion": True}, projection_dim=16)
    torch.manual_seed(1)
    model = ClapModel(cfg).eval()
    perturb(model, 4)
    sd = laion_checkpoint(model, len(tok))
    hf = model.state_dict()
    # laion_clap/clap_module/feature_fusion.py AFF: local_att = [conv, bn, relu, conv, bn],
    # global_att = [avgpool, conv, bn, relu, conv, bn]; PatchEmbed.mel_conv2d
    fusion = [f"mel_conv2d.{p}" for p in ("weight", "bias")]
    for branch, convs, bns in (("local_att", (0, 3), (1, 4)), ("global_att", (1, 4), (2, 5))):
        fusion += [f"fusion_model.{branch}.{i}.{p}" for i in convs for p in ("weight", "bias")]
        fusion += [f"fusion_model.{branch}.{i}.{p}" for i in bns
                   for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    for k in fusion:
        sd["audio_branch.patch_embed." + k] = hf["audio_model.audio_encoder.patch_embed." + k].clone()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "fusion.pt")
    enc = create("audio_encoder", "clap", pretrained=str(tmp_path / "fusion.pt"), processor=str(tok_dir),
                 config={"text_config": {"num_attention_heads": 2}})
    assert enc.model.config.audio_config.enable_fusion and enc.bundle.fe.truncation == "fusion"
    assert_same_weights(enc.model, hf)
    clip = short_clips()[:1]
    from transformers import ClapFeatureExtractor
    import torchaudio
    x = ClapFeatureExtractor(truncation="fusion")(
        torchaudio.functional.resample(torch.from_numpy(clip[0]), 16000, 48000).numpy(), sampling_rate=48000,
        return_tensors="pt")
    with torch.no_grad():  # a clip shorter than 10 s is not 'longer': no fusion (LAION-CLAP's inference)
        a = model.audio_model(input_features=x["input_features"].float(), is_longer=torch.tensor([[False]]))
        ref = torch.nn.functional.normalize(model.audio_projection(a.pooler_output), dim=-1)
    assert torch.allclose(enc.embed(clip), ref, atol=1e-5)


def test_audioldm_ckpt_clap_keys_load_too(laion_pt, clap_reference, tmp_path):
    path, tok_dir, sd = laion_pt
    ckpt = {"state_dict": {**{"cond_stage_model.model." + k: v for k, v in sd.items()},
                           "model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4)}}
    torch.save(ckpt, tmp_path / "audioldm-s-full.ckpt")
    text = create("text_encoder", "clap", pretrained=str(tmp_path / "audioldm-s-full.ckpt"), processor=str(tok_dir),
                  config={"text_config": {"num_attention_heads": 2}})
    assert_same_weights(text.model, clap_reference[0].state_dict())


class Payload:
    """An arbitrary object in a checkpoint: loading must refuse it instead of running its pickle code."""


def test_laion_clap_bad_checkpoints(laion_pt, tmp_path):
    path, tok_dir, sd = laion_pt
    torch.save({"state_dict": {**sd, "audio_branch.something_new.weight": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(ReaudioError, match="something_new"):
        create("text_encoder", "clap", pretrained=str(tmp_path / "x.pt"), processor=str(tok_dir))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ReaudioError, match="not a LAION-CLAP checkpoint"):
        create("audio_encoder", "clap", pretrained=str(tmp_path / "other.pt"), processor=str(tok_dir))
    torch.save({"state_dict": sd, "evil": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ReaudioError, match="refused"):
        create("text_encoder", "clap", pretrained=str(tmp_path / "pickled.pt"), processor=str(tok_dir))


@pytest.fixture
def empty_hub_cache(monkeypatch):
    """As on a fresh machine: nothing in the local Hugging Face cache."""
    from reaudio_plugins import _encoders
    monkeypatch.setattr(_encoders, "hub_snapshot", lambda repo_id: None)
    monkeypatch.setattr(_encoders, "hub_file", lambda repo_id, filename: None)


def test_clap_missing_weights_and_options_say_what_to_do(tmp_path, empty_hub_cache):
    with pytest.raises(ReaudioError, match="laion/clap-htsat-unfused.*huggingface-cli download.*random_init"):
        create("text_encoder", "clap")
    with pytest.raises(ReaudioError, match="does not exist"):
        create("audio_encoder", "clap", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ReaudioError, match="contradict"):
        create("audio_encoder", "clap", random_init=True)  # the default pretrained is still set
    with pytest.raises(ReaudioError, match="unknown size"):
        create("audio_encoder", "clap", pretrained=None, random_init=True, size="huge")
    import importlib.util
    if importlib.util.find_spec("laion_clap") is None:
        with pytest.raises(ReaudioError, match="pip install"):
            create("audio_encoder", "clap", backend="laion")


def test_clap_holds_weights_without_tokenizer_needs_processor(laion_pt, empty_hub_cache):
    path, _, _ = laion_pt
    with pytest.raises(ReaudioError, match="no text tokenizer.*processor=DIR"):
        create("text_encoder", "clap", pretrained=str(path), config={"text_config": {"num_attention_heads": 2}})


# ---------------------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------------------
def t5_tokenizer():
    """A T5 (SentencePiece-Unigram) tokenizer built here: pieces for a handful of words and letters."""
    from transformers import T5Tokenizer
    words = " ".join(TEXTS).split()
    letters = sorted(set("".join(words)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in letters] + [("\u2581" + c, -6.5) for c in letters]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A full encoder-decoder T5 folder (the layout of google/flan-t5-*), tiny and random."""
    from transformers import T5Config, T5ForConditionalGeneration
    tok = t5_tokenizer()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                                tie_word_embeddings=False)).eval()
    perturb(model, 1)
    folder = tmp_path_factory.mktemp("flan-t5-tiny")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model, tok, folder


def test_t5_folder_loads_and_matches_reference(t5_folder):
    model, tok, folder = t5_folder
    assert (folder / "model.safetensors").is_file()
    enc = create("text_encoder", "t5", pretrained=str(folder))
    ref_sd = {k: v for k, v in model.state_dict().items() if k.startswith(("shared.", "encoder."))}
    assert_same_weights(enc.model, ref_sd)
    ignored = enc.load_report["ignored"]
    assert ignored and all(k.startswith(("decoder.", "lm_head.")) for k in ignored)
    assert enc.dim == enc.token_dim == 32
    states, mask = enc.encode_tokens(TEXTS, max_tokens=50)
    batch = tok(TEXTS, padding="max_length", max_length=50, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].bool()
    assert torch.equal(mask, m) and mask.shape == (3, 50)
    assert torch.allclose(states[m], ref[m], atol=1e-5) and not states[~m].any()
    pooled = (ref * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    assert torch.allclose(enc.embed(TEXTS), torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)


def test_t5_errors(tmp_path, empty_hub_cache, t5_folder):
    with pytest.raises(ReaudioError, match="google/flan-t5-large.*huggingface-cli download"):
        create("text_encoder", "t5")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ReaudioError, match="config.json missing"):
        create("text_encoder", "t5", pretrained=str(tmp_path / "junk"))
    with pytest.raises(ReaudioError, match="max_tokens"):
        create("text_encoder", "t5", pretrained=str(t5_folder[2])).encode_tokens(["x"], max_tokens=0)


def test_t5_random_init_is_reproducible_from_its_seed():
    import gc
    params = dict(pretrained=None, random_init=True, size="tiny")
    a = create("text_encoder", "t5", seed=7, **params)
    first = a.embed(TEXTS)
    del a
    gc.collect()  # nothing shares the first model any more: the second is built afresh from the seed
    assert torch.equal(create("text_encoder", "t5", seed=7, **params).embed(TEXTS), first)
    assert not torch.allclose(create("text_encoder", "t5", seed=8, **params).embed(TEXTS), first)


# ---------------------------------------------------------------------------------------------------------
# AudioMAE
# ---------------------------------------------------------------------------------------------------------
D, DEPTH, HEADS, DEC = 32, 4, 2, 16  # the 'tiny' size: embed 32, 4 blocks, 2 heads, MLP x2


def mae_block(prefix: str, d: int, hidden: int, g) -> dict:
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)  # noqa: E731
    return {f"{prefix}norm1.weight": 1 + r(d), f"{prefix}norm1.bias": r(d),
            f"{prefix}attn.qkv.weight": r(3 * d, d), f"{prefix}attn.qkv.bias": r(3 * d),
            f"{prefix}attn.proj.weight": r(d, d), f"{prefix}attn.proj.bias": r(d),
            f"{prefix}norm2.weight": 1 + r(d), f"{prefix}norm2.bias": r(d),
            f"{prefix}mlp.fc1.weight": r(hidden, d), f"{prefix}mlp.fc1.bias": r(hidden),
            f"{prefix}mlp.fc2.weight": r(d, hidden), f"{prefix}mlp.fc2.bias": r(d)}


def audiomae_pretrain_state(seed=0) -> dict:
    """models_mae.MaskedAutoencoderViT(in_chans=1, img_size=(1024, 128), audio_exp=True) keys, encoder + decoder."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 513, D), "patch_embed.proj.weight": r(D, 1, 16, 16),
          "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D)}
    for i in range(DEPTH):
        sd.update(mae_block(f"blocks.{i}.", D, 2 * D, g))
    sd.update({"decoder_embed.weight": r(DEC, D), "decoder_embed.bias": r(DEC), "mask_token": r(1, 1, DEC),
               "decoder_pos_embed": r(1, 513, DEC), "decoder_norm.weight": 1 + r(DEC), "decoder_norm.bias": r(DEC),
               "decoder_pred.weight": r(256, DEC), "decoder_pred.bias": r(256)})
    for i in range(2):
        sd.update(mae_block(f"decoder_blocks.{i}.", DEC, 4 * DEC, g))
    return sd


def reference_audiomae(sd: dict, wave: np.ndarray, pool=(4, 4), last=3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference section 3 computed from the raw tensors with plain torch ops: (32 tokens, embedding)."""
    import torchaudio
    F = torch.nn.functional
    w = torch.from_numpy(wave)[None]
    fb = torchaudio.compliance.kaldi.fbank(w - w.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    fb = F.pad(fb, (0, 0, 0, 1024 - fb.shape[0])) if fb.shape[0] < 1024 else fb[:1024]
    x = ((fb + 4.2677393) / (2 * 4.5689974))[None, None]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)  # [1, D, 64, 8]
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    x = torch.cat([sd["cls_token"] + sd["pos_embed"][:, :1], x], 1)
    ln = lambda t, p: F.layer_norm(t, (D,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    outs = []
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.reshape(1, -1, HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, -1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(1, -1, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = ln(x, b + "norm2")
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if i >= DEPTH - last:
            outs.append(ln(x, "norm"))
    ctx = torch.stack(outs).mean(0)[:, 1:]  # CLS dropped: [1, 512, D]
    grid = ctx.reshape(1, 64, 8, D).permute(0, 3, 1, 2)  # time x frequency patch grid
    pooled = (F.avg_pool2d(grid, pool) + F.max_pool2d(grid, pool)) / 2
    return pooled.flatten(2).transpose(1, 2)[0], F.normalize(ctx.mean(1), dim=-1)[0]


@pytest.fixture(scope="module")
def audiomae_pth(tmp_path_factory):
    sd = audiomae_pretrain_state()
    path = tmp_path_factory.mktemp("audiomae") / "pretrained.pth"
    # the MAE training script's layout: model + optimizer state + epoch + argparse args
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 32,
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.8)}, path)
    return path, sd


def test_audiomae_pth_loads_and_matches_reference(audiomae_pth):
    path, sd = audiomae_pth
    enc = create("audio_encoder", "audiomae", pretrained=str(path), size="tiny")
    encoder_keys = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    assert_same_weights(enc.vit, encoder_keys)
    assert set(enc.load_report["ignored"]) == set(sd) - set(encoder_keys)
    assert enc.num_tokens == 32 and enc.token_dim == enc.dim == D
    clips = clip_set()[1:]  # 11 s (cut to 1024 frames) and 0.25 s (padded)
    tokens, mask = enc.encode_tokens(clips)
    emb = enc.embed(clips)
    assert mask.all() and tokens.shape == (2, 32, D)
    for i, c in enumerate(clips):
        ref_tokens, ref_emb = reference_audiomae(sd, c)
        assert torch.allclose(tokens[i], ref_tokens, atol=1e-4), i
        assert torch.allclose(emb[i], ref_emb, atol=1e-5), i


def test_audiomae_pool_window_is_configurable(audiomae_pth):
    path, sd = audiomae_pth
    enc = create("audio_encoder", "audiomae", pretrained=str(path), size="tiny", pool=[2, 8], average_last=2)
    clip = clip_set()[0]
    tokens, _ = enc.encode_tokens([clip])
    assert enc.num_tokens == 32 and tokens.shape == (1, 32, D)
    assert torch.allclose(tokens[0], reference_audiomae(sd, clip, pool=(2, 8), last=2)[0], atol=1e-4)
    with pytest.raises(ReaudioError, match="must divide"):
        create("audio_encoder", "audiomae", pretrained=str(path), size="tiny", pool=[3, 4])


def test_audiomae_finetuned_layout_and_mismatch(tmp_path, audiomae_pth):
    _, sd = audiomae_pth
    enc_sd = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    finetuned = {k: v for k, v in enc_sd.items() if not k.startswith("norm.")}
    finetuned.update({"fc_norm.weight": sd["norm.weight"], "fc_norm.bias": sd["norm.bias"],
                      "head.weight": torch.zeros(527, D), "head.bias": torch.zeros(527)})
    torch.save({"model": finetuned}, tmp_path / "finetuned.pth")
    enc = create("audio_encoder", "audiomae", pretrained=str(tmp_path / "finetuned.pth"), size="tiny")
    assert torch.equal(enc.vit.norm.weight, sd["norm.weight"]) and enc.load_report["ignored"] == ["head.bias",
                                                                                                   "head.weight"]
    with pytest.raises(ReaudioError, match="shape mismatch"):  # a checkpoint of another width
        create("audio_encoder", "audiomae", pretrained=str(tmp_path / "finetuned.pth"), size="tiny",
               config={"embed_dim": 64})
    with pytest.raises(ReaudioError, match="AudioMAE.*pretrained=FILE.*random_init"):
        create("audio_encoder", "audiomae")


# ---------------------------------------------------------------------------------------------------------
# OpenCLIP
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openclip_reference(tmp_path_factory):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vision = CLIPVisionCfg(image_size=32, patch_size=16, width=32, layers=1, head_width=16)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=CLIPTextCfg(width=32, heads=2, layers=2)).eval()
    perturb(model, 2)
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("openclip")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "open_clip_model.safetensors"))  # the published hub layout
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
               folder / "epoch_3.pt")  # an open_clip training checkpoint
    return model, folder


@pytest.mark.parametrize("fname", ["open_clip_model.safetensors", "epoch_3.pt"])
def test_openclip_checkpoint_loads_and_matches_clip(openclip_reference, fname):
    import open_clip
    model, folder = openclip_reference
    enc = create("text_encoder", "openclip", pretrained=str(folder / fname), size="tiny")
    text_keys = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit_"))}
    assert_same_weights(enc.tower, text_keys)
    assert all(k.startswith(("visual.", "logit_scale")) for k in enc.load_report["ignored"])
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    with torch.no_grad():
        ref = model.encode_text(ids, normalize=True)
        x = model.token_embedding(ids) + model.positional_embedding
        states = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    assert torch.allclose(enc.embed(TEXTS), ref, atol=1e-5)
    tokens, mask = enc.encode_tokens(TEXTS)
    valid = ids != 0
    L = tokens.shape[1]
    assert torch.equal(mask, valid[:, :L]) and not valid[:, L:].any()
    assert torch.allclose(tokens[mask], states[:, :L][mask], atol=1e-5)


def test_openclip_errors(tmp_path, empty_hub_cache):
    with pytest.raises(ReaudioError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K.*pretrained=FILE"):
        create("text_encoder", "openclip")
    with pytest.raises(ReaudioError, match="unknown model"):
        create("text_encoder", "openclip", model="ViT-X-99", pretrained=None, random_init=True)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ReaudioError, match="not an open_clip checkpoint"):
        create("text_encoder", "openclip", pretrained=str(tmp_path / "x.pt"), size="tiny")


def test_config_json_of_saved_encoder_lists_constructor_keywords(tmp_path):
    enc = create("audio_encoder", "audiomae", pretrained=None, random_init=True, size="tiny", seed=3)
    enc.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["size"] == "tiny" and saved["random_init"] is False and saved["pool"] == [4, 4]
    assert sorted((tmp_path / "a").iterdir()) == [tmp_path / "a" / "config.json", tmp_path / "a" / "model.safetensors"]
    again = type(enc).from_pretrained(tmp_path / "a", pool=[8, 8])
    assert again.num_tokens == 8 and torch.equal(again.vit.pos_embed, enc.vit.pos_embed)

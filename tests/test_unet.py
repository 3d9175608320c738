"""Denoiser ``unet-ldm``: shapes per stream combination, the head convention, AudioLDM checkpoint layouts
(original Lightning ``.ckpt`` with EMA, diffusers folders) and the exact AudioLDM -> retrieval initialisation.

The fake original checkpoint is named from the structure of AudioLDM's ``openaimodel.UNetModel`` (walked
below in forward order, independently of the plugin's converter) and its weights are paired with
diffusers' ``UNet2DConditionModel`` by the order in which the two execute their layers.
"""
import json

import pytest
import torch

from conftest import single_torch_thread
from reaudio_core import Conditioning, ReaudioError
from reaudio_plugins.unet_ldm import (UNetLDM, build_unet, convert_audioldm_unet_state_dict, diffusers_unet_config,
                                      ema_key, frequency_maps)

CH, MULT, R, PROMPT, TEXT, AUDIO = 32, (1, 2, 3, 5), 1, 16, 24, 20
CHANS = [CH * m for m in MULT]
HEAD_WIDTH = 16  # the tiny size's
STREAMS = [(None, None), (TEXT, None), (None, AUDIO), (TEXT, AUDIO)]


def tiny_unet(text_dim=None, audio_dim=None, **kw) -> UNetLDM:
    params = dict(size="tiny", block_out_channels=None, layers_per_block=None, head_width=None, num_heads=None,
                  guidance_embedding=0,
                  prompt_dim=PROMPT, text_dim=text_dim, audio_dim=audio_dim, in_channels=8, freq_channels=0,
                  checkpoint=None, device="cpu")
    return UNetLDM(**{**params, **kw})


def inputs(B=2, T=16, F=16, seed=0, Lt=7, La=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 8, T, F, generator=g)
    t = torch.tensor([7, 801, 400, 33][:B])
    cmask = torch.ones(B, Lt, dtype=torch.bool)
    cmask[0, 4:] = False
    amask = torch.ones(B, La, dtype=torch.bool)
    amask[-1, 3:] = False
    cond = Conditioning(prompt=torch.randn(B, PROMPT, generator=g), captions=torch.randn(B, Lt, TEXT, generator=g),
                        caption_mask=cmask, audio=torch.randn(B, La, AUDIO, generator=g), audio_mask=amask)
    return x, t, cond


def reference_audioldm_unet(seed=0):
    """diffusers' UNet2DConditionModel configured as AudioLDM (as in diffusers' conversion script: attention
    layers attend to themselves with cross_attention_dim = the level widths, a concatenated simple_projection
    prompt embedding), heads = width / 16, every weight randomised."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        in_channels=8, out_channels=8, block_out_channels=CHANS, layers_per_block=R,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], cross_attention_dim=CHANS,
        attention_head_dim=[c // HEAD_WIDTH for c in CHANS], class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=PROMPT, class_embeddings_concat=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# -- AudioLDM's openaimodel UNetModel, named layer by layer in forward order ----------------------------------
def openaimodel_layers(ch=CH, mult=MULT, num_res_blocks=R, attention_resolutions=(8, 4, 2), prompt=PROMPT, cin=8):
    """[(module name, {param: shape})] of every layer with weights, in the order forward() runs them
    (UNetModel with extra_film_condition_dim, extra_film_use_concat, use_spatial_transformer, no context)."""
    emb = 4 * ch * 2  # time embedding concatenated with the film embedding
    out = [("time_embed.0", {"weight": (4 * ch, ch), "bias": (4 * ch,)}),
           ("time_embed.2", {"weight": (4 * ch, 4 * ch), "bias": (4 * ch,)}),
           ("film_emb", {"weight": (4 * ch, prompt), "bias": (4 * ch,)}),
           ("input_blocks.0.0", {"weight": (ch, cin, 3, 3), "bias": (ch,)})]

    def norm(c):
        return {"weight": (c,), "bias": (c,)}

    def resblock(name, c_in, c_out):
        layers = [(f"{name}.in_layers.0", norm(c_in)),
                  (f"{name}.in_layers.2", {"weight": (c_out, c_in, 3, 3), "bias": (c_out,)}),
                  (f"{name}.emb_layers.1", {"weight": (c_out, emb), "bias": (c_out,)}),
                  (f"{name}.out_layers.0", norm(c_out)),
                  (f"{name}.out_layers.3", {"weight": (c_out, c_out, 3, 3), "bias": (c_out,)})]
        if c_in != c_out:
            layers.append((f"{name}.skip_connection", {"weight": (c_out, c_in, 1, 1), "bias": (c_out,)}))
        return layers

    def spatial_transformer(name, c):
        blk = f"{name}.transformer_blocks.0"
        def attn(a):
            return [(f"{blk}.{a}.to_q", {"weight": (c, c)}), (f"{blk}.{a}.to_k", {"weight": (c, c)}),
                    (f"{blk}.{a}.to_v", {"weight": (c, c)}), (f"{blk}.{a}.to_out.0", {"weight": (c, c), "bias": (c,)})]
        return ([(f"{name}.norm", norm(c)), (f"{name}.proj_in", {"weight": (c, c, 1, 1), "bias": (c,)}),
                 (f"{blk}.norm1", norm(c))] + attn("attn1") + [(f"{blk}.norm2", norm(c))] + attn("attn2")
                + [(f"{blk}.norm3", norm(c)), (f"{blk}.ff.net.0.proj", {"weight": (8 * c, c), "bias": (8 * c,)}),
                   (f"{blk}.ff.net.2", {"weight": (c, 4 * c), "bias": (c,)}),
                   (f"{name}.proj_out", {"weight": (c, c, 1, 1), "bias": (c,)})])

    chans, c, ds, n = [ch], ch, 1, 1
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            out += resblock(f"input_blocks.{n}.0", c, m * ch)
            c = m * ch
            if ds in attention_resolutions:
                out += spatial_transformer(f"input_blocks.{n}.1", c)
            chans.append(c)
            n += 1
        if level != len(mult) - 1:
            out.append((f"input_blocks.{n}.0.op", {"weight": (c, c, 3, 3), "bias": (c,)}))
            chans.append(c)
            ds, n = ds * 2, n + 1
    out += resblock("middle_block.0", c, c) + spatial_transformer("middle_block.1", c)
    out += resblock("middle_block.2", c, c)
    n = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(num_res_blocks + 1):
            out += resblock(f"output_blocks.{n}.0", c + chans.pop(), m * ch)
            c = m * ch
            j = 1
            if ds in attention_resolutions:
                out += spatial_transformer(f"output_blocks.{n}.1", c)
                j = 2
            if level and i == num_res_blocks:
                out.append((f"output_blocks.{n}.{j}.conv", {"weight": (c, c, 3, 3), "bias": (c,)}))
                ds //= 2
            n += 1
    out += [("out.0", norm(ch)), ("out.2", {"weight": (cin, ch, 3, 3), "bias": (cin,)})]
    return out


def execution_order(model, *args, **kwargs):
    """Modules holding weights of ``model``, in the order its forward runs them."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
             for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in hooks:
        h.remove()
    return order


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a busy machine."""
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def reference():
    return reference_audioldm_unet()


@pytest.fixture(scope="module")
def original_sd(reference):
    """The reference's weights under AudioLDM's original names, paired by execution order."""
    x, t, cond = inputs()
    ran = execution_order(reference, x, t, encoder_hidden_states=None, class_labels=cond.prompt)
    layers = openaimodel_layers()
    assert len(ran) == len(layers) == len(set(ran))
    modules = dict(reference.named_modules())
    sd = {}
    for diffusers_name, (orig_name, shapes) in zip(ran, layers):
        params = dict(modules[diffusers_name].named_parameters(recurse=False))
        assert {k: tuple(v.shape) for k, v in params.items()} == shapes, (diffusers_name, orig_name)
        for p, v in params.items():
            sd[f"{orig_name}.{p}"] = v.detach().clone()
    assert len(sd) == len(reference.state_dict())
    return sd


def lightning_ckpt(path, unet_sd, ema_sd=None):
    """A Lightning checkpoint in AudioLDM's layout (plus other sub-models' keys the UNet loader must skip)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    if ema_sd is not None:
        sd.update({ema_key(k): v for k, v in ema_sd.items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 1, 3, 3)
    sd["cond_stage_model.model.logit_scale_a"] = torch.zeros(())
    sd["scale_factor"] = torch.tensor(0.93)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000}, str(path))
    return path


def ref_forward(reference, x, t, cond):
    with torch.no_grad():
        return reference(x, t, encoder_hidden_states=None, class_labels=cond.prompt).sample


def assert_same(a, b):
    assert torch.equal(a, b) or torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())


# -- shapes and head convention -------------------------------------------------------------------------
@pytest.mark.parametrize("text_dim,audio_dim", STREAMS)
def test_shapes_and_layout_for_every_stream_combination(text_dim, audio_dim):
    den = tiny_unet(text_dim, audio_dim)
    n_streams = (text_dim is not None) + (audio_dim is not None)
    assert type(den.model).__name__ == ("UNet2DConditionModel" if n_streams == 0 else "AudioLDM2UNet2DConditionModel")
    assert den.downsample == 8 and den.in_channels == 8 and den.prompt_dim == PROMPT
    assert (den.text_dim, den.audio_dim) == (text_dim, audio_dim)
    for level in (1, 2, 3):
        assert len(den.model.down_blocks[level].attentions) == R * (1 + n_streams)
    assert len(den.model.mid_block.attentions) == 1 + n_streams
    x, t, cond = inputs(T=24)
    with torch.no_grad():
        eps = den(x, t, cond)
    assert eps.shape == x.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    if n_streams:  # the streams and their masks reach the model
        other = Conditioning(**{**cond.__dict__})
        if text_dim:
            other.captions = cond.captions.clone()
            other.captions[0, -1] += 5.0  # a masked caption token: no effect
            with torch.no_grad():
                assert torch.equal(den(x, t, other), eps)
            other.caption_mask = torch.ones_like(cond.caption_mask)
        else:
            other.audio = cond.audio * 2
        with torch.no_grad():
            assert not torch.allclose(den(x, t, other)[0], eps[0])


def test_streams_map_to_their_own_cross_attention():
    den = tiny_unet(TEXT, AUDIO)
    attn = den.model.down_blocks[2].attentions
    kv = [a.transformer_blocks[0].attn2.to_k.weight.shape[1] for a in attn]
    assert kv == [96, TEXT, AUDIO]  # self-attention layer (level width), captions, audio
    assert [a.transformer_blocks[0].attn2.is_cross_attention for a in attn] == [False, True, True]


@pytest.mark.parametrize("size,width,heads", [("s", 32, [8, 12, 20]), ("m", 32, [12, 18, 30]),
                                              ("l", 64, [8, 12, 20]), ("tiny", 16, [4, 6, 10])])
def test_head_convention_is_channels_over_head_width(size, width, heads):
    ch = {"tiny": 32, "s": 128, "m": 192, "l": 256}[size]
    chans = [ch * m for m in MULT]
    _, cfg = diffusers_unet_config(block_out_channels=chans, layers_per_block=2, head_width=width, prompt_dim=512,
                                   in_channels=8, stream_dims=[1024, 768])
    with torch.device("meta"):
        model = build_unet(block_out_channels=chans, layers_per_block=2, head_width=width, prompt_dim=512,
                           in_channels=8, stream_dims=[1024, 768])
    for level, h in zip((1, 2, 3), heads):
        for a in model.down_blocks[level].attentions:
            for attn in (a.transformer_blocks[0].attn1, a.transformer_blocks[0].attn2):
                assert attn.heads == h and attn.inner_dim // attn.heads == width
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == heads[-1]
    assert [u.attentions[0].transformer_blocks[0].attn1.heads for u in model.up_blocks[:3]] == heads[::-1]
    assert cfg["attention_head_dim"][1:] == heads


def test_tiny_defaults_and_registry_sizes():
    den = tiny_unet()
    assert (den.arch["block_out_channels"], den.arch["layers_per_block"], den.arch["head_width"]) == (CHANS, 1, 16)
    from reaudio_core import get_registry
    defaults = get_registry().resolve_params("denoiser", "unet-ldm", {})
    assert defaults["size"] == "s" and defaults["in_channels"] == 8 and defaults["prompt_dim"] == 512


# -- original AudioLDM .ckpt --------------------------------------------------------------------------------
def test_original_ckpt_loads_strictly_and_matches_the_reference(tmp_path, reference, original_sd):
    path = lightning_ckpt(tmp_path / "audioldm.ckpt", original_sd)
    den = UNetLDM.from_pretrained(path)  # sizes read from the weights, no retrieval stream (AudioLDM)
    assert den.arch["block_out_channels"] == CHANS and den.arch["layers_per_block"] == R
    assert den.prompt_dim == PROMPT and den.text_dim is None and den.audio_dim is None
    x, t, cond = inputs()
    with torch.no_grad():
        assert_same(den(x, t, cond), ref_forward(reference, x, t, cond))


def test_ema_weights_are_preferred(tmp_path, reference, original_sd, caplog):
    noisy = {k: v + 1.0 for k, v in original_sd.items()}
    x, t, cond = inputs()
    want = ref_forward(reference, x, t, cond)
    den = UNetLDM.from_pretrained(lightning_ckpt(tmp_path / "ema.ckpt", noisy, ema_sd=original_sd))
    with torch.no_grad():
        assert_same(den(x, t, cond), want)
    # an incomplete EMA copy: the plain weights are used, with a warning
    partial = dict(list(original_sd.items())[:-1])
    den = UNetLDM.from_pretrained(lightning_ckpt(tmp_path / "partial.ckpt", original_sd, ema_sd=partial))
    with torch.no_grad():
        assert_same(den(x, t, cond), want)
    assert "EMA copy holds" in caplog.text
    # the EMA copy alone (configured sizes)
    ema_only = {ema_key(k): v for k, v in original_sd.items()}
    torch.save({"state_dict": ema_only}, str(tmp_path / "ema_only.ckpt"))
    den = tiny_unet(checkpoint=str(tmp_path / "ema_only.ckpt"))
    with torch.no_grad():
        assert_same(den(x, t, cond), want)


def test_converter_reports_missing_and_unexpected_keys(tmp_path, original_sd):
    broken = dict(original_sd)
    broken.pop("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    broken["input_blocks.4.2.norm.weight"] = torch.zeros(64)
    with pytest.raises(ReaudioError, match=r"missing key.*mid_block\.attentions\.0.*unexpected.*input_blocks\.4\.2"):
        tiny_unet(checkpoint=str(lightning_ckpt(tmp_path / "broken.ckpt", broken)))
    target = build_unet(block_out_channels=CHANS, layers_per_block=R, head_width=16, prompt_dim=PROMPT,
                        in_channels=8).state_dict()
    out, used_ema = convert_audioldm_unet_state_dict(original_sd, target, R, len(CHANS))
    assert not used_ema and set(out) == set(target)


def test_checkpoint_with_code_is_refused(tmp_path, original_sd):
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in original_sd.items()},
                "hyper_parameters": Conditioning(prompt=torch.zeros(1))}, str(tmp_path / "pickled.ckpt"))
    with pytest.raises(ReaudioError, match="refused"):
        UNetLDM.from_pretrained(tmp_path / "pickled.ckpt")


def test_wrong_sizes_give_an_actionable_error(tmp_path, original_sd):
    den = tiny_unet(TEXT, AUDIO)
    den.save_pretrained(tmp_path / "ret")
    with pytest.raises(ReaudioError, match="retrieval streams of widths"):
        UNetLDM.from_pretrained(tmp_path / "ret", text_dim=None, audio_dim=AUDIO)
    torch.save({"state_dict": {ema_key(k): v for k, v in original_sd.items()}}, str(tmp_path / "ema_only.ckpt"))
    with pytest.raises(ReaudioError, match=r"shape mismatch.*class_embedding.*Set denoiser.params"):
        tiny_unet(checkpoint=str(tmp_path / "ema_only.ckpt"), prompt_dim=32)


# -- diffusers folders --------------------------------------------------------------------------------------
def test_diffusers_folder_loads_from_root_and_unet(tmp_path, reference):
    root = tmp_path / "audioldm-tiny"
    reference.save_pretrained(str(root / "unet"), safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline", "unet": ["diffusers",
                                                       "UNet2DConditionModel"]}))
    x, t, cond = inputs()
    want = ref_forward(reference, x, t, cond)
    for path in (root, root / "unet"):
        den = UNetLDM.from_pretrained(path)
        assert den.text_dim is None and den.audio_dim is None and den.arch["head_width"] == HEAD_WIDTH
        with torch.no_grad():
            assert_same(den(x, t, cond), want)


def test_diffusers_folder_with_diffusers_heads_warns(tmp_path, reference, caplog):
    reference.register_to_config(attention_head_dim=8)
    try:
        reference.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    finally:
        reference.register_to_config(attention_head_dim=[c // HEAD_WIDTH for c in CHANS])
    den = UNetLDM.from_pretrained(tmp_path / "unet")
    assert "attention heads per level" in caplog.text
    x, t, cond = inputs()
    with torch.no_grad():
        assert_same(den(x, t, cond), ref_forward(reference, x, t, cond))


def test_retrieval_diffusers_folder_and_save_pretrained_round_trip(tmp_path):
    den = tiny_unet(TEXT, AUDIO)
    x, t, cond = inputs()
    with torch.no_grad():
        want = den(x, t, cond)
    den.model.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    back = UNetLDM.from_pretrained(tmp_path / "unet")
    assert (back.text_dim, back.audio_dim) == (TEXT, AUDIO)
    den.save_pretrained(tmp_path / "mine")
    cfg = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert cfg["text_dim"] == TEXT and cfg["checkpoint"] is None
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), want)
        assert torch.equal(UNetLDM.from_pretrained(tmp_path / "mine")(x, t, cond), want)


def test_one_stream_diffusers_folder_needs_its_stream_named(tmp_path):
    den = tiny_unet(None, AUDIO)
    den.model.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    with pytest.raises(ReaudioError, match="one retrieval stream.*audio_dim="):
        UNetLDM.from_pretrained(tmp_path / "unet")
    back = UNetLDM.from_pretrained(tmp_path / "unet", audio_dim=AUDIO)
    assert (back.text_dim, back.audio_dim) == (None, AUDIO)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), den(x, t, cond))


# -- a retrieval UNet initialised from AudioLDM -------------------------------------------------------------
@pytest.mark.parametrize("text_dim,audio_dim", STREAMS[1:])
def test_retrieval_unet_from_audioldm_is_exactly_audioldm(tmp_path_factory, reference, original_sd, text_dim,
                                                          audio_dim):
    path = lightning_ckpt(tmp_path_factory.mktemp("ckpt") / "audioldm.ckpt", original_sd)
    den = UNetLDM.from_pretrained(path, text_dim=text_dim, audio_dim=audio_dim)
    assert type(den.model).__name__ == "AudioLDM2UNet2DConditionModel"
    x, t, cond = inputs(B=3)
    assert cond.captions.abs().sum() > 0 and cond.audio.abs().sum() > 0
    with torch.no_grad():
        got = den(x, t, cond)
        assert_same(got, ref_forward(reference, x, t, cond))
    n = 1 + (text_dim is not None) + (audio_dim is not None)
    new = [a for blocks in (den.model.down_blocks[1:], den.model.up_blocks[:3]) for b in blocks
           for i, a in enumerate(b.attentions) if i % n] + list(den.model.mid_block.attentions)[1:]
    assert new and all(not a.proj_out.weight.any() and not a.proj_out.bias.any() for a in new)
    assert all(a.transformer_blocks[0].attn2.to_k.weight.abs().sum() > 0 for a in new)
    with torch.no_grad():  # the new layers are live: once trained (here: perturbed) the output moves
        for a in new:
            a.proj_out.weight.normal_(0, 0.1)
        assert not torch.allclose(den(x, t, cond), got)


# -- frequency maps ----------------------------------------------------------------------------------------
def test_frequency_maps_tell_rows_apart_and_are_constant_in_time():
    maps = frequency_maps(4, 3, 16)
    assert maps.shape == (4, 3, 16) and torch.equal(maps[:, 0], maps[:, 2])
    rows = maps[:, 0].T  # [F, 4]: one code per frequency row
    assert torch.cdist(rows, rows).add(torch.eye(16) * 9).min() > 0.1  # every row's code is distinct
    assert torch.allclose(maps[0, 0], -maps[0, 0].flip(0), atol=1e-6)  # cos(pi (f + .5) / F): odd about the middle


def test_weights_without_frequency_maps_load_exactly_and_the_maps_then_matter(tmp_path):
    plain = tiny_unet(TEXT, AUDIO)
    plain.save_pretrained(tmp_path / "plain")
    den = UNetLDM.from_pretrained(tmp_path / "plain", freq_channels=3)
    assert den.freq_channels == 3 and den.model.conv_in.weight.shape[1] == 8 + 3
    assert not den.model.conv_in.weight[:, 8:].any()
    x, t, cond = inputs()
    with torch.no_grad():
        want = plain(x, t, cond)
        assert torch.equal(den(x, t, cond), want)  # zero weights for the maps: the same function
        den.model.conv_in.weight[:, 8:].normal_(0, 0.5)
        moved = den(x, t, cond)
    assert not torch.allclose(moved, want)
    # the maps depend on the row only: a model that reads them is no longer equivariant to shifting rows
    with torch.no_grad():
        shifted_in = den(x.roll(8, dims=3), t, cond).roll(-8, dims=3)
        plain_shift = plain(x.roll(8, dims=3), t, cond).roll(-8, dims=3)
    assert (shifted_in - moved)[..., 2:6].abs().max() > (plain_shift - want)[..., 2:6].abs().max()
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    del cfg["freq_channels"]  # a directory saved before the option existed (the shipped denoiser's)
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    assert UNetLDM.from_pretrained(tmp_path / "plain").freq_channels == 0
    den.save_pretrained(tmp_path / "freq")
    assert json.loads((tmp_path / "freq" / "config.json").read_text())["freq_channels"] == 3
    back = UNetLDM.from_pretrained(tmp_path / "freq")
    assert back.freq_channels == 3
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), moved)
    with pytest.raises(ReaudioError, match="freq_channels must be an integer >= 0"):
        tiny_unet(freq_channels=-1)


# -- errors --------------------------------------------------------------------------------------------------
def test_bad_inputs_and_params_are_clear_errors():
    den = tiny_unet(TEXT, None)
    x, t, cond = inputs()
    with pytest.raises(ReaudioError, match="multiples of the UNet's downsampling x8"):
        den(x[:, :, :12], t, cond)
    with pytest.raises(ReaudioError, match="latents must be"):
        den(x[:, :4], t, cond)
    with pytest.raises(ReaudioError, match="captions is None"):
        den(x, t, Conditioning(prompt=cond.prompt))
    with pytest.raises(ReaudioError, match="caption states must be"):
        den(x, t, Conditioning(prompt=cond.prompt, captions=cond.audio))
    with pytest.raises(ReaudioError, match="prompt embedding"):
        den(x, t, Conditioning(prompt=cond.prompt[:, :3], captions=cond.captions))
    with pytest.raises(ReaudioError, match="unknown size 'xl'"):
        tiny_unet(size="xl")
    with pytest.raises(ReaudioError, match="multiple of 32"):
        tiny_unet(block_out_channels=[32, 48])
    with pytest.raises(ReaudioError, match="head_width"):
        tiny_unet(head_width=24)
    with pytest.raises(ReaudioError, match="not found"):
        tiny_unet(checkpoint="/nonexistent/unet.ckpt")

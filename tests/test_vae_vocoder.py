"""VAE and vocoders: shapes, persistence, every published checkpoint layout, and contract tests.

Checkpoints are made here, with random weights, in exactly the published layouts: the AudioLDM
Lightning ``.ckpt`` (original key names), diffusers pipeline folders, and the jik876/hifi-gan
``{"generator": ...}`` file. The original names and shapes below are derived from the original
AudioLDM code structure (variational_autoencoder/modules.py: Encoder/Decoder/ResnetBlock/AttnBlock;
hifigan/models.py: Generator/ResBlock), and the forward passes they are compared with are
written here from that code, not taken from the converter under test.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from component_factories import BUILTIN, tiny
from reaudio_core import ReaudioError, get_registry
from reaudio_core import mel as M
from reaudio_core.testing import contract_tests
from reaudio_plugins.griffin_lim import GriffinLim
from reaudio_plugins.hifigan import HiFiGAN, convert_hifigan_state_dict, fold_weight_norm
from reaudio_plugins.vae import VAE, convert_ldm_vae_state_dict, measure_scale_factor

# a VAE small enough for tests but with the original's GroupNorm(32) (its Normalize hard-codes 32)
CH, CH_MULT, NRB, Z, EMBED = 32, (1, 1, 2), 1, 8, 8
VAE_PARAMS = dict(block_out_channels=[CH * m for m in CH_MULT], layers_per_block=NRB, latent_channels=Z,
                  norm_num_groups=32, scale_factor=None, checkpoint=None, device="cpu")
HG = dict(upsample_initial_channel=32, upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
          resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]])
HG_PARAMS = dict(HG, normalize_before=False, checkpoint=None, device="cpu")


# -- original AudioLDM VAE: names, shapes, forward ---------------------------------------------
def ldm_vae_shapes():
    shapes = {}

    def norm(p, c):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (c,), (c,)

    def conv(p, cout, cin, k):
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin), conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout), conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    levels, in_mult = len(CH_MULT), (1,) + CH_MULT
    conv("encoder.conv_in", CH, 1, 3)
    for i in range(levels):
        block_in, block_out = CH * in_mult[i], CH * CH_MULT[i]
        for j in range(NRB):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    for side in ("encoder", "decoder"):
        c = CH * CH_MULT[-1]
        resnet(f"{side}.mid.block_1", c, c), attn(f"{side}.mid.attn_1", c), resnet(f"{side}.mid.block_2", c, c)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", 2 * Z, block_in, 3)
    block_in = CH * CH_MULT[-1]
    conv("decoder.conv_in", block_in, Z, 3)
    for i in reversed(range(levels)):
        block_out = CH * CH_MULT[i]
        for j in range(NRB + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", 1, block_in, 3)
    conv("quant_conv", 2 * EMBED, 2 * Z, 1), conv("post_quant_conv", Z, EMBED, 1)
    return shapes


def random_weights(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        w = torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1)
        if ("norm" in k) and k.endswith(".weight") and len(s) == 1:
            w = 1 + w
        out[k] = w
    return out


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def _resnet(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1")
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2")
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{p}.nin_shortcut", padding=0)
    return x + h


def _attn(x, sd, p):
    h = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(h, sd, f"{p}.{n}", padding=0) for n in "qkv")
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    w = torch.softmax(w, dim=2)
    h = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(h, sd, f"{p}.proj_out", padding=0)


def _mid(h, sd, side):
    h = _resnet(h, sd, f"{side}.mid.block_1")
    return _resnet(_attn(h, sd, f"{side}.mid.attn_1"), sd, f"{side}.mid.block_2")


def ldm_encode_mean(mel, sd):
    h = _conv(mel.unsqueeze(1), sd, "encoder.conv_in")
    for i in range(len(CH_MULT)):
        for j in range(NRB):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}")
        if i != len(CH_MULT) - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _mid(h, sd, "encoder")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _conv(h, sd, "quant_conv", padding=0)[:, :EMBED]


def ldm_decode(z, sd):
    h = _conv(_conv(z, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = _mid(h, sd, "decoder")
    for i in reversed(range(len(CH_MULT))):
        for j in range(NRB + 1):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out").squeeze(1)


# -- original HiFi-GAN generator: names, shapes, forward ---------------------------------------
def hifigan_shapes(weight_norm: bool):
    shapes = {}

    def conv(p, w_shape, bias):
        if weight_norm:  # torch.nn.utils.weight_norm(dim=0): g keeps axis 0
            shapes[f"{p}.weight_g"] = (w_shape[0],) + (1,) * (len(w_shape) - 1)
            shapes[f"{p}.weight_v"] = w_shape
        else:
            shapes[f"{p}.weight"] = w_shape
        shapes[f"{p}.bias"] = (bias,)

    c0 = HG["upsample_initial_channel"]
    conv("conv_pre", (c0, 64, 7), c0)
    for i, k in enumerate(HG["upsample_kernel_sizes"]):
        cin, cout = c0 // 2 ** i, c0 // 2 ** (i + 1)
        conv(f"ups.{i}", (cin, cout, k), cout)  # ConvTranspose1d weight: [in, out, k]
    nk = len(HG["resblock_kernel_sizes"])
    for i in range(len(HG["upsample_rates"])):
        ch = c0 // 2 ** (i + 1)
        for j, k in enumerate(HG["resblock_kernel_sizes"]):
            for m in range(3):
                conv(f"resblocks.{i * nk + j}.convs1.{m}", (ch, ch, k), ch)
                conv(f"resblocks.{i * nk + j}.convs2.{m}", (ch, ch, k), ch)
    conv("conv_post", (1, ch, 7), 1)
    return shapes


def hifigan_forward(mel, sd):
    def W(p):
        if f"{p}.weight" in sd:
            return sd[f"{p}.weight"]
        return torch._weight_norm(sd[f"{p}.weight_v"], sd[f"{p}.weight_g"], 0)

    nk = len(HG["resblock_kernel_sizes"])
    x = F.conv1d(mel.transpose(1, 2), W("conv_pre"), sd["conv_pre.bias"], padding=3)
    for i, (u, k) in enumerate(zip(HG["upsample_rates"], HG["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), W(f"ups.{i}"), sd[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        xs = 0
        for j, (kr, dil) in enumerate(zip(HG["resblock_kernel_sizes"], HG["resblock_dilation_sizes"])):
            p, y = f"resblocks.{i * nk + j}", x
            for m, d in enumerate(dil):
                t = F.conv1d(F.leaky_relu(y, 0.1), W(f"{p}.convs1.{m}"), sd[f"{p}.convs1.{m}.bias"], dilation=d,
                             padding=(kr * d - d) // 2)
                t = F.conv1d(F.leaky_relu(t, 0.1), W(f"{p}.convs2.{m}"), sd[f"{p}.convs2.{m}.bias"],
                             padding=(kr - 1) // 2)
                y = t + y
            xs = xs + y
        x = xs / nk
    x = F.conv1d(F.leaky_relu(x), W("conv_post"), sd["conv_post.bias"], padding=3)
    return torch.tanh(x).squeeze(1)


class NotATensor:  # a pickled object a weights-only load must refuse
    pass


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audioldm_ckpt(tmp_path_factory):
    """An AudioLDM Lightning checkpoint: {'state_dict': {...}} with UNet/CLAP/VAE/vocoder/scale_factor."""
    vae = random_weights(ldm_vae_shapes(), seed=1)
    voc = random_weights(hifigan_shapes(weight_norm=False), seed=2)  # AudioLDM removes weight norm
    sd = {f"first_stage_model.{k}": v for k, v in vae.items()}
    sd.update({f"first_stage_model.vocoder.{k}": v for k, v in voc.items()})
    sd["scale_factor"] = torch.tensor(0.9227)
    sd["model.diffusion_model.time_embed.0.weight"] = torch.randn(4, 4)
    sd["model_ema.diffusion_modeltime_embed0weight"] = torch.randn(4, 4)
    sd["cond_stage_model.model.text_branch.embeddings.word_embeddings.weight"] = torch.randn(3, 4)
    path = tmp_path_factory.mktemp("ckpt") / "audioldm-s-full.ckpt"
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 1}, path)
    return path, vae, voc


@pytest.fixture(scope="module")
def diffusers_root(tmp_path_factory):
    """A diffusers AudioLDM pipeline folder: model_index.json + vae/ + vocoder/ (reference classes' own save)."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig
    root = tmp_path_factory.mktemp("audioldm-diffusers")
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                        latent_channels=8, norm_num_groups=4, scaling_factor=0.95)
    vae.save_pretrained(root / "vae")
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=64, sampling_rate=16000, normalize_before=False,
                                                **{k: v for k, v in HG.items()}))
    with torch.no_grad():
        for p in voc.parameters():
            p.normal_(0, 0.1)
    voc.save_pretrained(root / "vocoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "AudioLDMPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "vocoder": ["transformers", "SpeechT5HifiGan"], "unet": ["diffusers", "UNet2DConditionModel"]}))
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes OpenMP's two threads
    spin against each other (100x slower); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(actual, expected, rel=1e-5):
    """Equal up to float32 reordering: differences below ``rel`` times the output's scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def mel_batch(b=2, t=16, seed=0):
    return torch.randn(b, t, 64, generator=torch.Generator().manual_seed(seed)) - 4


# -- VAE ---------------------------------------------------------------------------------------
def test_vae_round_trip_shapes_and_reference_size_latents():
    vae = tiny("decoder", "vae")
    assert vae.compression == 4 and vae.latent_channels == 8 and vae.scale_factor == 1.0
    mel = mel_batch(2, 32)
    z = vae.encode(mel)
    assert z.shape == (2, 8, 8, 16) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 32, 64)
    assert torch.equal(vae.encode(mel), z)  # posterior mean: deterministic
    s1 = vae.encode(mel, sample=True, generator=torch.Generator().manual_seed(0))
    s2 = vae.encode(mel, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    with pytest.raises(ReaudioError, match="multiple of the compression 4"):
        vae.encode(mel_batch(1, 30))
    with pytest.raises(ReaudioError, match=r"\[B, T, 64\]"):
        vae.encode(torch.zeros(1, 32, 80))
    with pytest.raises(ReaudioError, match=r"latents must be \[B, 8, t, 16\]"):
        vae.decode(torch.zeros(1, 4, 8, 16))


def test_reference_vae_config_is_audioldm():
    spec = get_registry().spec("decoder", "vae")
    assert spec.defaults["block_out_channels"] == [128, 256, 512] and spec.defaults["latent_channels"] == 8
    vae = VAE(**{**spec.defaults})
    cfg = vae.model.config
    assert (cfg.in_channels, cfg.out_channels, cfg.layers_per_block, cfg.norm_num_groups) == (1, 1, 2, 32)
    with torch.no_grad():
        assert vae.encode(mel_batch(1, 16)).shape == (1, 8, 4, 16)


def test_scale_factor_is_measured_saved_and_loaded(tmp_path):
    vae = tiny("decoder", "vae")
    mels = mel_batch(3, 16, seed=4)
    sf = measure_scale_factor(vae, mels, sample=False)
    with torch.no_grad():
        z = vae.posterior(mels).mode()
    assert sf == pytest.approx(float(1 / z.flatten().std()), rel=1e-6)
    assert measure_scale_factor(vae, [mels[:2], mels[2:]], sample=False, batch_size=1) == pytest.approx(sf, rel=1e-5)
    vae.scale_factor = sf
    with torch.no_grad():
        scaled = vae.encode(mels)
        assert float(scaled.std()) == pytest.approx(1.0, rel=1e-5)
        torch.testing.assert_close(scaled, z * sf)
        vae.save_pretrained(tmp_path / "decoder")
        cfg = json.loads((tmp_path / "decoder" / "config.json").read_text())
        assert cfg["scale_factor"] == pytest.approx(sf) and cfg["checkpoint"] is None
        assert (tmp_path / "decoder" / "model.safetensors").exists()
        back = VAE.from_pretrained(tmp_path / "decoder")
        assert back.scale_factor == pytest.approx(sf) and back.arch == vae.arch
        assert torch.equal(back.encode(mels), scaled)
        assert torch.equal(back.decode(scaled), vae.decode(scaled))
        assert VAE.from_pretrained(tmp_path / "decoder", scale_factor=2.0).scale_factor == 2.0
        # and out again as a diffusers AutoencoderKL folder
        from diffusers import AutoencoderKL
        vae.save_diffusers(tmp_path / "as_diffusers")
        ref = AutoencoderKL.from_pretrained(tmp_path / "as_diffusers")
        assert ref.config.scaling_factor == pytest.approx(sf)
        assert torch.equal(ref.decode(scaled / sf).sample.squeeze(1), vae.decode(scaled))


def test_audioldm_ckpt_vae_loads_and_matches_the_original_forward(audioldm_ckpt):
    path, original, _ = audioldm_ckpt
    converted = convert_ldm_vae_state_dict(original)
    vae = VAE(**VAE_PARAMS)
    assert set(converted) == set(vae.model.state_dict())  # no missing, no unexpected
    loaded = VAE(**{**VAE_PARAMS, "checkpoint": str(path)})
    assert loaded.scale_factor == pytest.approx(0.9227)
    mel = mel_batch(2, 16, seed=5)
    with torch.no_grad():
        close(loaded.encode(mel) / loaded.scale_factor, ldm_encode_mean(mel, original))
        z = torch.randn(2, Z, 4, 16, generator=torch.Generator().manual_seed(6))
        close(loaded.decode(z * loaded.scale_factor), ldm_decode(z, original))
    assert VAE(**{**VAE_PARAMS, "checkpoint": str(path), "scale_factor": 0.5}).scale_factor == 0.5
    # a bare original VAE state dict (no Lightning wrapper, no prefix) loads too
    bare = path.parent / "vae_only.pt"
    torch.save(original, bare)
    assert torch.equal(VAE(**{**VAE_PARAMS, "checkpoint": str(bare)}).model.decoder.conv_in.weight,
                       original["decoder.conv_in.weight"])


def test_diffusers_folder_vae_loads_from_root_and_subfolder(diffusers_root):
    from diffusers import AutoencoderKL
    ref = AutoencoderKL.from_pretrained(diffusers_root / "vae")
    mel = mel_batch(1, 16, seed=7)
    for source in (diffusers_root, diffusers_root / "vae"):
        # registry defaults are the reference sizes: the folder's config defines the architecture
        vae = VAE.from_pretrained(source)
        assert vae.scale_factor == pytest.approx(0.95) and vae.arch["block_out_channels"] == [8, 16, 16]
        with torch.no_grad():
            assert torch.equal(vae.encode(mel), ref.encode(mel.unsqueeze(1)).latent_dist.mode() * 0.95)
            z = vae.encode(mel)
            assert torch.equal(vae.decode(z), ref.decode(z / 0.95).sample.squeeze(1))


def test_vae_weight_errors_are_actionable(tmp_path, audioldm_ckpt):
    path, _, _ = audioldm_ckpt
    with pytest.raises(ReaudioError, match="does not fit.*block_out_channels"):
        VAE(**{**VAE_PARAMS, "block_out_channels": [32, 64, 64], "checkpoint": str(path)})
    with pytest.raises(ReaudioError, match="not found"):
        VAE(**{**VAE_PARAMS, "checkpoint": str(tmp_path / "nope.ckpt")})
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": NotATensor()}, evil)
    with pytest.raises(ReaudioError, match="refused to load.*never executes code"):
        VAE(**{**VAE_PARAMS, "checkpoint": str(evil)})
    with pytest.raises(ReaudioError, match="multiple of norm_num_groups"):
        VAE(**{**VAE_PARAMS, "block_out_channels": [8, 16, 16]})


# -- HiFi-GAN ----------------------------------------------------------------------------------
def test_hifigan_shapes_and_reference_config():
    voc = tiny("vocoder", "hifigan")
    wav = voc(mel_batch(2, 7))
    assert wav.shape == (2, 7 * 160) and wav.dtype == torch.float32 and wav.abs().max() <= 1
    assert torch.equal(voc(mel_batch(2, 7)), wav)
    spec = get_registry().spec("vocoder", "hifigan")
    cfg = HiFiGAN(**spec.defaults).model.config
    assert (cfg.model_in_dim, cfg.sampling_rate, cfg.upsample_initial_channel) == (64, 16000, 1024)
    assert cfg.normalize_before is False
    assert list(cfg.upsample_rates) == [5, 4, 2, 2, 2] and list(cfg.upsample_kernel_sizes) == [16, 16, 8, 4, 4]
    assert [list(d) for d in cfg.resblock_dilation_sizes] == [[1, 3, 5]] * 3
    with pytest.raises(ReaudioError, match="must multiply to the mel hop of 160"):
        HiFiGAN(**{**HG_PARAMS, "upsample_rates": [4, 4, 2, 2, 2]})


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_fold_weight_norm_equals_torch_weight_norm():
    for conv in (torch.nn.Conv1d(6, 4, 3), torch.nn.ConvTranspose1d(6, 4, 5, 2)):
        wn = torch.nn.utils.weight_norm(conv)
        with torch.no_grad():
            wn.weight_g.mul_(torch.rand_like(wn.weight_g) + 0.5)
        folded = fold_weight_norm(wn.weight_g, wn.weight_v)
        torch.testing.assert_close(folded, torch._weight_norm(wn.weight_v, wn.weight_g, 0))
        param = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(6, 4, 3))
        sd = {f"conv_pre.{k}": v for k, v in param.state_dict().items()}
        out = convert_hifigan_state_dict(sd)
        torch.testing.assert_close(out["conv_pre.weight"], param.weight.detach())


def test_audioldm_ckpt_vocoder_loads_and_matches_the_original_forward(audioldm_ckpt):
    path, _, original = audioldm_ckpt
    voc = HiFiGAN(**{**HG_PARAMS, "checkpoint": str(path)})
    assert set(convert_hifigan_state_dict(original)) == set(voc.model.state_dict())
    mel = mel_batch(2, 6, seed=8)
    with torch.no_grad():
        ref = hifigan_forward(mel, original)
        assert ref.shape[1] >= 6 * 160
        close(voc(mel), ref[:, :6 * 160])


def test_standalone_hifigan_generator_with_weight_norm(tmp_path):
    original = random_weights(hifigan_shapes(weight_norm=True), seed=9)
    path = tmp_path / "g_02500000"
    torch.save({"generator": original}, path)  # jik876/hifi-gan checkpoint layout
    voc = HiFiGAN(**{**HG_PARAMS, "checkpoint": str(path)})
    mel = mel_batch(1, 5, seed=10)
    with torch.no_grad():
        close(voc(mel), hifigan_forward(mel, original)[:, :5 * 160])
    # the training repo keeps weight norm inside the Lightning checkpoint: same conversion
    lightning = tmp_path / "aldm-t.ckpt"
    torch.save({"state_dict": {f"first_stage_model.vocoder.{k}": v for k, v in original.items()}}, lightning)
    with torch.no_grad():
        assert torch.equal(HiFiGAN(**{**HG_PARAMS, "checkpoint": str(lightning)})(mel), voc(mel))
    with pytest.raises(ReaudioError, match="does not fit.*upsample_initial_channel"):
        HiFiGAN(**{**HG_PARAMS, "upsample_initial_channel": 64, "checkpoint": str(path)})


def test_diffusers_folder_vocoder_loads_from_root_subfolder_and_bin(diffusers_root, tmp_path):
    from transformers import SpeechT5HifiGan
    ref = SpeechT5HifiGan.from_pretrained(diffusers_root / "vocoder")
    mel = mel_batch(2, 5, seed=11)
    with torch.no_grad():
        expected = ref(mel)[:, :5 * 160]
        for source in (diffusers_root, diffusers_root / "vocoder"):
            voc = HiFiGAN.from_pretrained(source)  # registry defaults; the folder's config wins
            assert voc.arch["upsample_initial_channel"] == 32
            assert torch.equal(voc(mel), expected)
        old = tmp_path / "vocoder"  # older folders ship pytorch_model.bin
        old.mkdir()
        (old / "config.json").write_text((diffusers_root / "vocoder" / "config.json").read_text())
        torch.save(ref.state_dict(), old / "pytorch_model.bin")
        assert torch.equal(HiFiGAN.from_pretrained(old)(mel), expected)


def test_hifigan_save_and_load(tmp_path):
    voc = tiny("vocoder", "hifigan")
    voc.save_pretrained(tmp_path / "vocoder")
    back = HiFiGAN.from_pretrained(tmp_path / "vocoder")
    mel = mel_batch(1, 4)
    with torch.no_grad():
        assert torch.equal(back(mel), voc(mel))


# -- Griffin-Lim -------------------------------------------------------------------------------
@pytest.mark.parametrize("mel_inverse", ["pinv", "lstsq"])
def test_griffin_lim_resynthesises_the_spectrum(mel_inverse):
    t = np.arange(16000) / 16000
    noise = np.random.default_rng(0).standard_normal(16000)
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t * (1 + t)) + 0.05 * noise)
    mel = M.log_mel(x.astype(np.float32))
    gl = GriffinLim(n_iter=16, momentum=0.99, seed=None, mel_inverse=mel_inverse)
    wav = gl(mel)
    assert wav.shape == (1, 16000) and torch.isfinite(wav).all()
    assert torch.equal(gl(mel), wav)  # zero initial phase: deterministic
    a, b = mel[0, 10:-10], M.log_mel(wav[0])[0, 10:-10]
    assert float((a - b).abs().mean()) < 0.3  # log-mel of the resynthesis within 0.3 nats on average
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.85


def test_griffin_lim_output_is_aligned_with_the_input():
    """Reference frames are centred on 160 t + 80: bursts come back where they were (not 80 samples off)."""
    rng = np.random.default_rng(1)
    x = np.zeros(16000, np.float32)
    for s in (3000, 7000, 11500):
        x[s:s + 400] = 0.5 * rng.standard_normal(400) * np.hanning(400)
    w = GriffinLim(n_iter=16, momentum=0.99, seed=None, mel_inverse="pinv")(M.log_mel(x))[0].numpy()

    def envelope(y):
        return np.convolve(y ** 2, np.ones(200) / 200, mode="same")

    a, b = envelope(x), envelope(w)
    lags = list(range(-200, 201))
    best = lags[int(np.argmax([np.dot(a[400:-400], np.roll(b, -lag)[400:-400]) for lag in lags]))]
    assert abs(best) <= 20


def test_griffin_lim_short_and_seeded():
    gl = GriffinLim(n_iter=2, momentum=0.5, seed=3, mel_inverse="pinv")
    mel = mel_batch(2, 1)
    out = gl(mel)
    assert out.shape == (2, 160) and torch.isfinite(out).all() and torch.equal(gl(mel), out)
    with pytest.raises(ReaudioError, match="momentum"):
        GriffinLim(n_iter=2, momentum=1.0, seed=None, mel_inverse="pinv")


# -- contract tests over every registered decoder / vocoder (rules: reaudio_core/testing/) ----------------
test_decoder_contract = contract_tests(BUILTIN, kinds=["decoder"], skip_others=True)
test_vocoder_contract = contract_tests(BUILTIN, kinds=["vocoder"], skip_others=True)

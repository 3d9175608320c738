"""LAION-CLAP ``.pt`` at the published size (``630k-audioset-best.pt``: HTSAT-tiny + RoBERTa-base, 512-d).

The round trip on real numbers is in tests/test_encoders.py: a tiny random ClapModel written out in the
LAION layout (``{"state_dict": {"module." + k: v}}``) loads through the ``clap`` text and audio encoders
with no missing or unexpected key and gives ClapModel's embeddings
(``test_laion_clap_pt_converts_into_clapmodel``; fusion and AudioLDM ``.ckpt`` variants beside it). It
needs one override (text heads: a 32-wide tiny RoBERTa is not hidden/64). This file checks the full-size
layout by shapes alone (meta tensors: no memory, no time): the architecture read off the shapes is the
published one with no override, and the converted keys fit ``ClapModel`` exactly.

The LAION layout is reconstructed from its key names (HTSAT's module tree as ``laion_htsat_keys`` in
tests/test_encoders.py writes it out, RoBERTa's transformers naming under ``text_branch.``, the
projection MLPs ``{text,audio}_projection.{0,2}``, ``{text,audio}_transform.sequential.*``,
``logit_scale_a/t``), not from the ``laion_clap`` package, which cannot be installed here (it pins numpy<2).
"""
import pytest
import torch

from reaudio_plugins._clap_ckpt import _DERIVED_BUFFERS, _strip_to_clap, build_config, infer_laion_config, laion_to_hf
from test_encoders import laion_htsat_keys

HTSAT_TINY = dict(patch_embeds_hidden_size=96, depths=[2, 2, 6, 2], num_attention_heads=[4, 8, 16, 32],
                  window_size=8, spec_size=256, num_mel_bins=64)


def laion_630k_state_dict() -> dict:
    """Meta tensors named and shaped as a LAION-CLAP HTSAT-tiny + RoBERTa-base checkpoint's ``state_dict``."""
    from transformers import RobertaConfig, RobertaModel
    meta = torch.device("meta")
    sd = {"audio_branch." + k: torch.empty(shape, device=meta) for k, shape in laion_htsat_keys(HTSAT_TINY).items()}
    with meta:  # roberta-base: LAION-CLAP's text branch is transformers' RobertaModel
        roberta = RobertaModel(RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                             layer_norm_eps=1e-5, pad_token_id=1))
    for k, v in roberta.state_dict().items():
        if not k.endswith("token_type_ids"):  # a non-persistent buffer in the transformers LAION-CLAP used
            sd["text_branch." + k] = torch.empty(v.shape, device=meta)
    sd["text_branch.embeddings.position_ids"] = torch.empty(1, 514, device=meta)
    for side, width in (("text", 768), ("audio", 768)):
        sd[f"{side}_projection.0.weight"] = torch.empty(512, width, device=meta)
        sd[f"{side}_projection.0.bias"] = torch.empty(512, device=meta)
        sd[f"{side}_projection.2.weight"] = torch.empty(512, 512, device=meta)
        sd[f"{side}_projection.2.bias"] = torch.empty(512, device=meta)
        for i in (0, 3, 6):  # MLPLayers([512] * 4): Linear, ReLU, Dropout per layer
            sd[f"{side}_transform.sequential.{i}.weight"] = torch.empty(512, 512, device=meta)
            sd[f"{side}_transform.sequential.{i}.bias"] = torch.empty(512, device=meta)
    sd["logit_scale_a"] = torch.empty((), device=meta)
    sd["logit_scale_t"] = torch.empty((), device=meta)
    return {"module." + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def published():
    sd = _strip_to_clap(laion_630k_state_dict(), "630k-audioset-best.pt")
    assert not any(k.startswith("module.") for k in sd)
    return sd


def test_published_architecture_is_read_off_the_shapes(published):
    from transformers import ClapConfig
    got = build_config(infer_laion_config(published))
    ref = ClapConfig()  # transformers' defaults are LAION-CLAP's HTSAT-tiny + RoBERTa-base
    assert got.projection_dim == 512
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "pad_token_id"):
        assert getattr(got.text_config, key) == getattr(ref.text_config, key), key
    assert got.text_config.num_attention_heads == 12 and got.text_config.layer_norm_eps == 1e-5  # roberta-base's
    for key in ("patch_embeds_hidden_size", "depths", "num_attention_heads", "window_size", "spec_size",
                "num_mel_bins", "hidden_size", "mlp_ratio", "qkv_bias", "enable_fusion", "patch_size",
                "enable_patch_layer_norm"):
        a, b = getattr(got.audio_config, key), getattr(ref.audio_config, key)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key
    assert list(got.audio_config.patch_stride) == [4, 4]


def test_published_keys_fit_clapmodel_exactly(published):
    from transformers import ClapModel
    converted, ignored, unknown = laion_to_hf(published)
    assert unknown == []
    assert {k.split(".")[0] for k in ignored} == {"audio_branch", "text_transform", "audio_transform"}
    assert all(k.startswith(("audio_branch.spectrogram_extractor", "audio_branch.logmel_extractor",
                             "audio_branch.tscam_conv", "audio_branch.head")) or k.endswith("attn_mask")
               for k in ignored if k.startswith("audio_branch."))
    with torch.device("meta"):
        model = ClapModel(build_config(infer_laion_config(published)))
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    assert all(_DERIVED_BUFFERS.search(k) for k in missing), missing  # computed from the config, filled on load
    assert sorted(set(converted) - set(own)) == []
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in converted.items() if v.shape != own[k].shape}
    assert bad == {}
    assert sum(v.numel() for k, v in converted.items() if not _DERIVED_BUFFERS.search(k)) > 150_000_000

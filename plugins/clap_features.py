"""``clap`` feature model: the CLAP towers of plugins/clap.py, for the CLAP score (reference section 6).

``embed_frames`` gives one frame per clip (the L2-normalised 512-d CLAP audio embedding), so a
CLAP FAD is also possible; ``embed_text`` gives the matching text embeddings. No classifier head.
Parameters are those of the ``clap`` encoders (same weights, one shared ClapModel).
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
import torch

from reaudio_core import hookimpl
from reaudio_core.interfaces import FeatureModel

from ._features import state_fingerprint

VERSION = "clap-features-v1"


class ClapFeatures(FeatureModel):
    name = "clap"
    sample_rate = 16000
    num_classes = 0

    def __init__(self, *, pretrained, processor, backend, random_init, size, config, seed, device, batch_size,
                 max_length):
        from reaudio_core.registry import create
        kw = dict(pretrained=pretrained, processor=processor, backend=backend, random_init=random_init, size=size,
                  config=config, seed=seed, device=device, batch_size=batch_size, max_length=max_length)
        self.audio = create("audio_encoder", "clap", **kw)
        self.text = create("text_encoder", "clap", **kw)
        self.dim = int(self.audio.dim)
        self.checkpoint = pretrained
        model = getattr(self.audio.bundle, "model", None)
        if isinstance(model, torch.nn.Module):
            self.fingerprint = state_fingerprint(model.state_dict(), VERSION)
        else:  # laion backend: identify the weights by their file stamp
            from ._encoders import stamp
            self.fingerprint = hashlib.sha256(json.dumps([VERSION, str(pretrained), stamp(pretrained), seed],
                                                         default=str).encode()).hexdigest()

    def embed_frames(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(wavs):
            return []
        emb = self.audio.embed(list(wavs)).float().cpu().numpy()
        return [e[None] for e in emb]

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, dim]`` L2-normalised CLAP text embeddings (same space as :meth:`embed_frames`)."""
        return self.text.embed(list(texts)).float().cpu()


@hookimpl
def register_components(register):
    register("feature_model", "clap", ClapFeatures, tiny={"pretrained": None, "random_init": True, "size": "tiny"})

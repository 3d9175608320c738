"""reaudio: retrieval-augmented text-to-audio generation (Re-AudioLDM) as a plugin toolkit."""
from .hookspecs import hookimpl
from .interfaces import (AudioEncoder, Conditioning, Decoder, Denoiser, Retriever,
                         SAMPLE_RATE, TextEncoder, Vocoder)
from .pretrained import Pretrained
from .registry import ReaudioError, create, get_registry

__version__ = "0.1.0"
__all__ = ["hookimpl", "Retriever", "TextEncoder", "AudioEncoder", "Denoiser", "Decoder", "Vocoder",
           "Conditioning", "SAMPLE_RATE", "Pretrained", "ReaudioError", "create", "get_registry"]

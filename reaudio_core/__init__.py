"""reaudio: retrieval-augmented text-to-audio generation (Re-AudioLDM) as a plugin toolkit."""
import os

# OpenMP threads sleep instead of spinning while they wait (unless the user chose a policy): on a machine busy
# with other work, spinning threads made a 2-thread generation 3-4x slower than 1 thread, and passive ones are
# as fast when idle (benchmarks/results/threads.md). Read once, when torch starts its OpenMP runtime: set here,
# before the first torch import of the CLI; a program that imported torch before reaudio keeps its policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .hookspecs import hookimpl  # noqa: E402
from .interfaces import (AudioEncoder, Conditioning, Decoder, Denoiser, Retriever,  # noqa: E402
                         SAMPLE_RATE, TextEncoder, Vocoder)
from .pretrained import Pretrained  # noqa: E402
from .registry import ReaudioError, create, get_registry  # noqa: E402

__version__ = "0.1.0"
__all__ = ["hookimpl", "Retriever", "TextEncoder", "AudioEncoder", "Denoiser", "Decoder", "Vocoder",
           "Conditioning", "SAMPLE_RATE", "Pretrained", "ReaudioError", "create", "get_registry"]

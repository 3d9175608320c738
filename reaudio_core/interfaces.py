"""The seven component contracts of reaudio: retriever, text encoder, audio encoder, denoiser,
decoder, vocoder, feature model.

Every component is a plain Python class registered under a *kind* and a *name*
(see :mod:`reaudio_core.registry`). Constructors take keyword arguments only; the
defaults of built-in components live in ``registry.yaml`` (one source of truth).
:mod:`reaudio_core.testing` checks every rule stated here (``reaudio check-plugin DIST``).

Conventions shared by all contracts
-----------------------------------
* Tensors are ``torch.float32`` on the component's device unless stated otherwise;
  masks are ``torch.bool`` with ``True`` = a real (attended) position.
* Audio is mono ``float32`` in [-1, 1] at :data:`SAMPLE_RATE` (16 kHz) unless the
  component states otherwise; resampling happens in :mod:`reaudio_core.audio`.
* Mel spectrograms are natural-log magnitudes, layout ``[B, T, 64]`` (frames x bins),
  10 ms hop, as produced by :func:`reaudio_core.mel.log_mel` (reference section 1).
* "Deterministic" means: same inputs, same weights, same torch version, CPU -> bit-identical output.
  Encoders, denoisers, decoders, vocoders and feature models are deterministic, and a batch
  row never depends on the other rows of the batch.
* Components with weights subclass :class:`reaudio_core.Pretrained` (:mod:`reaudio_core.pretrained`)
  beside their contract (``class VAE(Pretrained, Decoder)``), which gives them ``save_pretrained(dir)``
  and the classmethod ``from_pretrained(dir, **overrides)`` from one place: ``config.json``
  (constructor keywords, :meth:`~reaudio_core.Pretrained._config`) plus ``model.safetensors``
  (:meth:`~reaudio_core.Pretrained._state_dict`); overrides replace saved keywords at load time. A
  component whose folder holds more (a tokenizer, sub-folders) overrides only the hook that differs.
  The pipeline saves and loads exactly the components that are ``Pretrained``. Loading never
  executes code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence

if TYPE_CHECKING:  # annotations only: the contracts import no torch, so `reaudio --help` / `plugins` stay light
    import numpy as np
    import torch

SAMPLE_RATE = 16_000

KINDS = ("retriever", "text_encoder", "audio_encoder", "denoiser", "decoder", "vocoder", "feature_model")


class Retriever(ABC):
    """Nearest-neighbour index over L2-normalised float32 vectors, inner-product metric.

    Ids are the insertion order: the i-th vector ever added has id i, across :meth:`add` calls
    and :meth:`save` / :meth:`load`. Approximate indexes trade recall for speed through their
    parameters; at their tiny (test) parameters they find >= 99 % of the exact top-10 of 1200 vectors.
    """

    kind: ClassVar[str] = "retriever"
    metric: ClassVar[str] = "ip"  # inner product == cosine on normalised vectors
    exact: bool = False  #: True when search is exhaustive (deterministic, ties broken by lower id)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension; fixed by the first :meth:`add` (or the constructor's ``dim``)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of vectors stored."""

    @abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append ``vectors`` ``[N, dim]`` float32 (C-contiguous, normalised by the caller).

        A dimension other than :attr:`dim` raises ``ValueError`` (so does :meth:`search`).
        """

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` for each of ``queries`` ``[Q, dim]``.

        Returns ``(scores [Q, k] float32, ids [Q, k] int64)``, best first; scores are the inner
        products. When fewer than ``k`` items exist the tail is padded with score ``-inf`` and id
        ``-1``. ``k < 1`` raises ``ValueError``. Exact retrievers are deterministic (ties broken by lower id).
        """

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the whole index into ``directory`` (created if needed)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path, **params) -> "Retriever":
        """Rebuild an index written by :meth:`save`. ``params`` may change search-time knobs;
        a build-time parameter (``dim``, index layout) that differs from the saved one raises ``ValueError``."""

    def nbytes(self) -> int:
        """Approximate memory held by the index, in bytes (for benchmarks)."""
        return len(self) * self.dim * 4


class TextEncoder(ABC):
    """Text -> a pooled sentence embedding and per-token states."""

    kind: ClassVar[str] = "text_encoder"

    dim: int  #: pooled embedding width
    token_dim: int  #: per-token state width

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, dim]`` float32, each row L2-normalised -- the empty text ``""`` too (the unconditional
        prompt of guidance). ``embed([])`` is ``[0, dim]``. A text that is not a ``str`` raises
        ``TypeError`` or ``ValueError`` (or ``ReaudioError``)."""

    @abstractmethod
    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B, L, token_dim] float32, mask [B, L] bool)``.

        Real tokens come first in each row (mask True), then padding (zero states, mask False).
        With ``max_tokens`` every row is padded/truncated to exactly that length, padding leaving
        the real states unchanged; otherwise ``L`` is the longest text in the batch.
        ``encode_tokens([], max_tokens=n)`` is ``([0, n, token_dim], [0, n])``.
        """


class AudioEncoder(ABC):
    """Waveforms -> a pooled clip embedding and a token sequence."""

    kind: ClassVar[str] = "audio_encoder"

    dim: int  #: pooled embedding width
    token_dim: int  #: per-token width
    num_tokens: int  #: tokens per clip returned by :meth:`encode_tokens`

    @abstractmethod
    def embed(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """``waveforms``: 1-D float32 arrays at 16 kHz, any length > 0 (a zero-length one raises
        ``ValueError`` or ``ReaudioError``). ``[B, dim]`` float32, L2-normalised (an all-zero waveform may give
        an all-zero row); ``embed([])`` is ``[0, dim]``."""

    @abstractmethod
    def encode_tokens(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, num_tokens, token_dim] float32, mask [B, num_tokens] bool)``: finite, at least
        one real token per clip, zeros where the mask is False."""


@dataclass
class Conditioning:
    """Everything a :class:`Denoiser` is conditioned on, for a batch of B.

    ``prompt``: ``[B, d_prompt]`` pooled prompt embedding (the "FiLM" class condition).
    ``captions`` / ``caption_mask``: ``[B, Lt, d_text]`` / ``[B, Lt]`` retrieved-caption states.
    ``audio`` / ``audio_mask``: ``[B, La, d_audio]`` / ``[B, La]`` retrieved-audio tokens.
    ``guidance``: ``[B]`` float32 classifier-free guidance scale, read only by a denoiser with
    :attr:`Denoiser.guidance_input` (a guidance-distilled student); ``None`` otherwise.
    Streams a model was not built with are ``None``.
    """

    prompt: torch.Tensor
    captions: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def _map(self, fn, other: "Conditioning | None" = None) -> "Conditioning":
        """``fn`` applied to every field that is not ``None`` (with ``other``'s same field as a second argument)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else fn(v) if other is None else fn(v, getattr(other, f.name))
        return Conditioning(**out)

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Batch-concatenate two conditionings (for batched classifier-free guidance)."""
        import torch
        return self._map(lambda a, b: torch.cat([a, b], 0), other)

    def rows(self, index: torch.Tensor) -> "Conditioning":
        """The batch rows ``index`` selects (a ``[B]`` bool mask or int64 row numbers)."""
        return self._map(lambda v: v[index])

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each batch row ``n`` times in place (rows ``[a, b]`` -> ``[a, a, b, b]`` for ``n = 2``)."""
        return self._map(lambda v: v.repeat_interleave(n, 0))


class Denoiser(ABC):
    """Noise predictor in the decoder's latent space: epsilon, or v when the model's config sets
    ``diffusion.prediction_type: v_prediction`` (the sampler reads that; the denoiser need not know)."""

    kind: ClassVar[str] = "denoiser"

    in_channels: int  #: latent channels
    downsample: int  #: total downsampling; latent length and width must be multiples of it
    prompt_dim: int  #: width of ``Conditioning.prompt``
    text_dim: int | None  #: width of ``Conditioning.captions``; None = no caption stream
    audio_dim: int | None  #: width of ``Conditioning.audio``; None = no audio stream
    #: True: a guidance-distilled student (``reaudio distill``): it reads ``cond.guidance`` ``[B]`` and returns the
    #: guided prediction in one call (no unconditional half); ``cond.guidance`` ``None`` raises ``ReaudioError``.
    #: False: ``cond.guidance`` is ignored and the sampler guides with a batched unconditional half.
    guidance_input: bool = False

    @abstractmethod
    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``latents [B, C, T, F]``, ``timesteps [B]`` int64 in [0, 1000) -> epsilon (or v) ``[B, C, T, F]``
        float32, finite, depending on the timesteps and ``cond.prompt`` (and ``cond.guidance`` when
        :attr:`guidance_input`). A batch doubled with :meth:`Conditioning.cat` (batched guidance) gives the
        same rows. ``T`` or ``F`` not a multiple of :attr:`downsample` raises ``ReaudioError``."""

    def route(self, timestep: int) -> "Denoiser":
        """The denoiser that computes this one's output at ``timestep`` on its own: ``self``, unless it dispatches
        on the timestep (``experts`` returns its expert). Tools that trace a denoiser (the ONNX export,
        :mod:`reaudio_core.lite`) trace each distinct route once. Contract: same output as ``self`` at ``timestep``."""
        return self


class Decoder(ABC):
    """Mel <-> latent autoencoder (the VAE). Latents returned by :meth:`encode` are already
    multiplied by ``scale_factor``; :meth:`decode` divides by it."""

    kind: ClassVar[str] = "decoder"

    latent_channels: int
    compression: int  #: downsampling factor in time and frequency (4 for the reference VAE)
    scale_factor: float

    @abstractmethod
    def encode(self, mel: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """``mel [B, T, 64]`` log-mel (``T`` a multiple of ``compression``) -> scaled latents
        ``[B, C, T/compression, 64/compression]`` float32 (``sample=False``: deterministic)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``mel [B, T, 64]`` log-mel."""


class Vocoder(ABC):
    """Log-mel -> waveform."""

    kind: ClassVar[str] = "vocoder"

    sample_rate: int  #: output rate in Hz: 16000
    hop_length: int  #: samples per mel frame: 160

    @abstractmethod
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel [B, T, 64]`` log-mel -> waveform ``[B, T * hop_length]`` float32, finite."""


class FeatureModel(ABC):
    """Audio -> evaluation features (reference section 6): FAD frames and classifier logits.

    ``wavs``: 1-D float32 arrays at :attr:`sample_rate`, any length > 0 (models pad clips
    shorter than one frame). Deterministic, weights frozen. A model without a classifier head
    has ``num_classes == 0`` and its :meth:`logits` raises ``NotImplementedError``.
    ``fingerprint`` identifies weights + preprocessing; feature caches are keyed on it.
    A model with a text tower (CLAP score) also has ``embed_text(texts) -> [B, d]`` in the frames' space.
    """

    kind: ClassVar[str] = "feature_model"

    name: str  #: registered name, reported beside every score
    sample_rate: int  #: Hz the inputs must be at (> 0)
    num_classes: int  #: width of :meth:`logits` (0 = no classifier head)
    fingerprint: str  #: hash of weights and preprocessing version (non-empty)

    @abstractmethod
    def embed_frames(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One float32 ``[n_frames >= 1, d]`` finite array per clip (the frames FAD pools), ``d`` the same
        for every clip; ``embed_frames([])`` is ``[]``."""

    def logits(self, wavs: Sequence[np.ndarray]) -> torch.Tensor:
        """``[B, num_classes]`` float32 pre-softmax class scores, one row per clip."""
        raise NotImplementedError(f"feature model '{self.name}' has no classifier head")


BASES: dict[str, type] = {
    "retriever": Retriever,
    "text_encoder": TextEncoder,
    "audio_encoder": AudioEncoder,
    "denoiser": Denoiser,
    "decoder": Decoder,
    "vocoder": Vocoder,
    "feature_model": FeatureModel,
}

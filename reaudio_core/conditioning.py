"""The denoiser's conditions, built one way for generation (:meth:`ReAudioPipeline.condition`) and LDM
training (:class:`reaudio_core.training.LdmStage`) alike (reference section 3):

* the **unconditional** inputs (:func:`empty_text`, :func:`unconditional`): the text encoder's embedding of
  ``""``, the caption encoder's states of ``""`` in each of the k caption slots, zero audio tokens in each
  of the k audio slots, every mask position True;
* the **neighbour** streams: caption states (:func:`caption_states`) and audio tokens
  (:func:`audio_tokens`) of database items, computed by the encoders or read from the database's feature
  cache (:func:`feature_key`, :func:`cached`), and k neighbours per row laid side by side, ``[B, k*L, d]``
  with masks ``[B, k*L]`` (:func:`gather`, :func:`flatten`); a missing neighbour (id -1) is an
  unconditional slot;
* their assembly into one :class:`Conditioning` (:func:`assemble`): a stream that is not retrieved gets
  its unconditional input.

Nothing here imports the pipeline or training: both import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .interfaces import Conditioning


def feature_key(cfg: dict, slot: str, weights: Path | Sequence[Path] | None = None) -> str:
    """Name under which a database caches neighbour features of the encoder in ``slot``: the
    component's name, a hash of its parameters, and of its weights file(s) when it has them."""
    import hashlib
    import json
    entry = cfg[slot]
    params = dict(entry.get("params") or {})
    if weights is not None:  # the weights' bytes identify them; where they were loaded from does not
        for key in ("weights", "checkpoint", "pretrained", "device", "batch_size"):
            params.pop(key, None)
    h = hashlib.sha1(json.dumps({"name": entry["name"], "params": params}, sort_keys=True, default=str).encode())
    if slot == "caption_encoder":
        h.update(str(cfg["generation"]["caption_tokens"]).encode())
    for f in ([weights] if isinstance(weights, (str, Path)) else weights or []):
        h.update(hashlib.sha1(Path(f).read_bytes()).digest())
    return f"{slot}-{entry['name']}-{h.hexdigest()[:12]}"


def cached(database, key: str) -> tuple | None:
    """``(states [N_db, L, d], mask [N_db, L])`` arrays (memory-mapped; row i = database item i) that
    ``database`` caches under ``key``, or None (no database, or no such cache)."""
    table = database.features(key) if database is not None else None
    return None if table is None else (table["states"], table["mask"])


# -- per item: the encoders' features ----------------------------------------------------------------------
def caption_states(encoder, captions: Sequence[str], caption_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [n, caption_tokens, token_dim], mask [n, caption_tokens])`` of ``captions``, in one batch."""
    return encoder.encode_tokens(list(captions), max_tokens=caption_tokens)


def audio_tokens(encoder, paths: Sequence, unreadable_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [n, num_tokens, token_dim], mask [n, num_tokens])`` of the clips at ``paths``: in one batch,
    or, with ``unreadable_empty``, one clip at a time, where a clip that cannot be read
    (:class:`reaudio_core.audio.AudioProblem`) gets an unconditional slot (zero tokens, mask True)."""
    from .audio import AudioProblem, load_audio
    if not unreadable_empty:
        return encoder.encode_tokens([load_audio(p) for p in paths])
    states, masks = [], []
    n, dim = encoder.num_tokens, encoder.token_dim
    for path in paths:
        try:
            s, m = encoder.encode_tokens([load_audio(path)])
        except AudioProblem:
            s, m = torch.zeros(1, n, dim), torch.ones(1, n, dtype=torch.bool)
        states.append(s)
        masks.append(m)
    return torch.cat(states), torch.cat(masks)


# -- unconditional inputs -----------------------------------------------------------------------------------
def empty_text(text_encoder, caption_encoder=None, caption_tokens: int | None = None):
    """``(empty prompt [d_prompt], empty caption states [caption_tokens, token_dim] or None)``: the text
    encoder's embedding of ``""`` and, given a caption encoder, its states of ``""`` (float32)."""
    prompt = text_encoder.embed([""]).float()[0]
    if caption_encoder is None:
        return prompt, None
    states, _ = caption_states(caption_encoder, [""], caption_tokens)
    return prompt, states[0].float()


def unconditional(empty_prompt: torch.Tensor, k: int, empty_caption: torch.Tensor | None = None,
                  audio: tuple[int, int] | None = None, batch: int = 1) -> Conditioning:
    """The unconditional inputs for ``batch`` rows and ``k`` neighbour slots.

    ``prompt [batch, d]`` = ``empty_prompt``; with ``empty_caption`` (``[L, d_text]``) ``captions
    [batch, k*L, d_text]`` = it in each slot; with ``audio = (num_tokens, audio_dim)`` ``audio [batch,
    k*num_tokens, audio_dim]`` = zeros; every mask all True. Streams not given stay None.
    """
    uncond = Conditioning(prompt=empty_prompt[None].expand(batch, -1))
    if empty_caption is not None:
        uncond.captions = empty_caption.repeat(k, 1)[None].expand(batch, -1, -1)
        uncond.caption_mask = torch.ones(batch, uncond.captions.shape[1], dtype=torch.bool)
    if audio is not None:
        n = k * audio[0]
        uncond.audio = torch.zeros(batch, n, audio[1])
        uncond.audio_mask = torch.ones(batch, n, dtype=torch.bool)
    return uncond


# -- neighbours ---------------------------------------------------------------------------------------------
def flatten(states: torch.Tensor, mask: torch.Tensor, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows*k, L, d]`` / ``[rows*k, L]`` per-neighbour features -> ``[rows, k*L, d]`` / ``[rows, k*L]``
    (each row's k neighbours side by side, in order)."""
    return states.reshape(rows, -1, states.shape[-1]), mask.reshape(rows, -1)


def gather(states, mask, ids, empty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour features from a per-item table: ``ids [B, k]`` (row numbers of ``states [N, L, d]`` /
    ``mask [N, L]``: tensors, or arrays such as :func:`cached` gives, read row by row) ->
    ``([B, k*L, d] float32, [B, k*L])``. A missing neighbour (id < 0) is an unconditional slot: the states
    ``empty`` (``[L, d]``; zeros when None) with an all-True mask."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    B, k = ids.shape
    safe = ids.clamp(min=0)
    if isinstance(states, torch.Tensor):
        s, m = states[safe], mask[safe]  # [B, k, L, d], [B, k, L]
    else:
        rows = safe.reshape(-1).tolist()
        s = torch.from_numpy(np.stack([states[i] for i in rows])).float()
        m = torch.from_numpy(np.stack([mask[i] for i in rows]))
        s, m = s.reshape(B, k, *s.shape[1:]), m.reshape(B, k, *m.shape[1:])
    missing = ids < 0
    if missing.any():
        s = torch.where(missing[..., None, None], torch.zeros_like(s) if empty is None else empty.expand_as(s), s)
        m = torch.where(missing[..., None], torch.ones_like(m), m)
    return s.reshape(B, -1, s.shape[-1]), m.reshape(B, -1)


def assemble(prompt: torch.Tensor, uncond: Conditioning, captions: tuple | None = None,
             audio: tuple | None = None) -> Conditioning:
    """The conditional inputs of ``len(prompt)`` rows: the prompt embeddings ``[B, d]``, and per stream of
    ``uncond`` the retrieved ``(states, mask)`` given here or, where none are given, ``uncond``'s own
    (expanded to B rows). A stream ``uncond`` lacks stays None."""
    B = len(prompt)
    cond = Conditioning(prompt=prompt)
    if uncond.captions is not None:
        cond.captions, cond.caption_mask = captions if captions is not None else (
            uncond.captions.expand(B, -1, -1), uncond.caption_mask.expand(B, -1))
    if uncond.audio is not None:
        cond.audio, cond.audio_mask = audio if audio is not None else (
            uncond.audio.expand(B, -1, -1), uncond.audio_mask.expand(B, -1))
    return cond

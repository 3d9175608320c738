"""The neighbour table: every item's top-K items, exact, the item itself excluded (:func:`exact_neighbours`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

MODALITIES = ("text->text", "text->audio", "audio->audio")


class Neighbours(NamedTuple):
    """The neighbour table: for item i, ``ids[i]`` (best first) and their ``scores[i]``."""
    ids: np.ndarray  #: [N, K] int64, -1 = padding
    scores: np.ndarray  #: [N, K] float32, -inf = padding
    modality: str  #: "text->text" | "text->audio" | "audio->audio"


def exact_neighbours(queries: np.ndarray, keys: np.ndarray, k: int,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``keys`` for every row of ``queries`` (row i is item i), item i itself
    excluded (by id, so an identical duplicate still counts as a neighbour). Ties: lower id first.
    Returns ``(ids [N, k] int64, scores [N, k] float32)`` padded with -1 / -inf."""
    n = len(queries)
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    kk = min(k, len(keys) - 1)
    if kk <= 0 or n == 0:
        return ids, scores
    kt = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))
    chunk = int(max(1, min(1024, (64 << 20) // max(len(keys), 1))))
    with torch.inference_mode():
        for s in tqdm(range(0, n, chunk), desc="neighbours", unit="chunk", disable=not progress, leave=False):
            q = torch.from_numpy(np.ascontiguousarray(queries[s:s + chunk], dtype=np.float32))
            sim = q @ kt.T
            rows = torch.arange(len(q))
            sim[rows, rows + s] = -torch.inf
            top, idx = torch.topk(sim, kk, dim=1)
            top, idx = top.numpy(), idx.numpy()
            order = np.lexsort((idx, -top), axis=1)
            ids[s:s + len(q), :kk] = np.take_along_axis(idx, order, 1)
            scores[s:s + len(q), :kk] = np.take_along_axis(top, order, 1)
    return ids, scores


def _modal(text: np.ndarray, audio: np.ndarray | None, which: str) -> np.ndarray:
    return text if which == "text" else audio

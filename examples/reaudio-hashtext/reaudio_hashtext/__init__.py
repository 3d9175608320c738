"""A weight-free text encoder registered through the ``reaudio.plugins`` entry point."""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import torch

from reaudio_core import TextEncoder, hookimpl

_WORD = re.compile(r"\w+", re.UNICODE)
_EMPTY = "<no words>"  # the token of a text without words (never a \w+ match)


def _bucket(token: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, 1.0 if (value >> 63) else -1.0


class HashingTextEncoder(TextEncoder):
    """Signed feature hashing of words and word bigrams.

    ``embed``: ``[B, dim]`` L2-normalised; a text without words (``""``, the unconditional prompt)
    hashes a reserved token, so its row is a unit vector too, as the contract requires.
    ``encode_tokens``: one ``dim``-wide one-hot-like state per word.
    """

    def __init__(self, *, dim: int = 256, bigrams: bool = True):
        self.dim = self.token_dim = int(dim)
        self.bigrams = bigrams

    def _words(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"hashing: texts must be str, got {type(text).__name__}")
        return _WORD.findall(text.lower())

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            words = self._words(text)
            grams = words + ([f"{a} {b}" for a, b in zip(words, words[1:])] if self.bigrams else [])
            for gram in grams or [_EMPTY]:
                idx, sign = _bucket(gram, self.dim)
                out[row, idx] += sign
        return torch.nn.functional.normalize(out, dim=-1)

    def encode_tokens(self, texts: Sequence[str], max_tokens: int | None = None):
        words = [self._words(t) for t in texts]
        length = max_tokens or max([len(w) for w in words] + [1])
        states = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for row, ws in enumerate(words):
            for col, word in enumerate(ws[:length]):
                idx, sign = _bucket(word, self.dim)
                states[row, col, idx] = sign
                mask[row, col] = True
        return states, mask


@hookimpl
def register_components(register):
    # A third party states its defaults here (it cannot edit reaudio's registry.yaml).
    # ``tiny``: the size the contract tests (reaudio check-plugin, tests/test_contract.py) build it at.
    register("text_encoder", "hashing", HashingTextEncoder, defaults={"dim": 256, "bigrams": True},
             tiny={"dim": 64})

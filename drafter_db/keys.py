"""Exact integer and byte keys for n-grams, shared by every database."""

from __future__ import annotations

import struct

TOKEN_BITS = 21  # vocabularies up to 2M tokens


def ngram_key(tokens: list[int]) -> int:
    """An exact int key: the length, then each token in TOKEN_BITS bits (n-grams of different
    lengths never collide)."""
    key = len(tokens)
    for token in tokens:
        key = (key << TOKEN_BITS) | token
    return key


def ngram_bytes(tokens: list[int]) -> bytes:
    """The byte key used in Redis and on disk: little-endian uint32 token ids."""
    return struct.pack(f"<{len(tokens)}I", *tokens)

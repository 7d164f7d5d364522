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


def suffix_keys(tokens: list[int], longest: int) -> list[int]:
    """`ngram_key` of the last n tokens for n = longest..1 (longest first), built incrementally: the
    drafter's one key computation per draft, shared by all three databases."""
    keys, packed = [], 0
    for n in range(1, longest + 1):
        packed |= tokens[-n] << (TOKEN_BITS * (n - 1))
        keys.append((n << (TOKEN_BITS * n)) | packed)
    keys.reverse()
    return keys


_PACKERS = [struct.Struct(f"<{n}I") for n in range(17)]


def ngram_bytes(tokens: list[int] | tuple[int, ...]) -> bytes:
    """The byte key used in Redis and on disk: little-endian uint32 token ids."""
    n = len(tokens)
    return (_PACKERS[n] if n < len(_PACKERS) else struct.Struct(f"<{n}I")).pack(*tokens)

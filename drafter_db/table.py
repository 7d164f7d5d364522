"""Ranked continuations per n-gram: the value layout of the model and statistics databases.

A key is an n-gram (1..max_key token ids); its value is a short list of
continuations (up to `length` tokens each) with counts, best first. The
binary layout is what Redis and the embedded store hold:

    value := entry*            entry := count:uint32  n:uint8  token:uint32 * n

Counts merge by addition, so rebuilding or feeding the same key twice is safe
and replicas can share one store.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

Continuations = list[tuple[int, tuple[int, ...]]]  # (count, tokens), best first
NO_ENTRY: tuple[int, Continuations] = (0, ())  # (total count, continuations) of a key no database holds

_HEADER = struct.Struct("<IB")


def encode(entries: Continuations) -> bytes:
    parts = []
    for count, tokens in entries:
        parts.append(_HEADER.pack(min(count, 0xFFFFFFFF), len(tokens)))
        parts.append(struct.pack(f"<{len(tokens)}I", *tokens))
    return b"".join(parts)


def decode(value: bytes) -> Continuations:
    out: Continuations = []
    offset = 0
    while offset < len(value):
        count, n = _HEADER.unpack_from(value, offset)
        offset += _HEADER.size
        out.append((count, struct.unpack_from(f"<{n}I", value, offset)))
        offset += 4 * n
    return out


def merge(a: Continuations, b: Iterable[tuple[int, tuple[int, ...]]], top: int) -> Continuations:
    """Add counts of equal continuations and keep the `top` best."""
    counts: dict[tuple[int, ...], int] = {}
    for count, tokens in a:
        counts[tokens] = counts.get(tokens, 0) + count
    for count, tokens in b:
        counts[tokens] = counts.get(tokens, 0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [(count, tokens) for tokens, count in ranked]


def count_ngrams(token_ids: list[int], max_key: int, length: int) -> dict[tuple[int, ...], dict[tuple[int, ...], int]]:
    """Every n-gram (n <= max_key) of a sequence with the counts of the `length`-token continuations
    that follow it (shorter at the very end)."""
    table: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    total = len(token_ids)
    for end in range(1, total):
        cont = tuple(token_ids[end : end + length])
        for n in range(1, min(max_key, end) + 1):
            key = tuple(token_ids[end - n : end])
            bucket = table.setdefault(key, {})
            bucket[cont] = bucket.get(cont, 0) + 1
    return table

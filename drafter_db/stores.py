"""Where n-gram tables live: an embedded in-process store (persisted to a file) or Redis.

Both speak the same small interface over byte keys and the binary values of
`drafter_db.table`, so the statistics DB, the model DB's mirror and
`hierspec db build` never care which one they use. Keys are namespaced by the
tokenizer's fingerprint: models with different vocabularies never mix.

A statistics table is written as a generation: `hierspec db build` writes the
new table's keys under a new generation, switches the namespace's generation
pointer to it (one SET), then deletes the old generation's keys. Readers fetch
the pointer with every batch of keys, so they see the old table or the new
one, never a mix of the two.

The Redis store sits next to the decoding hot path, so it never blocks it for
long: short socket timeouts, batched MGET, a bounded local cache (negative
results too), and a circuit breaker. When Redis fails the store answers
"no data" (counted as misses), drafting continues from the other databases,
and after `retry_seconds` it tries Redis again.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from drafter_db.files import read_table, write_table
from drafter_db.keys import ngram_bytes

STATISTICS_FILE = ("statistics", 1)  # kind and version of the embedded store's file (`drafter_db.files`)


def redact(url: str) -> str:
    """A URL fit for logs and printed summaries: the password of its user part and of a `password=` query
    parameter replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        user, colon, _ = credentials.partition(":")
        netloc = f"{user}:***@{host}" if colon else netloc
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def tokenizer_namespace(tokenizer) -> str:
    """A short fingerprint of a vocabulary: equal vocabularies share tables, others never do."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()
    return digest[:16]


def full_key(namespace: str, ngram: tuple[int, ...] | list[int]) -> bytes:
    return b"hs:" + namespace.encode() + b":" + ngram_bytes(ngram)


def generation_key(namespace: str) -> bytes:
    """The pointer naming the generation of `namespace`'s statistics table that readers use (absent: the
    table of a build that predates generations, under the namespace itself)."""
    return b"hs:" + namespace.encode() + b"@generation"


def generation_namespace(namespace: str, generation: bytes | None) -> str:
    """The key namespace of one generation's table (`full_key(generation_namespace(...), ngram)`)."""
    return namespace if generation is None else f"{namespace}@{generation.decode(errors='replace')}"


def generations_prefix(namespace: str) -> bytes:
    """What every generation's keys (and the pointer) start with."""
    return b"hs:" + namespace.encode() + b"@"


class TableStore(Protocol):
    def get_many(self, keys: list[bytes]) -> list[bytes | None]: ...

    def set_many(self, items: dict[bytes, bytes]) -> None: ...

    def delete_prefix(self, prefix: bytes, keep: tuple[bytes, ...] = ()) -> int: ...


@dataclass
class StoreStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0  # keys not found, plus keys not asked because the backend was unavailable
    errors: int = 0
    cache_hits: int = 0


class EmbeddedStore:
    """An in-process dict persisted to a file (`drafter_db.files`): the default statistics store, no server
    needed. An unreadable file raises `TableFileError` (one line)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.data: dict[bytes, bytes] = {}
        if self.path and self.path.exists():
            self.data = dict(read_table(self.path, *STATISTICS_FILE))

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        data = self.data
        return [data.get(k) for k in keys]

    def set_many(self, items: dict[bytes, bytes]) -> None:
        self.data.update(items)

    def delete_prefix(self, prefix: bytes, keep: tuple[bytes, ...] = ()) -> int:
        doomed = [key for key in self.data if key.startswith(prefix) and not key.startswith(keep)]
        for key in doomed:
            del self.data[key]
        return len(doomed)

    def save(self) -> None:
        if self.path is not None:
            write_table(self.path, *STATISTICS_FILE, self.data.items())


class RedisStore:
    """Redis with timeouts, batching and a circuit breaker; never raises on the read path."""

    def __init__(self, url: str, timeout: float = 0.05, retry_seconds: float = 1.0, batch: int = 1000):
        import redis

        self.url = redact(url)  # what logs and summaries may show
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.retry_seconds = retry_seconds
        self.batch = batch
        self.stats = StoreStats()
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        if not self.available:
            self.stats.misses += len(keys)
            return [None] * len(keys)
        try:
            values = self.client.mget(keys)
        except Exception:  # any Redis/network failure degrades to "no data"
            self.stats.errors += 1
            self.stats.misses += len(keys)
            self._down_until = time.monotonic() + self.retry_seconds
            return [None] * len(keys)
        return values

    def set_many(self, items: dict[bytes, bytes]) -> None:
        """Pipelined writes, `batch` keys per round trip; errors propagate (a build must know)."""
        pipe = self.client.pipeline(transaction=False)
        pending = 0
        for key, value in items.items():
            pipe.set(key, value)
            pending += 1
            if pending >= self.batch:
                pipe.execute()
                pending = 0
        if pending:
            pipe.execute()

    def delete_prefix(self, prefix: bytes, keep: tuple[bytes, ...] = ()) -> int:
        """Every table entry (a string key) starting with `prefix` but not with any of `keep`, found by SCAN
        (never KEYS, which blocks the server) and UNLINKed (freed in the background) `batch` at a time; errors
        propagate. Only strings: the model DB's shared outputs stream (`hs:<tokenizer>:outputs`) shares the
        pre-generation table's prefix."""
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
        deleted, doomed = 0, []
        for key in self.client.scan_iter(match=pattern, count=self.batch, _type="string"):
            if key.startswith(keep):
                continue
            doomed.append(key)
            if len(doomed) >= self.batch:
                deleted += self.client.unlink(*doomed)
                doomed = []
        if doomed:
            deleted += self.client.unlink(*doomed)
        return deleted

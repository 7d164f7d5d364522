"""Model DB: n-grams of what this model generated for earlier requests.

Middle temporal locality: a model repeats its own phrasings across requests
(boilerplate, formatting, common answers). Filled online from completed
requests, bounded in keys, frequency-aware eviction (the keys seen least
often go first), saved to and loaded from a file, and optionally mirrored
through Redis (`drafter_db.shared_outputs`) so that router replicas learn
from each other's requests.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

from drafter_db import table
from drafter_db.files import TableFileError, read_table, write_table
from drafter_db.keys import ngram_key
from drafter_db.shared_outputs import SharedOutputs
from drafter_db.table import Continuations

FILE = ("model-db", 3)  # kind and version of the saved file: `ngram_key` bytes -> total uint64 + table value
_TOTAL = struct.Struct("<Q")


class ModelDB:
    """Keyed by `ngram_key`. Invariant: `len(self._entries) <= max_keys`; an entry is (total, continuations):
    the sum of the counts ever merged into the key, and the continuations ranked best first, at most
    `top` of them (one dict probe per lookup on the drafting hot path)."""

    def __init__(self, max_key: int = 4, length: int = 6, top: int = 4, max_keys: int = 200_000,
                 mirror: SharedOutputs | None = None, vocab_size: int | None = None):
        self.mirror = mirror
        self.vocab_size = vocab_size  # outputs from the mirror with other token ids are dropped
        self.max_key = max_key
        self.length = length
        self.top = top
        self.max_keys = max_keys
        self._entries: dict[int, tuple[int, Continuations]] = {}
        self.changes = 0  # outputs counted so far (a saver writes only when this moved)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: int) -> tuple[int, Continuations]:
        """(total count, ranked continuations) of the n-gram with `ngram_key` `key`."""
        return self._entries.get(key, table.NO_ENTRY)

    def add_output(self, token_ids: list[int], share: bool = True) -> None:
        """Count the n-grams of one completed output (with its last prompt tokens as left context),
        and hand it to the mirror unless it came from there."""
        if share and self.mirror is not None:
            self.mirror.publish(token_ids)
        self.changes += 1
        counted = table.count_ngrams(token_ids, self.max_key, self.length)
        for ngram, conts in counted.items():
            key = ngram_key(ngram)
            total, ranked = self._entries.get(key, table.NO_ENTRY)
            self._entries[key] = (total + sum(conts.values()),
                                  table.merge(ranked, ((c, t) for t, c in conts.items()), self.top))
        if len(self._entries) > self.max_keys:
            self._evict()

    def sync(self) -> None:
        """Count what other replicas generated since the last sync (a no-op without a mirror)."""
        if self.mirror is not None:
            for output in self.mirror.pull():
                if self.vocab_size is None or all(0 <= t < self.vocab_size for t in output):
                    self.add_output(output, share=False)

    def _evict(self) -> None:
        """Drop the least frequent keys down to 90% of the bound (batched, so eviction is amortised)."""
        keep = int(self.max_keys * 0.9)
        ranked = sorted(self._entries.items(), key=lambda item: item[1][0], reverse=True)
        self._entries = dict(ranked[:keep])

    def save(self, path: str | Path) -> None:
        """Write the DB to `path` (`drafter_db.files`); safe from another thread while requests add outputs
        (the entries are copied first, in one step)."""
        entries = dict(self._entries)
        write_table(path, *FILE, ((key.to_bytes((key.bit_length() + 7) // 8, "little"), _TOTAL.pack(total) +
                                   table.encode(ranked)) for key, (total, ranked) in entries.items()))

    def load(self, path: str | Path) -> None:
        """Read a file `save` wrote; raises `TableFileError` (one line) for anything else, a record that does not
        decode or names a token id outside the vocabulary included (the checksum proves integrity, not origin)."""
        entries = {}
        try:
            for key, value in read_table(path, *FILE):
                ranked = table.decode(value[_TOTAL.size:])
                if self.vocab_size is not None and any(t >= self.vocab_size for _, tokens in ranked for t in tokens):
                    raise TableFileError(f"{path}: names token ids outside this vocabulary (another model's file?)")
                entries[int.from_bytes(key, "little")] = (_TOTAL.unpack_from(value)[0], ranked)
        except struct.error:
            raise TableFileError(f"{path}: a record does not decode") from None
        self._entries = entries
        if len(self._entries) > self.max_keys:
            self._evict()


class ModelDBSaver:
    """Keeps a model DB's file current: saved every `period_s` when outputs were added since, and once more
    on `close` (the server's shutdown), so what the model DB learned survives a restart."""

    def __init__(self, db: ModelDB, path: str | Path, period_s: float):
        self.db, self.path, self.period_s = db, Path(path), period_s
        self._saved = db.changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-db-saver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.save()

    def save(self) -> None:
        changes = self.db.changes
        if changes != self._saved:
            self.db.save(self.path)
            self._saved = changes

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.save()

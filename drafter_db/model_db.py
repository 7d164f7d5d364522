"""Model DB: n-grams of what this model generated for earlier requests.

Middle temporal locality: a model repeats its own phrasings across requests
(boilerplate, formatting, common answers). Filled online from completed
requests, bounded in keys, frequency-aware eviction (the keys seen least
often go first), saved to and loaded from a file, and optionally mirrored
through Redis (`drafter_db.shared_outputs`) so that router replicas learn
from each other's requests.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from drafter_db import table
from drafter_db.keys import ngram_key
from drafter_db.shared_outputs import SharedOutputs
from drafter_db.table import Continuations

FORMAT = 2  # of the saved file: int keys, (total, continuations) entries


class ModelDB:
    """Keyed by `ngram_key`. Invariant: `len(self._entries) <= max_keys`; an entry is (total, continuations):
    the sum of the counts ever merged into the key, and the continuations ranked best first, at most
    `top` of them (one dict probe per lookup on the drafting hot path)."""

    def __init__(self, max_key: int = 4, length: int = 6, top: int = 4, max_keys: int = 200_000,
                 mirror: SharedOutputs | None = None):
        self.mirror = mirror
        self.max_key = max_key
        self.length = length
        self.top = top
        self.max_keys = max_keys
        self._entries: dict[int, tuple[int, Continuations]] = {}

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
                self.add_output(output, share=False)

    def _evict(self) -> None:
        """Drop the least frequent keys down to 90% of the bound (batched, so eviction is amortised)."""
        keep = int(self.max_keys * 0.9)
        ranked = sorted(self._entries.items(), key=lambda item: item[1][0], reverse=True)
        self._entries = dict(ranked[:keep])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".partial")
        with open(partial, "wb") as f:
            pickle.dump({"version": FORMAT, "entries": self._entries}, f, protocol=pickle.HIGHEST_PROTOCOL)
        partial.replace(path)

    def load(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            data = pickle.load(f)
        if not isinstance(data, dict) or data.get("version") != FORMAT:
            raise ValueError(f"{path}: not a model DB of this hierspec version (delete it; it refills from outputs)")
        self._entries = data["entries"]
        if len(self._entries) > self.max_keys:
            self._evict()

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
from drafter_db.shared_outputs import SharedOutputs
from drafter_db.table import Continuations


class ModelDB:
    """Invariant: `len(self._entries) <= max_keys`; each entry's continuations are ranked best first,
    at most `top` of them; `_totals[key]` is the sum of the counts ever merged into the key."""

    def __init__(self, max_key: int = 4, length: int = 6, top: int = 4, max_keys: int = 200_000,
                 mirror: SharedOutputs | None = None):
        self.mirror = mirror
        self.max_key = max_key
        self.length = length
        self.top = top
        self.max_keys = max_keys
        self._entries: dict[tuple[int, ...], Continuations] = {}
        self._totals: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: tuple[int, ...]) -> Continuations:
        return self._entries.get(key, ())

    def total(self, key: tuple[int, ...]) -> int:
        return self._totals.get(key, 0)

    def add_output(self, token_ids: list[int], share: bool = True) -> None:
        """Count the n-grams of one completed output (with its last prompt tokens as left context),
        and hand it to the mirror unless it came from there."""
        if share and self.mirror is not None:
            self.mirror.publish(token_ids)
        counted = table.count_ngrams(token_ids, self.max_key, self.length)
        for key, conts in counted.items():
            self._entries[key] = table.merge(self._entries.get(key, []), ((c, t) for t, c in conts.items()), self.top)
            self._totals[key] = self._totals.get(key, 0) + sum(conts.values())
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
        ranked = sorted(self._totals.items(), key=lambda item: item[1], reverse=True)
        for key, _ in ranked[keep:]:
            del self._entries[key]
            del self._totals[key]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".partial")
        with open(partial, "wb") as f:
            pickle.dump({"entries": self._entries, "totals": self._totals}, f, protocol=pickle.HIGHEST_PROTOCOL)
        partial.replace(path)

    def load(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            data = pickle.load(f)
        self._entries, self._totals = data["entries"], data["totals"]
        if len(self._entries) > self.max_keys:
            self._evict()

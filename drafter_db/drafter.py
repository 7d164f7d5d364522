"""The hierarchical drafter: context DB, then model DB, then statistics DB, merged into one token tree.

Databases are visited in order of temporal locality and the longest key
first (a 4-token match predicts better than a 1-token one); the walk stops
as soon as the tree has enough candidates. A continuation from the model or
statistics DB is drafted only when it carries enough of its key's mass: on
text where nothing matches, the drafter proposes nothing and the step costs
what plain decoding costs. Draft depth follows recent acceptance (as
SuffixDecoding does): long when drafts land, short when they do not.

Everything here runs on the decoding hot path, so lookups are dict probes and
list slices; the statistics DB answers from a bounded local cache and falls
back to nothing, never to an error, when its store is away.
"""

from __future__ import annotations

import itertools
import struct
import time
from dataclasses import dataclass

from drafter_db import table
from drafter_db.context import ContextIndex
from drafter_db.keys import ngram_bytes, suffix_keys
from drafter_db.model_db import ModelDB
from drafter_db.stores import TableStore, full_key, generation_key, generation_namespace
from drafter_db.table import Continuations
from services.engine.tree import TokenTree

CONTEXT, MODEL, STATISTICS = "context", "model", "statistics"


@dataclass(frozen=True)
class DrafterConfig:
    """Defaults tuned by offline replay (drafter_db.replay) of SmolLM2's greedy outputs on the four
    benchmark categories, priced with this CPU's measured cost per forward."""

    max_key: int = 4  # longest n-gram key tried
    min_context_key: int = 1  # shortest key the context DB may match on
    max_depth: int = 12  # longest candidate
    max_candidates: int = 4  # candidates merged into a tree
    max_nodes: int = 12  # tree size budget (one verification forward)
    min_share: float = 0.5  # model/statistics DB: smallest share of its key's count a candidate needs
    min_count: int = 3  # ... and smallest count


class StatisticsDB:
    """Read side of the global corpus statistics: namespaced keys, and a bounded local cache of decoded
    values keyed by `ngram_key` (a warm lookup is one dict probe). Absent keys are cached too; the
    "no data" of an outage never is. Every fetch reads the namespace's generation pointer with its keys
    (`drafter_db.stores`): when a rebuild has switched it, the cache is dropped and the keys are fetched from
    the new table, so lookups never mix two builds. Entries expire after `ttl_seconds` so that a rebuild shows
    even where every lookup hits the cache."""

    def __init__(self, store: TableStore, namespace: str, cache_capacity: int = 200_000, ttl_seconds: float = 60.0,
                 vocab_size: int | None = None):
        self.store = store
        self.vocab_size = vocab_size  # values naming other token ids are malformed
        self.malformed = 0  # values that did not decode, or named token ids outside the vocabulary
        self.namespace = namespace
        self.cache_capacity = cache_capacity
        self.ttl_seconds = ttl_seconds
        self._generation_key = generation_key(namespace)
        self._generation: bytes | None = None
        self._prefix = full_key(namespace, ())
        self._cache: dict[int, tuple[float, int, Continuations]] = {}  # key -> (expiry, total, continuations)

    def lookup(self, context: list[int], keys: list[int]) -> list[tuple[int, Continuations]]:
        """(total count, ranked continuations) for each of `keys`, the `suffix_keys` of `context`
        (keys[i] is the last len(keys) - i tokens); the keys the cache lacks are fetched in one batch."""
        now = time.monotonic()
        cache = self._cache
        out: list[tuple[int, Continuations]] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            entry = cache.get(key)
            if entry is not None and entry[0] > now:
                out.append(entry[1:])
            else:
                out.append(table.NO_ENTRY)
                missing.append(i)
        if missing:
            self._fetch(context, keys, missing, out, now)
        return out

    def _fetch(self, context: list[int], keys: list[int], missing: list[int], out: list, now: float) -> None:
        longest = len(keys)
        ngrams = [ngram_bytes(context[-(longest - i):]) for i in missing]
        generation, *values = self.store.get_many([self._generation_key, *(self._prefix + g for g in ngrams)])
        cacheable = getattr(self.store, "available", True)
        if cacheable and generation != self._generation:  # a rebuild switched tables: read the new one only,
            self._generation = generation  # every key of this lookup included (some came from the cache)
            self._prefix = full_key(generation_namespace(self.namespace, generation), ())
            self._cache.clear()
            missing = list(range(longest))
            ngrams = [ngram_bytes(context[-(longest - i):]) for i in missing]
            again, *values = self.store.get_many([self._generation_key, *(self._prefix + g for g in ngrams)])
            # another switch in between: these values may be a table being deleted; use, never cache, them
            cacheable = again == generation and getattr(self.store, "available", True)
        cache = self._cache
        for i, value in zip(missing, values):
            conts = self._decode(value) if value is not None else ()
            out[i] = (sum(count for count, _ in conts), conts)
            if cacheable:
                cache[keys[i]] = (now + self.ttl_seconds, *out[i])
        if len(cache) > self.cache_capacity:  # drop the oldest tenth (insertion order): amortised
            for key in list(itertools.islice(cache, len(cache) - int(self.cache_capacity * 0.9))):
                del cache[key]

    def _decode(self, value: bytes) -> Continuations:
        """A store's value, or none where it is malformed: the store is shared and outlives this process, so
        what it holds is checked before it reaches a model (an out-of-vocabulary id is a device-side assert on
        a GPU)."""
        try:
            conts = table.decode(value)
        except (struct.error, TypeError):
            conts = None
        vocab = self.vocab_size
        if conts is None or (vocab is not None and any(t >= vocab for _, tokens in conts for t in tokens)):
            self.malformed += 1
            return ()
        return conts

    def clear_cache(self) -> None:
        """Forget every cached value (after a rebuild of the store, or to test the store itself)."""
        self._cache.clear()


class _RequestState:
    def __init__(self, config: DrafterConfig, prompt_ids: list[int]):
        self.context = ContextIndex(config.max_key)
        self.context.extend(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.depth = config.max_depth // 2  # adapted by observe()


class HierarchicalDrafter:
    """A `TreeProposer` over the three databases; any of the model and statistics DBs may be absent."""

    def __init__(self, config: DrafterConfig | None = None, model_db: ModelDB | None = None,
                 statistics: StatisticsDB | None = None):
        self.config = config or DrafterConfig()
        self.model_db = model_db
        self.statistics = statistics
        self._requests: dict[str, _RequestState] = {}

    # request lifecycle -------------------------------------------------------------------------
    def start(self, request_id: str, prompt_ids: list[int]) -> None:
        if self.model_db is not None:
            self.model_db.sync()  # other replicas' outputs, at most once per sync interval
        self._requests[request_id] = _RequestState(self.config, prompt_ids)

    def commit(self, request_id: str, token_ids: list[int]) -> None:
        self._requests[request_id].context.extend(token_ids)

    def finish(self, request_id: str, completed: bool) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and completed and self.model_db is not None:
            tokens = state.context.tokens
            start = max(0, state.prompt_len - self.config.max_key)
            self.model_db.add_output(tokens[start:])

    def observe(self, request_id: str, tree: TokenTree, accepted_path: list[int]) -> None:
        """Grow the depth when a whole candidate was accepted, shrink it when nothing was."""
        state = self._requests.get(request_id)
        if state is None:
            return
        c = self.config
        if not accepted_path:
            state.depth = max(1, state.depth - 1)
        elif len(accepted_path) >= state.depth - 1:
            state.depth = min(c.max_depth, state.depth + 2)

    # drafting ----------------------------------------------------------------------------------
    def propose(self, request_id: str, context: list[int], max_depth: int, max_nodes: int | None = None) -> TokenTree:
        """A token tree of at most `max_depth` levels and `max_nodes` nodes (default: the config's)."""
        c = self.config
        nodes = c.max_nodes if max_nodes is None else min(c.max_nodes, max_nodes)
        tree = TokenTree()
        state = self._requests.get(request_id)
        depth = min(max_depth, state.depth if state else c.max_depth)
        if depth <= 0:
            return tree
        keys = suffix_keys(context, min(c.max_key, len(context)))  # longest first
        found = 0
        if state is not None:
            for key in keys[: len(keys) - c.min_context_key + 1]:
                for cont in state.context.continuations(key, depth, c.max_candidates):
                    tree.add_path(cont, CONTEXT, nodes)
                    found += 1
                if found:
                    break
        if found >= c.max_candidates or len(tree) >= nodes:
            return tree
        if self.model_db is not None:
            for key in keys:
                total, conts = self.model_db.lookup(key)
                added = self._add_ranked(tree, conts, total, depth, nodes, MODEL, c.max_candidates - found)
                found += added
                if added:
                    break
            if found >= c.max_candidates or len(tree) >= nodes:
                return tree
        if self.statistics is not None:
            for total, conts in self.statistics.lookup(context, keys):
                added = self._add_ranked(tree, conts, total, depth, nodes, STATISTICS, c.max_candidates - found)
                if added:
                    break
        return tree

    def _add_ranked(self, tree: TokenTree, conts: Continuations, total: int, depth: int, nodes: int, source: str,
                    limit: int) -> int:
        c = self.config
        added = 0
        for count, tokens in conts:
            if added >= limit or count < c.min_count or count < c.min_share * total:
                break
            tree.add_path(tokens[:depth], source, nodes)
            added += 1
        return added

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

from dataclasses import dataclass

from drafter_db import table
from drafter_db.context import ContextIndex
from drafter_db.keys import ngram_bytes
from drafter_db.model_db import ModelDB
from drafter_db.stores import CachedLookup, TableStore, full_key
from drafter_db.table import Continuations
from services.tree import TokenTree

CONTEXT, MODEL, STATISTICS = "context", "model", "statistics"


@dataclass(frozen=True)
class DrafterConfig:
    """Defaults tuned by offline replay (drafter_db.replay) of SmolLM2's greedy outputs on the four
    benchmark categories, priced with this CPU's measured cost per forward."""

    max_key: int = 4  # longest n-gram key tried
    min_context_key: int = 1  # shortest key the context DB may match on
    min_db_key: int = 1  # shortest key the model/statistics DBs may match on
    max_depth: int = 12  # longest candidate
    max_candidates: int = 4  # candidates merged into a tree
    max_nodes: int = 12  # tree size budget (one verification forward)
    min_share: float = 0.5  # model/statistics DB: smallest share of its key's count a candidate needs
    min_count: int = 3  # ... and smallest count


class StatisticsDB:
    """Read side of the global corpus statistics: namespaced keys, cached already decoded."""

    def __init__(self, store: TableStore, namespace: str, cache_capacity: int = 200_000):
        self.namespace = namespace
        self._prefix = full_key(namespace, ())
        self.lookup_cache = CachedLookup(store, table.decode, capacity=cache_capacity)

    def lookup_many(self, keys: list[tuple[int, ...]]) -> list[Continuations]:
        prefix = self._prefix
        values = self.lookup_cache.get_many([prefix + ngram_bytes(key) for key in keys])
        return [value or () for value in values]


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
    def propose(self, request_id: str, context: list[int], max_depth: int) -> TokenTree:
        c = self.config
        tree = TokenTree()
        state = self._requests.get(request_id)
        depth = min(max_depth, state.depth if state else c.max_depth)
        if depth <= 0:
            return tree
        longest = min(c.max_key, len(context))
        found = 0
        if state is not None:
            for n in range(longest, c.min_context_key - 1, -1):
                for cont in state.context.continuations(context[-n:], depth, c.max_candidates - found):
                    tree.add_path(cont, CONTEXT, c.max_nodes)
                    found += 1
                if found:
                    break
        if found >= c.max_candidates or len(tree) >= c.max_nodes:
            return tree
        keys = [tuple(context[-n:]) for n in range(longest, c.min_db_key - 1, -1)]
        if self.model_db is not None:
            for key in keys:
                found += self._add_ranked(tree, self.model_db.lookup(key), self.model_db.total(key), depth, MODEL,
                                          c.max_candidates - found)
                if found:
                    break
            if found >= c.max_candidates or len(tree) >= c.max_nodes:
                return tree
        if self.statistics is not None:
            for conts in self.statistics.lookup_many(keys):
                added = self._add_ranked(tree, conts, sum(count for count, _ in conts), depth, STATISTICS,
                                         c.max_candidates - found)
                found += added
                if added:
                    break
        return tree

    def _add_ranked(self, tree: TokenTree, conts: Continuations, total: int, depth: int, source: str,
                    limit: int) -> int:
        c = self.config
        added = 0
        for count, tokens in conts:
            if added >= limit or count < c.min_count or count < c.min_share * total:
                break
            tree.add_path(list(tokens[:depth]), source, c.max_nodes)
            added += 1
        return added

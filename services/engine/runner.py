"""A level of the hierarchy: one model's weights plus the KV caches of the requests it serves.

The only call is "score these tokens": every call carries the request id and
the full token sequence. The runner reuses the longest cached prefix and runs
the model over the rest, so rejected drafts are rolled back implicitly and a
replica that never saw (part of) a request simply recomputes it: correctness
never depends on which replica or cache a request lands on. After a tree
forward, the next call's tokens say which tree path was verified; its cached
keys and values are kept, the other nodes' dropped, with no extra message.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.engine.kernels import MAX_ROWS
from services.engine.model import Decoder, KVCache
from services.engine.model_store import load_pretrained
from services.engine.tree import TokenTree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _RequestCache:
    """Invariant: `cache.length == len(token_ids)` and slot i holds token_ids[i]. After a tree
    forward, slot len(token_ids) + i holds node i of `tree` until the next call."""

    token_ids: list[int]
    cache: KVCache
    tree: TokenTree | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class LevelRunner:
    def __init__(self, decoder: Decoder, tokenizer, name: str, max_cached_requests: int = 64):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.name = name
        self.max_cached_requests = max_cached_requests
        self._requests: OrderedDict[str, _RequestCache] = OrderedDict()

    @classmethod
    def load(cls, reference: str, dtype: str = "float32", device: str = "cpu") -> LevelRunner:
        hf_model, tokenizer, name = load_pretrained(reference)
        decoder = Decoder.from_hf(hf_model, DTYPES[dtype], torch.device(device))
        del hf_model
        return cls(decoder, tokenizer, name)

    @property
    def vocab_size(self) -> int:
        return self.decoder.shape.vocab_size

    @property
    def context_window(self) -> int:
        return self.decoder.shape.max_positions

    def _state(self, request_id: str) -> _RequestCache:
        state = self._requests.pop(request_id, None)
        if state is None:
            state = _RequestCache([], self.decoder.new_cache())
        self._requests[request_id] = state  # most recently used last
        if len(self._requests) > self.max_cached_requests:
            self._requests.popitem(last=False)
        return state

    def _run(self, state: _RequestCache, new: list[int], num_logits: int, parents=None) -> torch.Tensor:
        return self.decoder(torch.tensor(new), state.cache, num_logits, parents)

    @staticmethod
    def _settle_tree(state: _RequestCache, token_ids: list[int]) -> None:
        """Keep the pending tree's nodes along the path that `token_ids` continues with."""
        tree, state.tree = state.tree, None
        total = len(state.token_ids)
        if tree is None or len(token_ids) <= total or token_ids[:total] != state.token_ids:
            return
        nodes, node = [], -1
        for token in token_ids[total:]:
            node = tree.children(node).get(token)
            if node is None:
                break
            nodes.append(node)
        if not nodes:
            return
        cache = state.cache
        slots = total + torch.tensor(nodes)
        with torch.inference_mode():  # the buffer may have been (re)allocated inside a forward
            cache.buffer[:, :, :, total : total + len(nodes)] = cache.buffer[:, :, :, slots]
        cache.length = total + len(nodes)
        state.token_ids.extend(token_ids[total : total + len(nodes)])

    def logits(self, request_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Float32 logits [num_logits, vocab] predicting the tokens after each of the last
        `num_logits` positions of `token_ids`."""
        state = self._state(request_id)
        self._settle_tree(state, token_ids)
        keep = min(_common_prefix(state.token_ids, token_ids), len(token_ids) - num_logits)
        state.cache.length = keep
        out = self._run(state, token_ids[keep:], num_logits)
        state.token_ids = list(token_ids)
        return out

    def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree) -> torch.Tensor:
        """Logits [1 + len(tree), vocab]: row 0 after the last token of `token_ids`, row 1 + i after
        tree node i (which sees the sequence and its own ancestors), all in one forward.

        Afterwards the cache holds `token_ids`; the nodes' keys and values wait in the slots behind
        it until the next call keeps the verified ones."""
        state = self._state(request_id)
        self._settle_tree(state, token_ids)
        total = len(token_ids)
        keep = min(_common_prefix(state.token_ids, token_ids), total - 1)
        state.cache.length = keep
        linear = token_ids[keep:]
        if len(linear) + len(tree) > MAX_ROWS:  # a long uncached suffix first, in chunks; the tree after its last token
            self._run(state, linear[:-1], 1)
            linear = linear[-1:]
        parents = [r - 1 for r in range(len(linear))]
        parents += [len(linear) - 1 if parent < 0 else len(linear) + parent for parent in tree.parents]
        out = self._run(state, linear + tree.tokens, len(tree) + 1, parents)
        state.cache.length = total
        state.token_ids = list(token_ids)
        state.tree = tree
        return out

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def cached_requests(self) -> int:
        return len(self._requests)

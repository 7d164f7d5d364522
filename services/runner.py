"""A level of the hierarchy: one model's weights plus the KV caches of the requests it serves.

The only call is "score these tokens": every call carries the request id and
the full token sequence. The runner reuses the longest cached prefix and runs
the model over the rest, so rejected drafts are rolled back implicitly and a
replica that never saw (part of) a request simply recomputes it: correctness
never depends on which replica or cache a request lands on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.model import Decoder, KVCache
from services.model_store import load_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _RequestCache:
    """Invariant: `cache.length == len(token_ids)` and slot i holds token_ids[i]."""

    token_ids: list[int]
    cache: KVCache


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


@dataclass
class ForwardCounter:
    """Per-level cost accounting, read by stats and the profiler."""

    calls: int = 0
    tokens: int = 0
    seconds: float = 0.0


class LevelRunner:
    def __init__(self, decoder: Decoder, tokenizer, name: str, max_cached_requests: int = 64):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.name = name
        self.max_cached_requests = max_cached_requests
        self.counter = ForwardCounter()
        self._requests: OrderedDict[str, _RequestCache] = OrderedDict()

    @classmethod
    def load(cls, reference: str, dtype: str = "float32", device: str = "cpu") -> "LevelRunner":
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

    def logits(self, request_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Float32 logits [num_logits, vocab] predicting the tokens after each of the last
        `num_logits` positions of `token_ids`."""
        state = self._requests.pop(request_id, None)
        if state is None:
            state = _RequestCache([], self.decoder.new_cache())
        self._requests[request_id] = state  # most recently used last
        if len(self._requests) > self.max_cached_requests:
            self._requests.popitem(last=False)
        keep = min(_common_prefix(state.token_ids, token_ids), len(token_ids) - num_logits)
        state.cache.length = keep
        new = token_ids[keep:]
        start = time.perf_counter()
        out = self.decoder(torch.tensor(new), state.cache, num_logits)
        elapsed = time.perf_counter() - start
        state.token_ids = list(token_ids)
        c = self.counter
        c.calls += 1
        c.tokens += len(new)
        c.seconds += elapsed
        return out

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def cached_requests(self) -> int:
        return len(self._requests)

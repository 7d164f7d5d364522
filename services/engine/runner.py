"""A level of the hierarchy: one model's weights plus the KV caches of the requests it serves.

The only call is "score these tokens": every call carries the request id and
the full token sequence. The runner reuses the longest cached prefix and runs
the model over the rest, so rejected drafts are rolled back implicitly and a
replica that never saw (part of) a request simply recomputes it: correctness
never depends on which replica or cache a request lands on. After a tree
forward, the next call's tokens say which tree path was verified; its cached
keys and values are kept, the other nodes' dropped, with no extra message.

A request new to the level starts from the longest prefix of its tokens that
another request holds, running or recently released (prefix caching, as vLLM
and SGLang do): the chat template's system prompt every request shares, the
earlier turns of a conversation whose next turn comes as a new request. The
numerics are row-invariant, so a token's keys and values do not depend on the
forward that computed them: a copied prefix holds the bits a recomputation
would, and the logits are the same.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import chain

import torch

from services.engine.budget import CostModel
from services.engine.fallback import fast_decoder_computes, load_decoder
from services.engine.kernels import INT4, MAX_ROWS
from services.engine.model import CausalDecoder, KVCache, Segment, causal_chunks
from services.engine.model_store import load_pretrained
from services.engine.tree import TokenTree

# int8, int4: weight-only quantised block matmuls, the rest in bfloat16 (`services.engine.kernels`)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
          "int4": INT4}
COST_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COST_CONTEXT = 64  # tokens each request of `measure_costs` holds before the rows it times
# Released requests whose caches stay for new requests to start from (least recently released dropped first, and
# before any running request's cache when the byte bound is hit): a conversation's next turn arrives after its last
PREFIX_DONORS = 8


@dataclass
class LevelCall:
    """One request's forward at a level: logits of the last `num_logits` positions of `token_ids`, or with
    a `tree`, after the sequence and after each of the tree's nodes."""

    request_id: str
    token_ids: list[int]
    num_logits: int = 1
    tree: TokenTree | None = None


@dataclass
class _RequestCache:
    """Invariant (between calls): `cache.length == len(token_ids)` and slot i holds token_ids[i]. After a
    tree forward, slot len(token_ids) + i holds node i of `tree` until the next call. While a call runs,
    `token_ids` is the prefix it kept and the cache holds that prefix and the call's rows computed so far."""

    token_ids: list[int]
    cache: KVCache
    tree: TokenTree | None = None


@dataclass(eq=False)
class Work:
    """A call in progress: the steps (tokens, logits wanted, parents) still to compute, the logits so far."""

    call: LevelCall
    state: _RequestCache
    steps: deque[tuple[list[int], int, list[int] | None]]
    outputs: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None

    def cap_step(self, rows: int) -> None:
        """Compute at most `rows` of a causal next step in the coming forward, the rest in the one after (a
        branching tree's step is not split). The same logits: a row's result does not depend on the forward it is
        in."""
        tokens, wanted, parents = self.steps[0]
        if parents is not None or len(tokens) <= rows:
            return
        rest = len(tokens) - rows
        self.steps[0] = (tokens[rows:], min(wanted, rest), None)
        self.steps.appendleft((tokens[:rows], max(0, wanted - rest), None))


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
    def __init__(self, decoder: CausalDecoder, tokenizer, name: str, max_cached_requests: int = 64,
                 max_cache_bytes: int | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.name = name
        # Request KV caches kept between calls, least recently used dropped first past either bound (a dropped
        # request's next call recomputes its prefix: slower, the same logits from the fast decoder). The byte
        # bound drops only idle caches (no call in flight), so a forward's own requests keep theirs.
        self.max_cached_requests = max_cached_requests
        self.max_cache_bytes = max_cache_bytes
        self.caches_dropped = 0
        self.prefix_tokens_reused = 0  # tokens new requests copied from another request's cache
        self._requests: OrderedDict[str, _RequestCache] = OrderedDict()
        self._busy: set[str] = set()  # requests with a call begun and not finished
        self._donors: OrderedDict[str, _RequestCache] = OrderedDict()  # released, kept as prefixes (see release)

    @classmethod
    def load(cls, reference: str, dtype: str = "float32", device: str = "cpu") -> LevelRunner:
        # transformers loads the weights in the serving dtype (the fast decoder rounds them to it anyway: the same
        # values), so a bfloat16 level never holds a float32 copy; the fallback computes in float32 from the
        # checkpoint's own values, so a model only it runs is loaded again in float32
        hf_model, tokenizer, name = load_pretrained(reference, "bfloat16" if dtype in ("int8", "int4") else dtype)
        if dtype != "float32" and not fast_decoder_computes(hf_model.config):
            del hf_model
            hf_model, tokenizer, name = load_pretrained(reference, "float32")
        decoder = load_decoder(hf_model, DTYPES[dtype], torch.device(device))
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
        self._busy.add(request_id)
        self._drop_past_bounds()
        return state

    def _drop_past_bounds(self) -> None:
        over_count = len(self._requests) - self.max_cached_requests
        total = self.cache_bytes() if self.max_cache_bytes is not None else 0
        if over_count <= 0 and (self.max_cache_bytes is None or total <= self.max_cache_bytes):
            return  # every call passes here: no copy of the keys unless something is dropped
        while self._donors and self.max_cache_bytes is not None and total > self.max_cache_bytes:
            total -= self._donors.popitem(last=False)[1].cache.nbytes()
        for request_id in list(self._requests):  # least recently used first
            over_bytes = self.max_cache_bytes is not None and total > self.max_cache_bytes
            if over_count <= 0 and not over_bytes:
                return
            if over_count <= 0 and request_id in self._busy:
                continue
            total -= self._requests.pop(request_id).cache.nbytes()
            over_count -= 1
            self.caches_dropped += 1

    def cache_bytes(self) -> int:
        """Bytes the kept request KV caches hold (their allocated capacity), released ones kept as prefixes too."""
        return sum(state.cache.nbytes() for state in chain(self._requests.values(), self._donors.values()))

    def _adopt_prefix(self, state: _RequestCache, token_ids: list[int]) -> None:
        """Start a new request's cache from the longest prefix of `token_ids` another request's cache holds."""
        if not isinstance(state.cache, KVCache):
            return  # the fallback's transformers cache: its numerics are not row-invariant, nothing is shared
        donor, length = None, 0
        for other in chain(self._requests.values(), self._donors.values()):
            common = _common_prefix(other.token_ids, token_ids) if other is not state else 0
            if common > length:
                donor, length = other, common
        if donor is not None:
            state.cache.copy_prefix(donor.cache, length)
            state.token_ids = token_ids[:length]
            self.prefix_tokens_reused += length

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
        state.cache.keep(total, [total + node for node in nodes])
        state.token_ids.extend(token_ids[total : total + len(nodes)])

    def begin(self, call: LevelCall) -> Work:
        """Plan a call's forward: reuse the longest cached prefix, then at most MAX_ROWS rows per step (a
        prompt takes several steps; a tree goes in the last, after the last uncached token)."""
        total = len(call.token_ids)
        wanted = 1 if call.tree is not None else call.num_logits
        if not 1 <= wanted <= total:
            raise ValueError(f"logits of {wanted} positions asked of a {total}-token sequence")
        if call.tree is not None and len(call.tree) + 1 > MAX_ROWS:
            raise ValueError(f"a token tree of {len(call.tree)} nodes: at most {MAX_ROWS - 1} fit in a forward")
        state = self._state(call.request_id)
        self._settle_tree(state, call.token_ids)
        if not state.token_ids:
            self._adopt_prefix(state, call.token_ids[: total - wanted])
        keep = min(_common_prefix(state.token_ids, call.token_ids), total - wanted)
        state.cache.length = keep
        state.token_ids = call.token_ids[:keep]  # until the call completes (a dropped call leaves a valid prefix)
        new = call.token_ids[keep:]
        steps: deque[tuple[list[int], int, list[int] | None]] = deque()
        if call.tree is not None:
            if len(new) + len(call.tree) > MAX_ROWS:
                steps.extend((tokens, wanted, None) for tokens, wanted in causal_chunks(new[:-1], 0))
                new = new[-1:]
            parents = [r - 1 for r in range(len(new))]
            parents += [len(new) - 1 if parent < 0 else len(new) + parent for parent in call.tree.parents]
            if parents == list(range(-1, len(parents) - 1)):
                # a chain (under load the draft budget cuts most trees to one or two nodes): computed as the
                # linear continuation it is, whose rows read their key windows in place instead of gathering
                # them; the same logits (a tree node's are the same path's drafted linearly)
                parents = None
            steps.append((new + call.tree.tokens, len(call.tree) + 1, parents))
        else:
            steps.extend((tokens, wanted, None) for tokens, wanted in causal_chunks(new, call.num_logits))
        return Work(call, state, steps)

    def step(self, works: list[Work]) -> list[Work]:
        """One forward over the next step of every work; returns the works this step completed (their
        `logits` set, their request's cache holding the call's sequence)."""
        segments = []
        for work in works:
            if work.call.request_id in self._requests:  # a prompt prefilled over many forwards stays recent
                self._requests.move_to_end(work.call.request_id)
            tokens, num_logits, parents = work.steps.popleft()
            segments.append(Segment(tokens, work.state.cache, num_logits, parents))
        done = []
        for work, logits in zip(works, self.decoder.step(segments)):
            if logits is not None:
                work.outputs.append(logits)
            if not work.steps:
                self._finish(work)
                done.append(work)
        return done

    def _finish(self, work: Work) -> None:
        state, call = work.state, work.call
        self._busy.discard(call.request_id)
        work.logits = work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs)
        if call.tree is not None:
            state.cache.length = len(call.token_ids)  # the nodes wait behind the sequence (see _settle_tree)
            state.tree = call.tree
        state.token_ids = list(call.token_ids)

    def run(self, calls: list[LevelCall]) -> list[torch.Tensor]:
        """The calls' logits, computed together (steps until every call is done); one call per request."""
        if len({call.request_id for call in calls}) != len(calls):
            raise ValueError("one call per request in a batch: a request's calls depend on each other")
        works = [self.begin(call) for call in calls]
        active = list(works)
        while active:
            self.step(active)
            active = [work for work in active if work.steps]
        return [work.logits for work in works]

    def logits(self, request_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Float32 logits [num_logits, vocab] predicting the tokens after each of the last
        `num_logits` positions of `token_ids`."""
        return self.run([LevelCall(request_id, token_ids, num_logits)])[0]

    def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree) -> torch.Tensor:
        """Logits [1 + len(tree), vocab]: row 0 after the last token of `token_ids`, row 1 + i after
        tree node i (which sees the sequence and its own ancestors), all in one forward.

        Afterwards the cache holds `token_ids`; the nodes' keys and values wait in the slots behind
        it until the next call keeps the verified ones."""
        return self.run([LevelCall(request_id, token_ids, tree=tree)])[0]

    def measure_costs(self, rows: tuple[int, ...] = COST_ROWS, repeats: int = 3) -> CostModel:
        """Milliseconds of a forward over `rows` new rows in total, spread over up to 8 requests (a batch),
        each after a COST_CONTEXT-token context: what the draft budget prices a round at. The fastest of `repeats`: what
        else runs on the machine only ever adds time."""
        context = [i % self.vocab_size for i in range(COST_CONTEXT)]
        ms = []
        for total in rows:
            requests = min(total, 8)
            sizes = [total // requests + (k < total % requests) for k in range(requests)]
            calls = [LevelCall(f"cost-{k}", context + [k % self.vocab_size] * size, size)
                     for k, size in enumerate(sizes)]
            self.run(calls)  # the contexts cached: each repeat computes the new rows (and their logits) only
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.run(calls)
                times.append(1000 * (time.perf_counter() - start))
            ms.append(max([min(times), *ms[-1:]]))  # the least disturbed; more rows never cost less
        for k in range(8):
            self.release(f"cost-{k}", keep_prefix=False)
        return CostModel(tuple(rows), tuple(ms))

    def release(self, request_id: str, keep_prefix: bool = True) -> None:
        """The request is done here. Its cache stays (`PREFIX_DONORS` at most) for new requests that share a
        prefix with it; nothing computes on it again, so it needs no bound of its own beyond the byte bound."""
        state = self._requests.pop(request_id, None)
        self._busy.discard(request_id)
        self._donors.pop(request_id, None)
        if state is not None and state.token_ids and keep_prefix and isinstance(state.cache, KVCache):
            state.tree = None
            self._donors[request_id] = state
            while len(self._donors) > PREFIX_DONORS:
                self._donors.popitem(last=False)
            self._drop_past_bounds()

    def forget_released(self) -> None:
        """Drop the caches kept for new requests' prefixes: a benchmark comparing methods on the same prompts
        starts each method from none, or the second would copy what the first computed."""
        self._donors.clear()

    def cached_requests(self) -> int:
        return len(self._requests)

    def cached_length(self, request_id: str) -> int:
        """Tokens of the request's sequence this level holds (0 if none): what its next call need not recompute."""
        state = self._requests.get(request_id)
        return len(state.token_ids) if state is not None else 0

"""Continuous batching at a level: the forwards of many requests computed as one.

A level call (one request's draft step, verification or token tree) waits in a
queue. A driver takes every waiting call, up to the limits, runs their next
step as one forward (`Decoder.step`: matmuls and norms over all rows at once,
attention per request against its own cache), hands each finished call its
scores, and starts over, so calls that arrive while a forward runs join the
next one; before it starts, it waits (briefly) for the next calls of the
requests the last forward answered, so that all of them share each forward
rather than taking turns. A call that needs several steps (a prompt, MAX_ROWS
rows per step) stays in the batch for the forwards that follow, in pieces of
`prompt_rows` while other requests are active (chunked prefill): a long prompt
does not stall the streams that are decoding.

The numerics are row-invariant (`services.engine.model`), so a request's scores
do not depend on which requests share its forwards: batching changes no output
(tested: each of 8 concurrent requests equals the same request alone).

One class serves both places a level runs. In-process (`hierspec generate`,
`bench`) `run` is None and a forward runs inline: calls made in the same turn
of the event loop share a forward. In a Serve replica `run` hands the forward
to the replica's compute thread (every torch op runs there), and the event
loop keeps taking calls meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.engine.budget import CostModel
from services.engine.kernels import MAX_ROWS, kernel_choices
from services.engine.levels import Level, Scores, linear_positions, scores, tree_positions
from services.engine.runner import LevelCall, LevelRunner, Work
from services.engine.sampling import SamplingParams
from services.engine.tree import TokenTree

# A cost curve measured while the machine was busy (other processes' forwards: a test suite, replicas starting
# together) overstates every forward, and the cache would keep it: on the dev host SmolLM2's 1-row bfloat16 forward
# was cached at 365 ms (float32: 5,829 ms) where it takes about 85. So each process times the 1-row point (a few
# forwards); a cached curve more than this many times slower is measured again, and each row count keeps the
# faster of the two (load only ever adds time, so the faster figure is the truer one).
STALE_COSTS = 1.5
# Part of a cost curve's cache key: raised when the decoder's own cost changes (2: attention's ops per request
# cut by half, a batched forward of 8 one-row requests 180 -> 110 ms; 3: rows sharing a tail window multiply it in
# place, 8 requests of 8 rows 376 -> 254 ms; 4: attention's GEMMs called as `bmm` on query rows made contiguous
# once per layer, 16 one-row requests 164 -> 140 ms, the same bits), so curves measured before are not used
COST_VERSION = 4
IN_PROCESS_WAIT_MS = 5.0


class BatchLimits(BaseModel):
    """How much one forward of a level takes on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_requests: int = Field(32, ge=1, description="requests whose calls share one forward")
    max_rows: int = Field(512, ge=MAX_ROWS,
                          description="new tokens of one forward, over all its requests (a call that does not fit "
                                      "waits for the next forward, unless it is alone); at least one prompt chunk")
    prompt_rows: int = Field(16, ge=1, le=MAX_ROWS,
                             description="rows of a long prompt (one that takes several forwards) computed in each "
                                         "forward while other requests are active: more delays every stream, "
                                         "fewer its own first token (alone it takes whole forwards)")
    # a router's round trip between forwards (measured on the 2-core dev host, SmolLM2 hd, 8 streaming clients: a
    # request's next call reaches the replica 10-55 ms after its scores leave): waiting that long lets all the
    # requests share each forward (7.2 calls per forward, 25.1 and 26.9 tok/s, p50 inter-token 235-241 ms)
    # instead of taking turns in two halves (3.8 calls per forward, 20.4 and 19.8 tok/s, 350 ms) with 5 ms
    wait_ms: float = Field(60.0, ge=0.0, le=1000.0,
                           description="how long a forward waits for the next calls of the requests the last one "
                                       "answered (it starts as soon as they are all queued)")


@dataclass(eq=False)
class _Pending:
    call: LevelCall
    picks: SamplingParams | None
    confidence: bool
    positions: list[int]
    future: asyncio.Future
    isolated: bool = False  # computed in a forward of its own (a suspect: a replica died computing it)
    work: Work | None = None
    long: bool = False  # it began with several forwards to compute (a long prompt): prefilled in chunks

    def rows(self, cached: int) -> int:
        """New rows of its next step: its planned step once begun, else estimated from the length of the
        request's sequence the level holds (`cached`)."""
        if self.work is not None:
            return len(self.work.steps[0][0])
        new = len(self.call.token_ids) - cached if 0 < cached <= len(self.call.token_ids) else len(self.call.token_ids)
        return min(MAX_ROWS, max(new, 1) + (len(self.call.tree) if self.call.tree is not None else 0))


Run = Callable[[Callable[[], object], int], Awaitable[object]]  # (blocking function, requests in it) -> its result


class BatchingLevel:
    """A runner as a `Level` whose calls from concurrent requests run in shared forwards."""

    def __init__(self, runner: LevelRunner, limits: BatchLimits | None = None, run: Run | None = None):
        self.runner = runner
        self.name = runner.name
        self.vocab_size = runner.vocab_size
        # in-process every call comes from this event loop, a request's next one within a turn or two of it: a
        # longer wait would only stall on requests that are at another level
        self.limits = limits or (BatchLimits(wait_ms=IN_PROCESS_WAIT_MS) if run is None else BatchLimits())
        self._run = run
        self._queue: deque[_Pending] = deque()
        self._active: list[_Pending] = []  # calls with steps left after the last forward
        self._driver: asyncio.Task | None = None
        self._returning: set[str] = set()  # requests the last forward answered, until their next call is queued
        self._arrived = asyncio.Event()  # a call was queued
        self.forwards_run = 0  # statistics: forwards, the calls they served, seconds spent in them
        self.calls_served = 0
        self.forward_s = 0.0
        # when a list: each forward's (rows of each call, tokens each call's request held before them, ms), which the
        # planner fits its cost model to (deploy.planner.profiler)
        self.trace: list[tuple[list[int], list[int], float]] | None = None

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int,
                     picks: SamplingParams | None = None, confidence: bool = False, isolated: bool = False) -> Scores:
        """`isolated`: no other call shares its forwards (see `_take`)."""
        return await self._submit(LevelCall(request_id, token_ids, num_logits), picks, confidence,
                                  linear_positions(len(token_ids), num_logits), isolated)

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          picks: SamplingParams | None = None, isolated: bool = False) -> Scores:
        return await self._submit(LevelCall(request_id, token_ids, tree=tree), picks, False,
                                  tree_positions(len(token_ids), tree), isolated)

    @functools.cached_property
    def costs(self) -> CostModel:
        """This level's forward cost over total rows, measured once per machine (cached with the kernel choices),
        and measured again where a probe finds the cached curve stale (see STALE_COSTS)."""
        runner = self.runner
        key = (f"costs|{runner.name}|{runner.decoder.dtype}|{runner.decoder.device}|torch {torch.__version__}|"
               f"threads {torch.get_num_threads()}|v{COST_VERSION}")
        choices, measured = kernel_choices(), []

        def measure() -> dict:
            measured.append(runner.measure_costs().__dict__)
            return measured[-1]
        entry = choices.cached(key, measure)
        if not measured and entry["ms"][0] > STALE_COSTS * runner.measure_costs(rows=(1,)).ms[0]:
            fresh = runner.measure_costs().__dict__
            entry = choices.update(key, lambda cached: _faster(fresh, cached))
        return CostModel(tuple(entry["rows"]), tuple(entry["ms"]))

    async def release(self, request_id: str, keep_prefix: bool = True) -> None:
        """`keep_prefix`: keep its cache for new requests that share a prefix with it (`LevelRunner.release`)."""
        self._returning.discard(request_id)  # it calls no more: a forward waiting for it need not
        self._arrived.set()
        await self._execute(lambda: self.runner.release(request_id, keep_prefix), 1)

    async def _execute(self, function: Callable[[], object], requests: int):
        return function() if self._run is None else await self._run(function, requests)

    async def _submit(self, call: LevelCall, picks: SamplingParams | None, confidence: bool,
                      positions: list[int], isolated: bool = False) -> Scores:
        loop = asyncio.get_running_loop()
        pending = _Pending(call, picks, confidence, positions, loop.create_future(), isolated)
        if self._driver is None or self._driver.done() or self._driver.get_loop() is not loop:
            # a loop that was left (a generation interrupted in-process) leaves calls nobody awaits any more
            self._queue = deque(p for p in self._queue if p.future.get_loop() is loop)
            self._active = [p for p in self._active if p.future.get_loop() is loop]
            if self._driver is not None and self._driver.get_loop() is not loop:
                self._returning, self._arrived = set(), asyncio.Event()  # an Event belongs to one loop
            self._driver = asyncio.ensure_future(self._drive())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _drive(self) -> None:
        while self._queue or self._active:
            await asyncio.sleep(0)  # calls made in this turn of the event loop join the forward
            await self._await_returning()
            batch = self._take()
            if not batch:
                continue
            # requests active here besides the batch's: those waiting, and those between rounds
            others = {p.call.request_id for p in self._queue} | self._returning
            shared = len(others | {p.call.request_id for p in batch}) > 1
            started = time.perf_counter()
            try:
                finished = await self._execute(functools.partial(self._step, batch, shared), len(batch))
            except Exception as exc:  # the forward failed (out of memory, say): its calls fail, not the level
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                self._returning = set()
                continue
            self.forwards_run += 1
            self.forward_s += time.perf_counter() - started
            for pending, result in finished:
                self.calls_served += 1
                if not pending.future.done():  # a caller that went away has cancelled it
                    if isinstance(result, Exception):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
            self._active = [p for p in batch if p.work is not None and p.work.steps]
            # answered, and so likely to call again soon (not a call that failed or that its caller gave up)
            self._returning = {p.call.request_id for p, result in finished
                               if not isinstance(result, Exception) and not p.future.cancelled()}

    async def _await_returning(self) -> None:
        """Wait, at most `wait_ms`, until the requests the last forward answered have their next calls queued:
        a router's round trip takes milliseconds, and a forward started without them would run the requests in
        two alternating halves (each getting a round every other forward). Wakes as soon as they are all back."""
        deadline = asyncio.get_running_loop().time() + self.limits.wait_ms / 1000
        while self._returning - {p.call.request_id for p in self._queue}:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # (not the builtin TimeoutError before Python 3.11)
                await asyncio.wait_for(self._arrived.wait(), left)

    def _take(self) -> list[_Pending]:
        """Calls with steps left first, then waiting calls in arrival order, one per request, within the limits.
        An isolated call runs alone: it waits until the calls under way have finished their steps, no call joins
        those meanwhile, and none joins it (should it end the process, it ends no one else's forward)."""
        batch = [p for p in self._active if not p.future.done()]  # a cancelled call stops computing
        self._active = []  # set again from the batch once its forward has run
        rows = sum(p.rows(0) for p in batch)
        requests = {p.call.request_id for p in batch}
        closed = any(p.isolated for p in batch)  # no call joins this forward
        deferred = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled while waiting
                continue
            needs = pending.rows(self.runner.cached_length(pending.call.request_id))
            fits = len(requests) < self.limits.max_requests and rows + needs <= self.limits.max_rows
            if closed or pending.call.request_id in requests or (batch and (not fits or pending.isolated)):
                closed = closed or pending.isolated
                deferred.append(pending)
                continue
            batch.append(pending)
            requests.add(pending.call.request_id)
            rows += needs
            closed = pending.isolated
        self._queue = deferred
        return batch

    def _step(self, batch: list[_Pending], shared: bool) -> list[tuple[_Pending, Scores | Exception]]:
        """On the compute thread: plan new calls, one forward, scores of the calls it finished. `shared`: other
        requests are active at this level (in this forward, waiting, or between rounds)."""
        finished: list[tuple[_Pending, Scores | Exception]] = []
        stepping = []
        for pending in batch:
            if pending.work is None:
                if pending.future.done():  # cancelled, perhaps released meanwhile: no cache to recreate
                    continue
                try:
                    pending.work = self.runner.begin(pending.call)
                except ValueError as exc:  # a call this level cannot run (a tree too large): it alone fails
                    finished.append((pending, exc))
                    continue
                pending.long = len(pending.work.steps) > 1
            stepping.append(pending)
        # chunked prefill: a long prompt computes small pieces while other requests are active, in its forwards or
        # between their rounds (a whole chunk alone would hold up their next round just as well; see BatchLimits)
        if shared:
            for pending in stepping:
                if pending.long:
                    pending.work.cap_step(self.limits.prompt_rows)
        if stepping:
            trace = self.trace
            if trace is not None:
                shape = ([len(p.work.steps[0][0]) for p in stepping], [p.work.state.cache.length for p in stepping])
                started = time.perf_counter()
            done = self.runner.step([p.work for p in stepping])
            if trace is not None:
                trace.append((*shape, 1000 * (time.perf_counter() - started)))
            for pending in stepping:
                if pending.work in done:
                    try:
                        result = scores(pending.work.logits, pending.picks, pending.positions, pending.confidence)
                    except ValueError as exc:  # its sampling parameters, say: it alone fails
                        result = exc
                    finished.append((pending, result))
        return finished


def _faster(curve: dict, cached: dict | None) -> dict:
    """Point-wise the faster of two cost curves over the same rows: load only adds time, at any row count."""
    if cached is None or list(cached["rows"]) != list(curve["rows"]):
        return curve
    return {"rows": list(curve["rows"]), "ms": [min(a, b) for a, b in zip(curve["ms"], cached["ms"], strict=True)]}


def as_level(level: Level | LevelRunner) -> Level:
    return BatchingLevel(level) if isinstance(level, LevelRunner) else level

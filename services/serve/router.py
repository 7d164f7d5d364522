"""The router: runs the draft-and-verify rounds of many requests at once over the levels.

Each request is a `Generation` whose level calls are awaited; with remote
levels, while one request waits for the target another runs on a draft level,
so different requests keep different levels busy (the pipeline). With
`pipelined=False` one round runs at a time across all requests: the baseline
that the serving benchmark compares against.

The router bounds what it runs (past `max_in_flight` it refuses, and the HTTP
layer answers 503 with Retry-After; a request holds its place from `start`, so
a streamed one whose stream has not begun yet counts), ends requests that run past their
timeout, and releases every level's cache when a client goes away (the
awaiting task is cancelled and the generation closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator

from services.engine.hsd import Generation, HierarchicalDecoder
from services.engine.sampling import SamplingParams
from services.serve.metrics import ServingMetrics


class Overloaded(Exception):
    """More requests than the router runs at once; retry after `retry_after` seconds."""

    retry_after = 1


class RequestTimeout(Exception):
    pass


class Router:
    def __init__(self, decoder: HierarchicalDecoder, max_in_flight: int, timeout_s: float, pipelined: bool = True,
                 metrics: ServingMetrics | None = None):
        self.decoder = decoder
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.in_flight = 0
        self._holding: set[str] = set()  # ids of the generations holding a place
        self._one_round_at_a_time = None if pipelined else asyncio.Lock()

    def start(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
              stop_ids: frozenset[int], request_id: str | None = None) -> Generation:
        """A generation holding one of the `max_in_flight` places until its rounds end, or until it is
        dropped unread (a client gone before its stream began)."""
        self.check_room()
        generation = self.decoder.start(prompt_ids, params, max_tokens, stop_ids, request_id)
        self._holding.add(generation.id)
        self.in_flight += 1
        weakref.finalize(generation, self._leave, generation.id)
        self._report_in_flight()
        return generation

    def check_room(self, places: int = 1) -> None:
        """Raise Overloaded now if `start` would (for `places` generations): before a request's prompt is
        tokenized for nothing, or before some choices of a request start and others cannot."""
        if self.in_flight + places > self.max_in_flight:
            raise Overloaded(f"the server runs {self.max_in_flight} requests at once; retry shortly")

    def _leave(self, generation_id: str) -> None:
        if generation_id in self._holding:
            self._holding.discard(generation_id)
            self.in_flight -= 1
            self._report_in_flight()

    async def rounds(self, generation: Generation, arrival: float | None = None) -> AsyncIterator[list[int]]:
        """The tokens each round commits. Raises RequestTimeout past the router's timeout."""
        arrival = arrival or time.perf_counter()
        deadline = arrival + self.timeout_s
        rounds = generation.stream()
        outcome, last = "cancelled", arrival
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                        tokens = await self._next(rounds)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    outcome = "timeout"
                    raise RequestTimeout(f"the request ran past the server's timeout of {self.timeout_s:g} s") \
                        from None
                now = time.perf_counter()
                if self.metrics:
                    self.metrics.on_tokens(len(tokens), first=last == arrival, seconds=now - last)
                last = now
                yield tokens
            outcome = "completed"
        except Exception:  # a client that went away (cancelled) raises no Exception; a timeout is counted above
            if outcome == "cancelled":
                outcome = "error"
            raise
        finally:
            with contextlib.suppress(Exception):
                await rounds.aclose()
            self._leave(generation.id)
            if self.metrics:
                self.metrics.on_finish(generation.stats, outcome)

    async def _next(self, rounds: AsyncIterator[list[int]]) -> list[int]:
        if self._one_round_at_a_time is None:
            return await anext(rounds)
        async with self._one_round_at_a_time:
            return await anext(rounds)

    def _report_in_flight(self) -> None:
        if self.metrics:
            self.metrics.set_in_flight(self.in_flight)

"""A one-level hierarchy's rounds run in the target's replica; the ingress reads their tokens as a stream.

With only the database drafter below the target there is nothing to pipeline
between levels, and each round's Serve call (about 4 ms on the 2-core dev host,
on the critical path of every round) is pure overhead. With `serving.rounds_in:
target` the target's replica runs the whole generation, exactly as in-process
(`deploy.app.rounds_service`), and streams each round's tokens here; the
ingress keeps everything else (tokenizing, the router's bounds and timeout,
stop strings, the OpenAI shapes). `RemoteRounds` stands in for the decoder and
`RemoteGeneration` for a generation, so the router and the HTTP layer do not
know which layout runs.

What differs from the ingress layout: a request whose replica dies fails
(`LevelCrashed`, HTTP 500 `replica_crashed`) rather than being retried on
another, since the rounds' state (the sampler's generator, the drafter's
context) died with it; and a response ended by a stop string is cancelled in
the replica, so the model DB does not learn it (it learns every other
completed response, as in the ingress layout) unless the replica's rounds,
which run ahead of the stream, finished before the cancellation reached them.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError

from services.engine.hsd import GenerationStats, LevelStats
from services.engine.sampling import SamplingParams, TokenLogprob
from services.serve.level_service import LevelCrashed, RemoteLevel


@dataclass
class RoundOutput:
    """One message of a replica's stream: a round's committed tokens (and the target's log-probabilities of them,
    when asked for) and the generation's statistics so far (a response ended early, by a stop string, reports
    them too); the last message has no tokens and the finish reason."""

    tokens: list[int]
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class RemoteGeneration:
    """A generation running in a target replica, with `Generation`'s interface: iterate `stream()` for each
    round's tokens; `token_ids`, `logprobs`, `finish_reason` and `stats` fill in as it goes (final at its end).
    Closing the stream early cancels the replica's generation, which releases its cache there."""

    def __init__(self, target: RemoteLevel, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids: frozenset[int], request_id: str | None = None):
        self.id = request_id or uuid.uuid4().hex
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.finish_reason: str | None = None
        self.stats = GenerationStats([LevelStats(target.name)])
        self._target = target
        self._call = (list(prompt_ids), params, max_tokens, stop_ids)

    async def stream(self) -> AsyncIterator[list[int]]:
        responses = self._target.handle.options(stream=True).generate.remote(self.id, *self._call)
        try:
            async for output in responses:
                self.stats = output.stats
                if output.finish_reason is not None:
                    self.finish_reason = output.finish_reason
                    responses = None  # ended: nothing to cancel
                    return
                self.token_ids.extend(output.tokens)
                if self.logprobs is not None:
                    self.logprobs.extend(output.logprobs)
                yield output.tokens
            raise RuntimeError(f"level {self._target.name}: the stream of request {self.id} ended without its "
                               "finish reason")
        except RayActorError:
            raise LevelCrashed(f"level {self._target.name}: the replica running this request's rounds died; with "
                               "serving.rounds_in: target a request is not retried on another") from None
        finally:
            if responses is not None:  # left early: the replica's generation stops and releases its cache
                with contextlib.suppress(Exception):
                    responses.cancel()


class RemoteRounds:
    """The decoder as the ingress sees it when the target's replicas run the rounds: `target` (its name,
    context window) and `start`."""

    def __init__(self, target: RemoteLevel):
        self.target = target

    def start(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
              stop_ids: frozenset[int] = frozenset(), request_id: str | None = None) -> RemoteGeneration:
        return RemoteGeneration(self.target, prompt_ids, params, max_tokens, frozenset(stop_ids), request_id)

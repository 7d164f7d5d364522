"""The target level's replica that also runs a one-level hierarchy's rounds (`serving.rounds_in: target`).

It is a `LevelService` (the same weights, batching and compute thread) whose
`generate` runs a whole request as `hierspec generate` does in-process: the
database drafter and the rounds live here, each round's forward joins the
replica's batched forwards directly, and the committed tokens stream back to
the ingress (`services.serve.remote_rounds`), which the round no longer waits
for. Why, and what differs from the ingress layout, is said there.

Every forward still runs on the compute thread; what a round computes besides
(a sampled round's probabilities, on Serve's event-loop thread) runs on one
thread, so that the process holds one OpenMP team (see `LevelService`). Each
replica holds its own drafter, so its model DB learns from the requests it
runs (as each ingress replica's does in the ingress layout; Redis shares them,
`drafter.share_model_db`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from deploy.builder import chain_decoder, serving_drafter
from deploy.config import HierspecConfig
from services.engine.model_store import load_tokenizer
from services.engine.sampling import SamplingParams
from services.serve.level_service import LevelService
from services.serve.metrics import ForwardMetrics
from services.serve.remote_rounds import RoundOutput


class TargetRounds(LevelService):
    """`config` and `method`: the hierarchy whose rounds this replica runs (one level: the target, with the
    database drafter below it or nothing, as in `ar`); the other arguments are `LevelService`'s."""

    def __init__(self, config: dict, method: str, *level_args, **level_kwargs):
        super().__init__(*level_args, **level_kwargs)
        config = HierspecConfig.model_validate(config)
        self._shared_cores = config.device == "cpu"
        drafter, self._saver = serving_drafter(config.drafter, method, load_tokenizer(config.models.target))
        # the drafter is microseconds a round, and on CPU the levels' forwards take every core: no lookahead
        self.decoder = chain_decoder(config, method, [self.level], lambda: drafter,
                                     on_forward=ForwardMetrics(config.name).on_forward)
        if len(self.decoder.levels) != 1:
            raise ValueError(f"method {method!r} has {len(self.decoder.levels)} levels; a target replica runs the "
                             "rounds of a one-level hierarchy only")

    def __del__(self):
        """Serve's shutdown of the replica: what the model DB learned goes to its file."""
        if getattr(self, "_saver", None) is not None:
            self._saver.close()

    def _runs_alone(self) -> bool:
        """On CPU, where the levels share the cores: whether this replica's one request is all it runs (as the
        router decides in the ingress layout)."""
        return self._shared_cores and self.decoder.load.active <= 1

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                       stop_ids: frozenset[int]) -> AsyncIterator[RoundOutput]:
        """Each round's committed tokens, then a last message with the finish reason and statistics. Cancelled
        (the client went away, a stop string, the router's timeout), the generation releases its cache.

        The rounds run in a task of their own and this generator sends what they have committed: in Serve's
        throughput-optimized mode (which hierspec's cluster environment sets) a streaming method runs on the
        replica's event loop and its next message is pulled only once the last one is written, so rounds run
        inside it would wait for that write before their next forward. Rounds committed while a message was being
        written go out together in the next one."""
        self._crash_on_fault_token(prompt_ids)
        if torch.get_num_threads() != 1:  # this thread's torch ops (a sampled round's probabilities) stay serial
            torch.set_num_threads(1)
        generation = self.decoder.start(prompt_ids, params, max_tokens, stop_ids, request_id)
        progress = asyncio.Event()  # set by each round, and at the end
        runs = asyncio.create_task(_run_rounds(generation, progress))
        sent = 0  # of the generation's tokens
        try:
            while True:
                await progress.wait()
                progress.clear()
                finished = runs.done()  # before reading: every token is committed once it is done
                if len(generation.token_ids) > sent:
                    logprobs = None if generation.logprobs is None else generation.logprobs[sent:]
                    tokens, sent = generation.token_ids[sent:], len(generation.token_ids)
                    yield RoundOutput(tokens, generation.stats, logprobs)
                if finished:
                    break
            await runs  # the generation's error, if it failed
        finally:
            if not runs.done():  # left early: the rounds stop, and the generation releases its cache
                runs.cancel()
            # retrieved in every case (a failure the reader left before seeing is logged by asyncio otherwise)
            await asyncio.gather(runs, return_exceptions=True)
        yield RoundOutput([], generation.stats, finish_reason=generation.finish_reason)


async def _run_rounds(generation, progress: asyncio.Event) -> None:
    """Run the generation's rounds (its `token_ids` and `logprobs` grow), setting `progress` after each and at the
    end."""
    try:
        async for _ in generation.stream():
            progress.set()
    finally:
        progress.set()

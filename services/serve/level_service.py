"""A hierarchy level as a Serve deployment: one model's weights and its requests' KV caches.

Every call carries the request id and the full token sequence (see
`services.engine.runner`), so any replica can answer any call; the router routes a
request's calls by its id (Serve's multiplexed model id) to keep its cache warm
on one replica. The calls of concurrent requests run in shared forwards
(`services.engine.batching`: calls arriving while a forward runs join the next
one). A replica computes one forward at a time, off the event loop
so health checks and queued calls are still heard, always on the one thread
that loaded the weights (torch's OpenMP team belongs to the thread that
starts a parallel region; on the 2-core dev host, forwards on the loading
thread took 66-75 ms where asyncio's default executor took 70-93 ms, four
interleaved runs each). One thread also serialises forwards without a lock.
Every torch op runs there, the argmax of the scores included: an op on the
event loop's thread starts a second OpenMP team, and with more OpenMP threads
than cores libgomp stops spinning between parallel regions, so each of a
forward's regions waits for a sleeping thread (SmolLM2's forward in a replica:
61 ms with the argmax on the event loop, 38 ms with it here, as in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve
from ray.exceptions import RayActorError

from services.engine.batching import BatchingLevel, BatchLimits
from services.engine.budget import CostModel
from services.engine.levels import Scores
from services.engine.runner import LevelRunner
from services.engine.sampling import SamplingParams
from services.engine.tree import TokenTree

log = logging.getLogger("hierspec.level")

# Fault injection for the reliability tests: a call whose sequence holds this token id ends its replica's process at
# once, as an out-of-memory kill would. Unset (always, outside tests), nothing is checked.
FAULT_TOKEN_ENV = "HIERSPEC_TEST_FAULT_TOKEN"

# Request ids a replica reports to Serve's router for affinity (most recent first); memory is
# bounded separately, by the runner's cache bound.
TRACKED_REQUESTS = 256


class LevelService:
    """`threads`: torch threads of a forward while no other level of the machine computes (default: the node's
    cores); `shared_threads`: while other levels may be computing too (default: the node's cores divided among
    `levels_per_node`). `batch`: the limits of one batched forward (`BatchLimits`)."""

    def __init__(self, model: str, dtype: str, device: str, threads: int | None, shared_threads: int | None,
                 levels_per_node: int, batch: dict | None = None, cache_limits: dict | None = None):
        self.solo_threads = threads or os.cpu_count() or 1
        self.shared_threads = shared_threads or max(1, self.solo_threads // levels_per_node)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="level-compute")  # serialises every forward
        self.runner = self._compute.submit(self._load, model, dtype, device).result()
        self.level = BatchingLevel(self.runner, BatchLimits.model_validate(batch or {}), run=self._on_compute)
        self._alone = False  # what the router said with its last call: no other level is computing
        fault = os.environ.get(FAULT_TOKEN_ENV)
        self._fault_token = int(fault) if fault else None  # read once: calls are the hot path
        self._compute.submit(lambda: self.level.costs).result()  # the draft budget's input, measured once per machine
        self._limit_caches(**(cache_limits or {}))  # after: measuring costs keeps its own caches

    def _limit_caches(self, requests: int = 64, running: int = 1, max_bytes: int | None = None) -> None:
        """The runner's cache bounds, and a word on what the byte bound leaves each running request (all of the
        routers' requests on this replica, the worst case)."""
        runner = self.runner
        runner.max_cached_requests, runner.max_cache_bytes = requests, max_bytes
        per_token = runner.decoder.shape.kv_bytes_per_token
        if max_bytes is None or not per_token:
            return
        tokens = max_bytes // per_token // running
        message = (f"{runner.name}: request KV caches bounded at {max_bytes / (1 << 30):.2f} GiB: about {tokens} "
                   f"positions for each of {running} running requests (max_in_flight x router_replicas; a cache "
                   f"grows by doubling), context window {runner.context_window}")
        if tokens < runner.context_window:
            log.warning("%s; with all of them running, a longer request recomputes its prefix every round", message)
        else:
            log.info(message)

    def _load(self, model: str, dtype: str, device: str) -> LevelRunner:
        # Ray caps a worker's threads at its CPU reservation; a level gets what the config says, else the node
        torch.set_num_threads(self.shared_threads)
        return LevelRunner.load(model, dtype, device)

    async def _on_compute(self, function, requests: int):
        """Run a forward (or a release) on the compute thread, with every core while it is all the machine
        computes (whatever the number of `requests` in it)."""
        threads = self.solo_threads if self._runs_alone() else self.shared_threads
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._with_threads, function, threads)

    def _runs_alone(self) -> bool:
        """Whether this level's forwards are all the machine computes: what the router said with its last call
        (no other level of the hierarchy had a call in flight)."""
        return self._alone

    @staticmethod
    def _with_threads(function, threads: int):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return function()

    @serve.multiplexed(max_num_models_per_replica=TRACKED_REQUESTS)
    async def _track(self, request_id: str) -> str:
        return request_id

    def info(self) -> dict:
        return {"name": self.runner.name, "vocab_size": self.runner.vocab_size,
                "context_window": self.runner.context_window, "costs": self.level.costs.__dict__}

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int,
                     picks: SamplingParams | None = None, confidence: bool = False, alone: bool = False,
                     isolated: bool = False) -> Scores:
        await self._track(serve.get_multiplexed_model_id())
        self._alone = alone
        self._crash_on_fault_token(token_ids)
        return await self.level.logits(request_id, token_ids, num_logits, picks, confidence, isolated)

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          picks: SamplingParams | None = None, alone: bool = False, isolated: bool = False) -> Scores:
        await self._track(serve.get_multiplexed_model_id())
        self._alone = alone
        self._crash_on_fault_token(token_ids)
        return await self.level.tree_logits(request_id, token_ids, tree, picks, isolated)

    async def release(self, request_id: str) -> None:
        await self.level.release(request_id)

    async def forget_released(self) -> None:
        """Drop the caches kept of released requests (`LevelRunner.forget_released`): `bench-serve` between its
        phases, which send the same prompts again."""
        await self._on_compute(self.runner.forget_released, 1)

    def _crash_on_fault_token(self, token_ids: list[int]) -> None:
        if self._fault_token is not None and self._fault_token in token_ids:
            os._exit(137)

    def batching(self) -> dict:
        """Forwards run, the calls they served (calls per forward: the batch size) and the seconds they took
        (over the wall time: how busy the replica is); the requests whose KV caches it holds now; the prompt
        tokens new requests copied from other requests' caches (prefix caching)."""
        return {"forwards": self.level.forwards_run, "calls": self.level.calls_served,
                "forward_s": round(self.level.forward_s, 3), "cached_requests": self.runner.cached_requests(),
                "prefix_tokens_reused": self.runner.prefix_tokens_reused}

    async def process_id(self) -> int:
        """The process of the replica that calls for this multiplexed request id reach (the
        fault-injection test kills it)."""
        await self._track(serve.get_multiplexed_model_id())
        return os.getpid()


# A replica that dies mid-call (a crash, a node lost) is retried on another: every call carries the
# whole sequence, so the retry recomputes what the dead replica held and returns the same logits. A request whose
# call was in flight when its replica died is a suspect (it may be what killed it): its calls are retried one
# suspect at a time, each in a forward of its own, and a request whose calls were in flight at two deaths in a
# row fails alone (`LevelCrashed`) instead of taking more replicas, and other requests' forwards, down with it.
# A death shows as ActorDiedError, or as ActorUnavailableError where calls go over gRPC (Serve's throughput mode,
# which hierspec runs in) or Ray learns of it late; a replica unreachable for another reason counts the same. Two
# deaths means two replicas: a retry routed to the replica that already died (before Serve drops it) is retried.
# What that does not tell apart: an innocent suspect whose isolated call waits on a replica that another request
# kills (a second poison arriving at once, or another ingress replica's suspect: the one-at-a-time rule holds
# per ingress replica) fails too.
RETRY_BACKOFF_S = 0.25
RETRY_ATTEMPTS = 40
DEATHS_TO_FAIL = 2


class LevelCrashed(RuntimeError):
    """A request's level calls ended a level replica `DEATHS_TO_FAIL` times in a row; it is not retried."""


class RemoteLevel:
    """The router's view of a level deployment; calls for one request share a replica when they can.
    `peers`: the hierarchy's levels when they share a CPU machine's cores (None: each has its own device)."""

    def __init__(self, handle, info: dict):
        self.handle = handle
        self.name = info["name"]
        self.vocab_size = info["vocab_size"]
        self.context_window = info["context_window"]
        self.costs = CostModel(tuple(info["costs"]["rows"]), tuple(info["costs"]["ms"]))
        self.peers: list[RemoteLevel] | None = None
        self.computing = 0  # this router's calls in flight here
        self._deaths: dict[str, set] = {}  # request id -> the replicas that died in a row holding its calls
        self._suspects = asyncio.Lock()  # one suspect's call at a time

    @classmethod
    async def connect(cls, handle) -> RemoteLevel:
        return cls(handle, await handle.info.remote())

    def alone(self) -> bool:
        """Whether a call here now is all the shared cores compute: no other level has one of this router's calls
        in flight. Its forward then takes every core, however many requests it holds (under load the draft budget
        leaves the levels below idle most rounds; a target that kept a core per level would leave one unused)."""
        return self.peers is not None and not any(peer.computing for peer in self.peers if peer is not self)

    async def _counted(self, method: str, request_id: str, *args, **kwargs):
        self.computing += 1
        try:
            return await self._forward(method, request_id, *args, **kwargs, alone=self.alone())
        finally:
            self.computing -= 1

    async def _forward(self, method: str, request_id: str, *args, **kwargs):
        """A forward call, retried as the comment above RETRY_BACKOFF_S says."""
        for attempt in range(RETRY_ATTEMPTS):
            call = getattr(self.handle.options(multiplexed_model_id=request_id), method)
            try:
                if request_id not in self._deaths:
                    return await call.remote(request_id, *args, **kwargs)
                async with self._suspects:
                    result = await call.remote(request_id, *args, **kwargs, isolated=True)
                self._deaths.pop(request_id, None)
                return result
            except RayActorError as exc:  # ActorDiedError, ActorUnavailableError (a subclass): see above
                deaths = self._deaths.setdefault(request_id, set())
                deaths.add(exc.actor_id or f"unknown-{len(deaths)}")
                if len(deaths) >= DEATHS_TO_FAIL:
                    del self._deaths[request_id]
                    raise LevelCrashed(f"level {self.name}: {len(deaths)} replicas in a row died computing this "
                                       "request (the last in a forward of its own); it is not retried again") from None
                if attempt == RETRY_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(RETRY_BACKOFF_S)

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int,
                     picks: SamplingParams | None = None, confidence: bool = False) -> Scores:
        return await self._counted("logits", request_id, token_ids, num_logits, picks, confidence)

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          picks: SamplingParams | None = None) -> Scores:
        return await self._counted("tree_logits", request_id, token_ids, tree, picks)

    async def release(self, request_id: str) -> None:
        """Best effort: a replica that died took the request's cache with it, and an unused cache is evicted."""
        self._deaths.pop(request_id, None)
        with contextlib.suppress(RayActorError):
            await self.handle.options(multiplexed_model_id=request_id).release.remote(request_id)

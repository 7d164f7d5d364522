"""Continuous batching changes no output: each request's tokens are the same whichever requests share its
forwards, greedy and sampled, with token trees, multi-level drafts, long prompts prefilled in chunks, and a
request cancelled in the middle of a batch."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_sampling_exact import MODES, STOP, chi_square, params, tiny_drafter
from test_sampling_exact import VOCAB as TINY_VOCAB
from tiny_models import forget_prefixes, tiny_runner

from services.engine.batching import IN_PROCESS_WAIT_MS, BatchingLevel, BatchLimits
from services.engine.budget import CostModel, DraftBudget
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.sampling import SamplingParams

GREEDY = SamplingParams()
VOCAB = 32


@pytest.fixture(scope="module")
def levels():
    torch.set_num_threads(1)
    return {"draft": BatchingLevel(tiny_runner(5, vocab=VOCAB)), "target": BatchingLevel(tiny_runner(3, vocab=VOCAB))}


def prompts(count: int, long_every: int = 3) -> list[list[int]]:
    """Short prompts, and every few a long one (more than MAX_ROWS tokens: prefilled in several forwards)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (150 if i % long_every == 0 else 4 + i,), generator=generator).tolist()
            for i in range(count)]


async def _collect(generation) -> list[int]:
    return [token async for chunk in generation.stream() for token in chunk]


def run_together(decoder: HierarchicalDecoder, requests: list[list[int]], sampling: list[SamplingParams],
                 max_tokens: int = 24) -> list[list[int]]:
    forget_prefixes(decoder)

    async def main():
        return await asyncio.gather(*(_collect(decoder.start(p, s, max_tokens, frozenset()))
                                      for p, s in zip(requests, sampling)))
    return asyncio.run(main())


def hierarchies(levels) -> dict[str, HierarchicalDecoder]:
    draft, target = levels["draft"], levels["target"]
    return {"ar": HierarchicalDecoder([target], []),
            "hsd": HierarchicalDecoder([draft, target], [DraftPolicy(4)]),
            "hd": HierarchicalDecoder([target], [], proposer=tiny_drafter(3)),
            "hd+hsd": HierarchicalDecoder([draft, target], [DraftPolicy(3)], proposer=tiny_drafter(4))}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "coupled"])
def test_eight_concurrent_requests_each_equal_the_request_alone(levels, sampled):
    requests = prompts(8)
    sampling = [SamplingParams(temperature=0.9, seed=i) if sampled else GREEDY for i in range(8)]
    for name, decoder in hierarchies(levels).items():
        alone = [run_together(decoder, [p], [s])[0] for p, s in zip(requests, sampling)]
        forwards, calls = levels["target"].forwards_run, levels["target"].calls_served
        together = run_together(decoder, requests, sampling)
        assert together == alone, name
        batched_forwards = levels["target"].forwards_run - forwards
        batched_calls = levels["target"].calls_served - calls
        assert batched_calls >= 2 * batched_forwards, f"{name}: the requests' calls did not share forwards"


def test_a_long_prompt_shares_forwards_in_small_chunks(monkeypatch):
    """Chunked prefill: while other requests are active, a prompt longer than a forward computes `prompt_rows`
    rows per forward (alone, whole forwards of MAX_ROWS); the same tokens either way."""
    target = BatchingLevel(tiny_runner(3, vocab=VOCAB), BatchLimits(prompt_rows=8, wait_ms=IN_PROCESS_WAIT_MS))
    decoder = HierarchicalDecoder([target], [])
    requests = prompts(4, long_every=4)  # a 150-token prompt and three of 5 to 7 tokens
    assert target.costs  # measured (or probed) now: those forwards are not the requests'
    rows = []  # of each forward, the rows of each request in it
    step = target.runner.step

    def spy(works):
        rows.append([len(work.steps[0][0]) for work in works])
        return step(works)
    monkeypatch.setattr(target.runner, "step", spy)
    alone = run_together(decoder, requests[:1], [GREEDY])
    assert max(max(forward) for forward in rows) == 64
    rows.clear()
    assert run_together(decoder, requests, [GREEDY] * 4)[:1] == alone
    shared = [forward for forward in rows if len(forward) > 1]  # (the short ones end before the prompt does)
    assert shared and max(max(forward) for forward in shared) == 8


def test_a_request_cancelled_mid_batch_leaves_the_others_unchanged(levels):
    decoder = hierarchies(levels)["hsd"]
    requests = prompts(6)
    alone = [run_together(decoder, [p], [GREEDY])[0] for p in requests]

    async def main():
        tasks = [asyncio.ensure_future(_collect(decoder.start(p, GREEDY, 24, frozenset()))) for p in requests]
        await asyncio.sleep(0)
        for _ in range(20):  # a few rounds in: the victim has calls queued or computing
            await asyncio.sleep(0)
        tasks[2].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    forget_prefixes(decoder)
    together = asyncio.run(main())
    assert isinstance(together[2], asyncio.CancelledError)
    assert [t for i, t in enumerate(together) if i != 2] == [a for i, a in enumerate(alone) if i != 2]
    assert levels["target"].runner.cached_requests() == levels["draft"].runner.cached_requests() == 0


def test_a_prompt_cancelled_during_its_prefill_lets_the_level_rest():
    """A call whose prompt takes several forwards, cancelled after the first, with nothing else to run:
    the level's driver ends (it used to spin on the cancelled call until new work came)."""
    level = BatchingLevel(tiny_runner(3, vocab=VOCAB))
    prompt = prompts(1)[0]  # 150 tokens: three forwards

    async def main():
        call = asyncio.ensure_future(level.logits("victim", prompt, 1))
        while level.forwards_run == 0:
            await asyncio.sleep(0)
        call.cancel()
        for _ in range(50):
            await asyncio.sleep(0)
        return level._driver.done()

    assert asyncio.run(main())


def test_a_call_that_cannot_be_scored_fails_alone():
    """Two requests' calls in one forward, one with sampling parameters its scores cannot be made with (coupled
    without a seed): that call raises, the other gets its scores."""
    level = BatchingLevel(tiny_runner(3, vocab=VOCAB))
    bad = SamplingParams(temperature=0.9, sampler="coupled")

    async def main():
        return await asyncio.gather(level.logits("good", [1, 2, 3], 1, GREEDY), level.logits("bad", [4, 5, 6], 1, bad),
                                    return_exceptions=True)

    good, failed = asyncio.run(main())
    assert isinstance(failed, ValueError) and not isinstance(good, Exception)
    assert level.forwards_run == 1


def test_an_isolated_call_shares_no_forward():
    """A suspect's call (a replica died computing it) runs in a forward of its own, with the same scores; the calls
    around it share theirs."""
    level = BatchingLevel(tiny_runner(3, vocab=VOCAB))
    calls = [(f"r{i}", [1 + i, 2, 3, 4]) for i in range(4)]

    async def main(isolated: str | None):
        return await asyncio.gather(*(level.logits(rid, ids, 1, GREEDY, isolated=rid == isolated)
                                      for rid, ids in calls))

    shared = asyncio.run(main(None))
    assert (level.forwards_run, level.calls_served) == (1, 4)
    apart = asyncio.run(main("r1"))
    assert (level.forwards_run, level.calls_served) == (1 + 3, 4 + 4)  # r0 | r1 alone | r2 and r3
    assert [s.tokens for s in apart] == [s.tokens for s in shared]


@pytest.mark.parametrize("wait_ms", [200.0, 0.0])
def test_requests_between_rounds_share_the_next_forward(wait_ms):
    """A replica's forward waits for the next calls of the requests the last one answered (a router's round trip
    takes milliseconds): four requests whose calls come back 1 to 4 ms after their scores share every forward;
    without the wait they split into several forwards a round."""
    loop_thread = ThreadPoolExecutor(1)

    async def on_thread(function, requests):  # as a Serve replica runs its forwards: off the event loop
        return await asyncio.get_running_loop().run_in_executor(loop_thread, function)
    level = BatchingLevel(tiny_runner(3, vocab=VOCAB), BatchLimits(wait_ms=wait_ms), run=on_thread)

    async def request(k: int):
        ids = [1 + k, 2, 3]
        for _ in range(6):
            ids.append(int((await level.logits(f"r{k}", ids, 1, GREEDY)).tokens[0]))
            await asyncio.sleep((k + 1) / 1000)  # the router's round trip
        await level.release(f"r{k}")

    async def main():
        await asyncio.gather(*(request(k) for k in range(4)))
    start = time.perf_counter()
    asyncio.run(main())
    loop_thread.shutdown()
    assert level.calls_served == 24
    assert (level.forwards_run == 6) == (wait_ms > 0)
    assert time.perf_counter() - start < 1.0  # each wait ends when the calls are back, not after 200 ms


class Concurrently:
    """A decoder whose `generate` runs 8 requests at a time (the chi-square test calls it one by one):
    samples come from batched forwards."""

    def __init__(self, decoder: HierarchicalDecoder, width: int = 8):
        self.decoder, self.width, self.target = decoder, width, decoder.target
        self._ready: list = []

    def generate(self, prompt, params, max_tokens, stop_ids=frozenset()):
        if not self._ready:
            seeds = range(params.seed, params.seed + self.width)

            async def main():
                generations = [self.decoder.start(prompt, params.model_copy(update={"seed": s}), max_tokens, stop_ids)
                               for s in seeds]
                await asyncio.gather(*(_collect(g) for g in generations))
                return generations
            self._ready = asyncio.run(main())
        return self._ready.pop(0)


@pytest.mark.parametrize("mode", MODES)
def test_sampling_with_batched_forwards_matches_target(mode):
    torch.set_num_threads(1)
    small = BatchingLevel(tiny_runner(11, layers=1, vocab=TINY_VOCAB))
    target = BatchingLevel(tiny_runner(13, layers=1, vocab=TINY_VOCAB))
    decoder = HierarchicalDecoder([small, target], [2], proposer=tiny_drafter(2))
    # a fixed cost curve, not this machine's measurement of the tiny model: under load the draft budget keeps drafts
    # of 1-2 tokens on any machine, so that batched forwards verify (and reject) many drafted tokens
    decoder._budget = DraftBudget(CostModel((1, 64), (10.0, 40.0)), None)
    p, events = chi_square(Concurrently(decoder), params(mode, temperature=1.0), STOP)
    assert p > 1e-3 and events["rejected"] > 1000, events
    assert target.calls_served >= 4 * target.forwards_run, "samples did not share forwards"


def test_a_byte_bound_on_kv_caches_drops_the_least_recent_and_changes_no_output(levels):
    """Eight requests at once through a target whose kept caches may hold two empty caches' bytes: running
    requests' caches are dropped and their prefixes recomputed, yet each output is the request's alone."""
    runner = levels["target"].runner
    decoder = HierarchicalDecoder([levels["target"]], [], proposer=tiny_drafter(3))
    requests = prompts(8)
    alone = [run_together(decoder, [p], [GREEDY])[0] for p in requests]
    bound, dropped = 2 * runner.decoder.new_cache().nbytes(), runner.caches_dropped
    runner.max_cache_bytes = bound
    try:
        together = run_together(decoder, requests, [GREEDY] * len(requests))
        assert runner.cache_bytes() <= bound or len(runner._requests) == 1
    finally:
        runner.max_cache_bytes = None
    assert together == alone
    assert runner.caches_dropped > dropped + len(requests)


def test_a_cost_curve_cached_on_a_busy_machine_is_measured_again(tmp_path, monkeypatch):
    """Costs cached 1000x too slow (measured under load) are replaced by a new measurement; a curve faster than
    the probe is kept (load only adds time), and no output depends on either."""
    import json

    from services.engine import batching
    from services.engine.kernels import KernelChoices

    torch.set_num_threads(1)
    choices = KernelChoices(tmp_path / "choices.json")
    monkeypatch.setattr(batching, "kernel_choices", lambda: choices)
    runner = tiny_runner(3, vocab=VOCAB)
    measured = BatchingLevel(runner).costs
    [key] = [key for key in json.loads(choices.path.read_text())["choices"] if key.startswith("costs|")]
    for scale, replaced in ((1000.0, True), (0.001, False)):
        cached = [scale * ms for ms in measured.ms]
        choices.update(key, lambda _, cached=cached: {"rows": list(measured.rows), "ms": cached})
        costs = BatchingLevel(runner).costs
        stored = json.loads(choices.path.read_text())["choices"][key]["ms"]
        assert (costs.ms[0] < cached[0] / 10) == replaced and stored == list(costs.ms), scale
    # the probe finds the cache stale, but the machine got busy while the whole curve was measured again (fast at
    # 1 row, slow beyond): each row count keeps the faster figure (timings stand in for that machine's measurements)
    from services.engine.budget import CostModel

    def busy(rows=measured.rows, repeats=3):
        return CostModel(tuple(rows), tuple(1.0 if tuple(rows) == (1,) else 50.0 if n == 1 else 500.0 for n in rows))
    choices.update(key, lambda _: {"rows": list(measured.rows), "ms": [100.0] * len(measured.rows)})
    monkeypatch.setattr(runner, "measure_costs", busy)
    assert BatchingLevel(runner).costs.ms == (50.0,) + (100.0,) * (len(measured.rows) - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_chain_shaped_tree_is_verified_as_a_linear_draft_with_the_same_logits(dtype):
    """Under load the draft budget cuts most trees to a node or two: a chain is one linear continuation, whose rows
    read their key windows in place (a tree's rows gather theirs). Its logits are the tree layout's, bitwise, and
    a branching tree keeps the tree layout."""
    from services.engine.runner import LevelCall
    from services.engine.tree import TokenTree

    runner = tiny_runner(7, dtype=dtype, vocab=VOCAB)
    prompt = torch.randint(0, VOCAB, (140,), generator=torch.Generator().manual_seed(2)).tolist()

    def tree_of(*paths: list[int]) -> TokenTree:
        tree = TokenTree()
        for path in paths:
            tree.add_path(path, "context", 8)
        return tree
    chain, branching = tree_of([3, 9, 4]), tree_of([3, 9], [5])
    for request, tree in (("chain", chain), ("branching", branching)):
        work = runner.begin(LevelCall(request, prompt, tree=tree))
        assert (work.steps[-1][2] is None) == (tree is chain)
        runner.release(request)

    as_tree = runner.begin(LevelCall("forced", prompt, tree=chain))
    tokens, wanted, _ = as_tree.steps[-1]
    as_tree.steps[-1] = (tokens, wanted, list(range(-1, len(tokens) - 1)))  # the tree layout, as before
    while as_tree.steps:
        runner.step([as_tree])
    assert torch.equal(runner.tree_logits("chain", prompt, chain), as_tree.logits)

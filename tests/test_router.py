"""The router and the HTTP text assembly, on tiny models in one process: bounds, timeouts,
cancellation, pipelining, stop strings."""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import tiny_runner

from services.engine.batching import BatchingLevel
from services.engine.hsd import HierarchicalDecoder
from services.engine.sampling import SamplingParams
from services.serve.openai_api import TextAssembler
from services.serve.router import Overloaded, RequestTimeout, Router

GREEDY = SamplingParams()
PROMPT = [1, 2, 3, 4]


class SlowLevel(BatchingLevel):
    """A level that takes `delay` seconds per call, yielding to the event loop like a remote one."""

    def __init__(self, runner, delay: float):
        super().__init__(runner)
        self.delay = delay
        self.calls = self.active = self.most_active = 0

    async def logits(self, request_id, token_ids, num_logits, picks=None, confidence=False):
        self.calls += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return await super().logits(request_id, token_ids, num_logits, picks, confidence)


def _router(delay: float = 0.0, **kwargs) -> tuple[Router, SlowLevel]:
    level = SlowLevel(tiny_runner(3, vocab=32), delay)
    return Router(HierarchicalDecoder([level], []), **{"max_in_flight": 4, "timeout_s": 60.0, **kwargs}), level


async def _collect(router: Router, generation) -> list[int]:
    return [t async for tokens in router.rounds(generation) for t in tokens]


def test_router_output_equals_the_decoder():
    router, level = _router()
    plain = HierarchicalDecoder([level.runner], []).generate(PROMPT, GREEDY, 20).token_ids
    assert asyncio.run(_collect(router, router.start(PROMPT, GREEDY, 20, frozenset()))) == plain
    assert router.in_flight == 0 and level.runner.cached_requests() == 0


def test_overload_is_refused_and_counted_requests_come_back():
    async def main():
        router, _ = _router(delay=0.01, max_in_flight=2)
        running = [asyncio.create_task(_collect(router, router.start(PROMPT, GREEDY, 5, frozenset())))
                   for _ in range(2)]
        await asyncio.sleep(0.005)
        with pytest.raises(Overloaded):
            router.start(PROMPT, GREEDY, 5, frozenset())
        await asyncio.gather(*running)
        router.start(PROMPT, GREEDY, 5, frozenset())  # room again

    asyncio.run(main())


def test_a_request_holds_its_place_before_its_stream_begins():
    """A streamed reply's rounds begin only once the response starts: requests accepted but not yet
    streaming must count against max_in_flight, and one dropped unread gives its place back."""
    router, _ = _router(max_in_flight=2)
    first = router.start(PROMPT, GREEDY, 5, frozenset())
    second = router.start(PROMPT, GREEDY, 5, frozenset())
    with pytest.raises(Overloaded):
        router.start(PROMPT, GREEDY, 5, frozenset())
    del second  # a client gone before its stream began
    assert router.in_flight == 1
    asyncio.run(_collect(router, first))
    assert router.in_flight == 0


def test_timeout_ends_the_request_and_frees_its_caches():
    async def main():
        router, level = _router(delay=0.05, timeout_s=0.12)
        with pytest.raises(RequestTimeout):
            await _collect(router, router.start(PROMPT, GREEDY, 50, frozenset()))
        assert router.in_flight == 0 and level.runner.cached_requests() == 0

    asyncio.run(main())


def test_a_client_that_goes_away_cancels_the_work():
    async def main():
        router, level = _router(delay=0.02)
        task = asyncio.create_task(_collect(router, router.start(PROMPT, GREEDY, 200, frozenset())))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        calls = level.calls
        await asyncio.sleep(0.1)
        assert level.calls == calls < 200  # nothing runs after the cancellation
        assert router.in_flight == 0 and level.runner.cached_requests() == 0

    asyncio.run(main())


class SlowRelease(BatchingLevel):
    """A level whose release waits first, as a replica's waits for its compute thread."""

    releasing = False

    async def release(self, request_id, keep_prefix=True):
        self.releasing = True
        await asyncio.sleep(0.05)
        await super().release(request_id, keep_prefix)


def test_a_generation_cancelled_while_it_releases_still_releases():
    """A client gone (or a stop string, a timeout) just as its generation ends cancels it during the release of
    its caches: the release still completes."""
    async def main():
        level = SlowRelease(tiny_runner(3, vocab=32))
        generation = HierarchicalDecoder([level], []).start(PROMPT, GREEDY, 3, frozenset())

        async def consume():
            async for _ in generation.stream():
                pass
        task = asyncio.create_task(consume())
        while not level.releasing:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert level.runner.cached_requests() == 0

    asyncio.run(main())


@pytest.mark.parametrize("pipelined", [True, False])
def test_pipelined_router_overlaps_requests_and_sequential_does_not(pipelined):
    async def main():
        router, level = _router(delay=0.01, pipelined=pipelined)
        outs = await asyncio.gather(*(_collect(router, router.start(PROMPT, GREEDY, 5, frozenset()))
                                      for _ in range(4)))
        return level.most_active, outs

    most_active, outs = asyncio.run(main())
    assert all(out == outs[0] for out in outs)
    assert (most_active == 4) if pipelined else (most_active == 1)


class CharTokenizer:
    """Token i is chr(i); a stand-in for detokenization with multi-token stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _assemble(text: str, stops: list[str], step: int = 1) -> tuple[str, bool]:
    return _assembled(text, stops, step)[:2]


def _assembled(text: str, stops: list[str], step: int = 1) -> tuple[str, bool, int]:
    assembler = TextAssembler(CharTokenizer(), stops)
    out = []
    ids = [ord(c) for c in text]
    for i in range(0, len(ids), step):
        out.append(assembler.add(ids[i:i + step]))
        if assembler.stopped:
            break
    else:
        out.append(assembler.flush())
    return "".join(out), assembler.stopped, assembler.tokens_used


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stop_strings_cut_the_text_wherever_rounds_end(step):
    assert _assemble("hello END world", ["END"], step) == ("hello ", True)
    assert _assemble("hello EN", ["END"], step) == ("hello EN", False)  # a partial match is sent at the end
    assert _assemble("a\nb", ["\n", "b"], step) == ("a", True)
    assert _assemble("no stop here", [], step) == ("no stop here", False)


@pytest.mark.parametrize("step", [1, 2, 5, 20])
def test_overlapping_stop_strings_cut_where_plain_decoding_cuts(step):
    """Plain decoding commits one token per round: "```" completes first and cuts before it. A round
    that commits the whole text at once must cut at the same place and count the same tokens."""
    text, stopped, used = _assembled("code\n```\nmore", ["```", "\n```\n"], step)
    assert (text, stopped, used) == ("code\n", True, len("code\n```"))


@pytest.mark.parametrize("draft_seed", [3, 5])  # 3: the draft is the target (all accepted); 5: a different model
def test_lookahead_drafts_during_verification_without_changing_the_output(draft_seed):
    from services.engine.hsd import DraftPolicy

    target = SlowLevel(tiny_runner(3, vocab=32), 0.005)
    draft = SlowLevel(tiny_runner(draft_seed, vocab=32), 0.001)
    plain = HierarchicalDecoder([target.runner], []).generate(PROMPT, GREEDY, 40).token_ids
    decoder = HierarchicalDecoder([draft, target], [DraftPolicy(4)], lookahead=True)

    async def run():
        generation = decoder.start(PROMPT, GREEDY, 40, frozenset())
        tokens = [t async for chunk in generation.stream() for t in chunk]
        return tokens, generation.stats

    tokens, stats = asyncio.run(run())
    assert tokens == plain
    assert (stats.lookahead_used > 0) if draft_seed == 3 else True
    assert target.runner.cached_requests() == draft.runner.cached_requests() == 0


def test_lookahead_follows_its_switch_between_rounds():
    """The Serve app turns lookahead off while one request runs alone on a CPU machine (its levels
    then take every core): the switch is read every round, and the output never depends on it."""
    from services.engine.hsd import DraftPolicy

    target = SlowLevel(tiny_runner(3, vocab=32), 0.005)
    draft = SlowLevel(tiny_runner(3, vocab=32), 0.001)
    plain = HierarchicalDecoder([target.runner], []).generate(PROMPT, GREEDY, 40).token_ids
    switch = {"on": False}
    decoder = HierarchicalDecoder([draft, target], [DraftPolicy(4)], lookahead=lambda: switch["on"])

    async def run(on: bool):
        switch["on"] = on
        generation = decoder.start(PROMPT, GREEDY, 40, frozenset())
        return [t async for chunk in generation.stream() for t in chunk], generation.stats

    off_tokens, off_stats = asyncio.run(run(False))
    on_tokens, on_stats = asyncio.run(run(True))
    assert off_tokens == on_tokens == plain
    assert off_stats.lookahead_used == 0 < on_stats.lookahead_used


def test_a_level_takes_every_core_while_no_other_level_computes():
    """On a CPU machine the router tells a level's replica to use every core while no other level has a call in
    flight, however many requests its forward holds: under load the draft budget leaves the levels below idle
    most rounds, and a target kept to its share of the cores would leave the rest unused."""
    from services.serve.level_service import RemoteLevel

    class Recorded(RemoteLevel):
        """A level whose calls wait for `gate` and record what the router said."""

        def __init__(self, gate: asyncio.Event):
            super().__init__(None, {"name": "x", "vocab_size": 32, "context_window": 64,
                                    "costs": {"rows": [1], "ms": [1.0]}})
            self.gate, self.said = gate, []

        async def _forward(self, method, request_id, *args, alone: bool, **kwargs):
            self.said.append(alone)
            await self.gate.wait()

    async def main():
        gate = asyncio.Event()
        gate.set()
        draft, target = Recorded(gate), Recorded(gate)
        await target.logits("r0", PROMPT, 1)  # levels on devices of their own: never told to take the cores
        assert target.said == [False]
        draft.peers = target.peers = [draft, target]
        gate.clear()
        calls = [asyncio.create_task(target.logits(f"r{i}", PROMPT, 1)) for i in range(8)]
        await asyncio.sleep(0)
        calls.append(asyncio.create_task(draft.logits("r9", PROMPT, 4)))  # the target is computing
        await asyncio.sleep(0)
        calls.append(asyncio.create_task(target.logits("r10", PROMPT, 1)))  # and now the draft level too
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*calls)
        assert target.said[1:] == [True] * 8 + [False] and draft.said == [False]
        assert draft.computing == target.computing == 0
        await draft.logits("r11", PROMPT, 4)
        assert draft.said[-1] is True

    asyncio.run(main())

"""Load-aware speculation (services.engine.budget): drafts shrink as load grows, each request's by its own
acceptance, and a request the budget gave no draft keeps learning from the drafter's unverified guesses."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from test_batching import VOCAB, prompts
from test_sampling_exact import tiny_drafter
from tiny_models import tiny_runner

from services.engine.batching import BatchingLevel
from services.engine.budget import CostModel, DraftBudget
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.sampling import SamplingParams

# a forward costs 10 ms plus a little per row: reading the weights dominates, as on a CPU at a few rows
CURVE = CostModel((1, 64), (10.0, 60.0))


def test_the_draft_shrinks_as_load_grows_down_to_plain_decoding():
    budget = DraftBudget(CURVE, None, alpha=0.5)
    sizes = [budget.tokens(load, 8) for load in (1, 2, 4, 16, 64)]
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 0, sizes


def test_each_request_drafts_by_its_own_acceptance():
    """Two requests in one batch: the one whose drafts were accepted drafts longer than the one whose were not;
    a request with no rounds yet starts from the batch's acceptance."""
    budget = DraftBudget(CURVE, None, alpha=0.5)
    copying = chatting = None
    for _ in range(12):
        copying = budget.observe(4, 4, copying)
        chatting = budget.observe(4, 0, chatting)
    assert chatting < budget.alpha < copying
    assert budget.tokens(4, 8, copying) > budget.tokens(4, 8, None) >= budget.tokens(4, 8, chatting) == 0
    assert budget.observe(0, 0, None) is None and budget.observe(2, 1, None) is not None
    batch = budget.alpha
    assert budget.guessed(True, chatting) > chatting and budget.alpha == batch  # a guess is the request's alone
    assert budget.guessed(False, copying) < copying and budget.guessed(False, None) < batch


def _generations(decoder: HierarchicalDecoder, requests: list[list[int]], max_tokens: int = 24,
                 acceptance: float | None = None):
    async def one(prompt):
        generation = decoder.start(prompt, SamplingParams(), max_tokens, frozenset())
        generation.acceptance = acceptance
        async for _ in generation.stream():
            pass
        return generation

    async def main():
        return await asyncio.gather(*(one(prompt) for prompt in requests))
    return asyncio.run(main())


class _Recording(DraftBudget):
    """The engine's budget, keeping every draft length it gives (it is only asked under load) and the request's
    acceptance it was given for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given: list[int] = []
        self.asked: list[float | None] = []

    def tokens(self, load: int, most: int, alpha: float | None = None) -> int:
        self.asked.append(alpha)
        self.given.append(super().tokens(load, most, alpha))
        return self.given[-1]


def test_the_planner_guesses_from_trees_that_had_a_node():
    """The load simulation's one-token guess (the engine's, see `HierarchicalDecoder.verify_at`): drawn from the
    measured trees that had a node, a hit where the tree's path was accepted; no guess where none had a node."""
    from deploy.planner.latency import TreeTable
    from deploy.planner.load import _Rounds
    from deploy.planner.optimizer import Plan, Tables

    def guesses(nodes: list[int], accepted: list[int]) -> list[bool | None]:
        tables = Tables(costs={}, pairs={}, trees={"t": TreeTable(nodes, accepted, drafter_ms=0.0)})
        rounds, rng = _Rounds(Plan(models=["t"], drafter=True), tables, tables), np.random.default_rng(0)
        return [rounds.guess(rng) for _ in range(200)]
    drawn = guesses([0, 3, 3, 0], [0, 2, 0, 0])
    assert set(drawn) == {True, False} and 0.35 < drawn.count(True) / len(drawn) < 0.65
    assert set(guesses([0, 0], [0, 0])) == {None}


def test_a_request_without_draft_room_learns_from_guesses_and_drafts_again():
    """The budget starts certain that nothing is accepted (alpha 0): under load it gives no request a draft.
    The drafter has seen every answer (the model database, from runs alone), so its one-token guesses, never
    verified, match some of the target's tokens; the requests' acceptance rises and drafts come back under
    load, with the output plain decoding's."""
    torch.set_num_threads(1)
    target = BatchingLevel(tiny_runner(3, vocab=VOCAB))
    requests = prompts(4, long_every=100)
    plain = [g.token_ids for g in _generations(HierarchicalDecoder([target], []), requests)]
    hd = HierarchicalDecoder([target], [], proposer=tiny_drafter(3))
    for prompt in requests:  # alone: full trees, and the model database learns each answer
        _generations(hd, [prompt])
    hd._budget = budget = _Recording(CURVE, None, alpha=0.0)
    propose, guesses = hd.proposer.propose, []

    def spied(request_id, context, max_depth, max_nodes=None):
        tree = propose(request_id, context, max_depth, max_nodes)
        if (max_depth, max_nodes) == (1, 1):
            guesses.append(request_id)
        return tree
    hd.proposer.propose = spied
    together = _generations(hd, requests)
    assert [g.token_ids for g in together] == plain
    assert budget.given[0] == 0 and max(budget.given) > 0, budget.given
    assert {g.id for g in together} <= set(guesses) and any(alpha is not None for alpha in budget.asked)
    assert all(g.acceptance is not None and g.acceptance > 0 for g in together), [g.acceptance for g in together]


def test_a_draft_model_hierarchy_sizes_drafts_by_the_batch_acceptance():
    """A request of a hierarchy of models that stopped drafting has nothing to keep its own acceptance current
    (a guess would take the draft model's forward): its budget is the batch's, whatever the request holds."""
    torch.set_num_threads(1)
    levels = [BatchingLevel(tiny_runner(5, vocab=VOCAB)), BatchingLevel(tiny_runner(3, vocab=VOCAB))]
    for proposer in (None, tiny_drafter(3)):  # hsd, hd+hsd
        hsd = HierarchicalDecoder(levels, [DraftPolicy(4)], proposer=proposer)
        hsd._budget = budget = _Recording(CURVE, None, alpha=0.9)
        together = _generations(hsd, prompts(3, long_every=100), acceptance=0.01)
        assert budget.given and budget.asked == [None] * len(budget.given)
        assert all(g.acceptance == 0.01 for g in together)


def test_a_draft_begun_alone_ends_when_others_arrive():
    """A request that starts alone drafts the plan's T_i, one forward of the draft level at a time. Requests that
    arrive meanwhile would wait for all of it at the target: the draft ends where the budget at the new load says
    (here 1 token), and every output is still plain decoding's."""
    torch.set_num_threads(1)
    levels = [BatchingLevel(tiny_runner(5, vocab=VOCAB)), BatchingLevel(tiny_runner(3, vocab=VOCAB))]
    requests = prompts(4, long_every=100)
    plain = [g.token_ids for g in _generations(HierarchicalDecoder([levels[-1]], []), requests)]
    hsd = HierarchicalDecoder(levels, [DraftPolicy(16)])
    hsd._budget = DraftBudget(CURVE, None, alpha=0.5)
    assert hsd._budget.tokens(len(requests), 16) == 1
    drafts: list[tuple[str, int]] = []  # (request, tokens the target verified) per target round
    verify = hsd._verify_draft

    async def spied(req, level_index, seq, draft, min_confidence=0.0):
        if level_index == 1:
            drafts.append((req.id, len(draft.tokens)))
        return await verify(req, level_index, seq, draft, min_confidence)
    hsd._verify_draft = spied

    async def main():
        async def run(generation):
            async for _ in generation.stream():
                pass
            return generation
        first = hsd.start(requests[0], SamplingParams(), 24, frozenset())
        started = asyncio.ensure_future(run(first))
        while first.stats.levels[0].forwards < 2:  # its draft is under way, alone
            await asyncio.sleep(0)
        others = [hsd.start(prompt, SamplingParams(), 24, frozenset()) for prompt in requests[1:]]
        return await asyncio.gather(started, *(run(g) for g in others))
    together = asyncio.run(main())
    assert [g.token_ids for g in together] == plain
    first_draft = next(n for rid, n in drafts if rid == together[0].id)
    assert 2 <= first_draft < 16, drafts
    assert together[0].stats.levels[0].budget_limited >= 1

"""Speculative sampling is exact: the first tokens follow the target's own (warped) distribution.

The oracle is the target's exact distribution over its first three tokens (or
fewer, when a stop token ends the text first), computed by enumerating every
sequence, and the check a chi-square test over 8,000 speculative samples, in
both sampling modes: the rejection sampler and coupled (Gumbel) sampling. A
verifier with a classic bug (sampling the correction from p instead of the
residual max(0, p - q)), and coupled noise that ignores the position, must
fail it. Each test also asserts that the events it is there to exercise
(rejections, rejected tree candidates, confidence stops, a stop token inside a
draft) happened.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from sim_levels import RandomChooser
from tiny_models import tiny_runner

from drafter_db import table
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.model_db import ModelDB
from drafter_db.stores import EmbeddedStore, full_key
from services.engine import sampling
from services.engine.batching import BatchingLevel
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.sampling import SamplingParams, sample
from services.engine.switching import SwitchingDecoder
from services.engine.tree import TokenTree
from services.engine.verify import RejectionSampler

PROMPT = [1, 4, 2]
NUM_TOKENS = 3
NUM_SAMPLES = 8_000
# the events a test is there to exercise must be common, not flukes: at least 1 sample in 20 (MANY)
# or 1 in 200 (SOME) on average
MANY = NUM_SAMPLES // 20
SOME = NUM_SAMPLES // 200
VOCAB = 6
STOP = frozenset({5})
MODES = ["rejection", "coupled"]


class ResidualIgnoringSampler(RejectionSampler):
    """Broken on purpose: after a rejection it samples from p, not from max(0, p - q)."""

    def recover(self, rejected_token, draft_row, target_row, generator):
        return sample(target_row, generator)


class CountingSampler(RejectionSampler):
    """Counts tree nodes whose first candidate was rejected and another candidate then tried."""

    def __init__(self):
        self.tree_second_tries = 0

    def sampled_tree(self, tree, target_probs, generator):
        verdict = super().sampled_tree(tree, target_probs, generator)
        node = -1
        for step in [*verdict.path, None]:
            children = list(tree.children(node).values())
            if len(children) > 1 and (step is None or children.index(step) > 0):
                self.tree_second_tries += 1
            node = step if step is not None else node
        return verdict


def exact_distribution(target, params: SamplingParams, stop_ids=frozenset()) -> dict[tuple, float]:
    """Outcome -> probability; an outcome is the generated tokens, with "stop" appended when a stop
    token ended the text before NUM_TOKENS tokens."""
    probs: dict[tuple, float] = {}

    def walk(prefix: list[int], p: float) -> None:
        if len(prefix) == NUM_TOKENS:
            probs[tuple(prefix)] = p
            return
        row = params.probs(target.logits("exact", PROMPT + prefix, 1))[0]
        for token in range(VOCAB):
            if token in stop_ids:
                probs[(*prefix, "stop")] = probs.get((*prefix, "stop"), 0.0) + p * float(row[token])
            else:
                walk(prefix + [token], p * float(row[token]))

    walk([], 1.0)
    target.release("exact")
    return probs


def chi_square(decoder: HierarchicalDecoder, params: SamplingParams, stop_ids=frozenset()) -> tuple[float, dict]:
    """(p-value, events): the events counted over all samples."""
    expected = exact_distribution(decoder.target.runner, params, stop_ids)
    counts = dict.fromkeys(expected, 0)
    events = dict.fromkeys(["rejected", "tree_rejected", "confidence_stops", "stop_token_drafts"], 0)
    for i in range(NUM_SAMPLES):
        generation = decoder.generate(PROMPT, params.model_copy(update={"seed": i}), NUM_TOKENS, stop_ids)
        outcome = (*generation.token_ids, "stop") if generation.finish_reason == "stop" else tuple(generation.token_ids)
        counts[outcome] += 1
        stats = generation.stats
        events["rejected"] += sum(level.drafted - level.accepted for level in stats.levels)
        events["tree_rejected"] += sum(source.drafted - source.accepted for source in stats.sources.values())
        events["confidence_stops"] += sum(level.confidence_stops for level in stats.levels)
        events["stop_token_drafts"] += sum(level.stop_token_drafts for level in stats.levels)
    # merge cells with small expected counts into one bin so the chi-square approximation holds
    cells = sorted(expected, key=expected.get)
    observed_bins, expected_bins, small_obs, small_exp = [], [], 0, 0.0
    for cell in cells:
        e = expected[cell] * NUM_SAMPLES
        if e < 5:
            small_obs += counts[cell]
            small_exp += e
        else:
            observed_bins.append(counts[cell])
            expected_bins.append(e)
    if small_exp > 0:
        observed_bins.append(small_obs)
        expected_bins.append(small_exp)
    expected_arr = np.array(expected_bins)
    expected_arr *= NUM_SAMPLES / expected_arr.sum()
    return float(chisquare(observed_bins, expected_arr).pvalue), events


def params(mode: str, **kwargs) -> SamplingParams:
    return SamplingParams(sampler=mode, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return {
        "small": tiny_runner(11, layers=1, vocab=VOCAB),
        "middle": tiny_runner(12, "qwen2", layers=1, vocab=VOCAB),
        "target": tiny_runner(13, layers=1, vocab=VOCAB),
    }


@pytest.mark.parametrize("mode", MODES)
def test_two_level_sampling_with_a_stop_token_matches_target(tiny, mode):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2])
    p, events = chi_square(decoder, params(mode, temperature=1.0), STOP)
    assert p > 1e-3
    assert events["rejected"] > MANY and events["stop_token_drafts"] > SOME, events


@pytest.mark.parametrize("mode", MODES)
def test_three_level_sampling_matches_target(tiny, mode):
    decoder = HierarchicalDecoder([tiny["small"], tiny["middle"], tiny["target"]], [2, 3])
    p, events = chi_square(decoder, params(mode, temperature=0.8, top_k=5, top_p=0.95))
    assert p > 1e-3 and events["rejected"] > MANY, events


def test_broken_verifier_fails_the_same_test(tiny):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2], sampler=ResidualIgnoringSampler())
    assert chi_square(decoder, params("rejection", temperature=1.0))[0] < 1e-3


def test_coupled_noise_that_ignores_the_position_fails_the_same_test(tiny, monkeypatch):
    """Planted bug: every position draws the same noise, so the tokens of a text are not independent."""
    real = sampling.gumbel
    monkeypatch.setattr(sampling, "gumbel", lambda seed, positions, token_ids: real(seed, 0 * positions, token_ids))
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2])
    assert chi_square(decoder, params("coupled", temperature=1.0))[0] < 1e-3


def tiny_drafter(seed: int) -> HierarchicalDrafter:
    """All three databases filled with random sequences over the tiny vocabulary, so that trees
    mix context, model and statistics candidates."""
    from drafter_db.drafter import HierarchicalDrafter

    gen = torch.Generator().manual_seed(seed)
    model_db = ModelDB(max_key=2, length=3)
    model_db.add_output(torch.randint(0, VOCAB, (12,), generator=gen).tolist())  # sparse: leaves room for the rest
    store = EmbeddedStore()
    counted = table.count_ngrams(torch.randint(0, VOCAB, (400,), generator=gen).tolist(), 2, 3)
    store.set_many({full_key("tiny", key): table.encode(table.merge([], ((c, t) for t, c in conts.items()), 3))
                    for key, conts in counted.items()})
    config = DrafterConfig(max_key=2, min_context_key=1, max_depth=3, max_candidates=3, max_nodes=6,
                           min_share=0.0, min_count=1)
    return HierarchicalDrafter(config, model_db, StatisticsDB(store, "tiny"))


class OnEveryOtherCall:
    """A drafter that proposes nothing on every other call (a rule on the past only, so drafts stay
    proposals), so the level above it also takes one-token steps of its own."""

    def __init__(self, drafter: HierarchicalDrafter):
        self.drafter = drafter
        self.calls = 0

    def propose(self, request_id, context, max_depth, max_nodes=None):
        self.calls += 1
        return self.drafter.propose(request_id, context, max_depth, max_nodes) if self.calls % 2 else TokenTree()

    def __getattr__(self, name):
        return getattr(self.drafter, name)


@pytest.mark.parametrize("mode", MODES)
def test_tree_drafts_sampling_matches_target(tiny, mode):
    counting = CountingSampler()
    decoder = HierarchicalDecoder([tiny["target"]], [], proposer=tiny_drafter(1), sampler=counting)
    p, events = chi_square(decoder, params(mode, temperature=1.0))
    assert p > 1e-3 and events["tree_rejected"] > MANY, events
    if mode == "rejection":  # several candidates at a node: the recursive rejection went past the first
        assert counting.tree_second_tries > SOME
    # a fresh drafter: this one's model DB has learnt from every sample's output and now answers everything
    decoder = HierarchicalDecoder([tiny["target"]], [], proposer=tiny_drafter(1))
    sources = set()
    for seed in range(200):
        sources |= set(decoder.generate(PROMPT, params(mode, temperature=1.0, seed=seed), NUM_TOKENS).stats.sources)
    assert sources == {"context", "model", "statistics"}


@pytest.mark.parametrize("mode", MODES)
def test_tree_drafts_under_a_model_level_sampling_matches_target(tiny, mode):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2], proposer=tiny_drafter(2))
    p, events = chi_square(decoder, params(mode, temperature=0.9, top_p=0.9), STOP)
    assert p > 1e-3 and events["tree_rejected"] > MANY and events["stop_token_drafts"] > SOME, events


@pytest.mark.parametrize("mode", MODES)
def test_confidence_stop_over_tree_drafts_sampling_matches_target(tiny, mode):
    """The level under the target ends its batch after an unsure one-token step of its own (the
    database drafter had no tree there): a stopping rule on its own output, so still exact."""
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [DraftPolicy(3, 0.4)],
                                  proposer=OnEveryOtherCall(tiny_drafter(4)))
    p, events = chi_square(decoder, params(mode, temperature=1.0))
    assert p > 1e-3 and events["confidence_stops"] > SOME and events["tree_rejected"] > SOME, events


@pytest.mark.parametrize("mode", MODES)
def test_switching_hierarchies_every_round_sampling_matches_target(tiny, mode):
    small, middle, target = (BatchingLevel(tiny[name]) for name in ("small", "middle", "target"))
    drafter = tiny_drafter(3)
    members = [HierarchicalDecoder([target], [], proposer=drafter),
               HierarchicalDecoder([small, target], [2]),
               HierarchicalDecoder([small, middle, target], [1, 2], proposer=drafter)]
    decoder = SwitchingDecoder(members, ["hd", "hsd", "hd+hsd"], RandomChooser(len(members), seed=5))
    p, events = chi_square(decoder, params(mode, temperature=1.0), STOP)
    assert p > 1e-3 and events["rejected"] > SOME and events["tree_rejected"] > SOME, events


def auto_decoder(tiny) -> SwitchingDecoder:
    """`auto` over tiny levels with its real chooser: a profile of two calibration categories measured on
    these levels, cost curves that put HD and plain decoding close, so the chooser switches plan between
    rounds of a request depending on the tokens its rounds committed."""
    import asyncio

    from deploy.builder import assemble
    from deploy.planner.auto import CategoryChooser
    from deploy.planner.latency import CostCurve
    from deploy.planner.optimizer import Plan
    from deploy.planner.profiler import CategoryProfile, Profile, measure_category

    small, target = tiny["small"], tiny["target"]
    levels = {small.name: BatchingLevel(small), target.name: BatchingLevel(target)}
    order = [small.name, target.name]
    drafter = tiny_drafter(5)
    plain = HierarchicalDecoder([target], [])
    categories = {}
    for label, first in (("even", 0), ("odd", 1)):
        prompts = [[first + 2 * k % VOCAB, 3, k % VOCAB] for k in range(3)]
        texts = [plain.generate(p, SamplingParams(), 12).token_ids for p in prompts]
        categories[label] = CategoryProfile()
        asyncio.run(measure_category(levels, order, drafter, prompts, texts, 4, categories[label]))
    costs = {small.name: CostCurve(tokens=[1, 8], ms=[2.0, 3.0]),
             target.name: CostCurve(tokens=[1, 8], ms=[10.0, 20.0])}
    profile = Profile(target=target.name, drafts=[small.name], max_draft=4, costs=costs, categories=categories)
    plans = [Plan(models=[target.name], drafter=True), Plan(models=order, draft_tokens=[2]), Plan(models=[target.name])]
    members = [assemble(plan, [levels[m] for m in plan.models], lambda: drafter) for plan in plans]
    chooser = CategoryChooser(profile, plans, drafter)
    return SwitchingDecoder(members, [plan.describe() for plan in plans], chooser, proposer=drafter)


def test_auto_chooser_is_exact_greedy(tiny):
    decoder, plain = auto_decoder(tiny), HierarchicalDecoder([tiny["target"]], [])
    switched = 0
    for k in range(60):
        prompt = [k % VOCAB, (k // VOCAB) % VOCAB, 2]
        out = decoder.generate(prompt, SamplingParams(), 12)
        assert out.token_ids == plain.generate(prompt, SamplingParams(), 12).token_ids
        switched += len(out.stats.plans_used) > 1
    assert switched > 5, "the chooser never switched plan within a request: the test would prove little"


@pytest.mark.parametrize("mode", MODES)
def test_auto_chooser_sampling_matches_target(tiny, mode):
    decoder = auto_decoder(tiny)
    switched = []
    generate = decoder.generate

    def counting(*args, **kwargs):
        generation = generate(*args, **kwargs)
        switched.append(len(generation.stats.plans_used) > 1)
        return generation

    decoder.generate = counting
    p, _ = chi_square(decoder, params(mode, temperature=1.0))
    assert p > 1e-3 and sum(switched) > MANY, sum(switched)

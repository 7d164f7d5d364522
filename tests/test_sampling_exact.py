"""Speculative sampling is exact: the first tokens follow the target's own (warped) distribution.

The oracle is the target's exact distribution over the first three tokens,
computed by enumerating every sequence, and the check a chi-square test over
20,000 speculative samples. A verifier with a classic bug (sampling the
correction from p instead of the residual max(0, p - q)) must fail it.
"""

from __future__ import annotations

import itertools

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
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.levels import LocalLevel
from services.engine.sampling import SamplingParams, sample
from services.engine.switching import SwitchingDecoder
from services.engine.verify import RejectionSampler

PROMPT = [1, 4, 2]
NUM_TOKENS = 3
NUM_SAMPLES = 20_000
VOCAB = 6


class ResidualIgnoringSampler(RejectionSampler):
    """Broken on purpose: after a rejection it samples from p, not from max(0, p - q)."""

    def recover(self, rejected_token, draft_row, target_row, generator):
        return sample(target_row, generator)


def exact_distribution(target, params: SamplingParams) -> dict[tuple[int, ...], float]:
    probs: dict[tuple[int, ...], float] = {}
    for seq in itertools.product(range(VOCAB), repeat=NUM_TOKENS):
        p = 1.0
        for t in range(NUM_TOKENS):
            logits = target.logits("exact", PROMPT + list(seq[:t]), 1)
            p *= float(params.probs(logits)[0, seq[t]])
        probs[seq] = p
    target.release("exact")
    return probs


def chi_square_p(decoder: HierarchicalDecoder, params: SamplingParams) -> float:
    expected = exact_distribution(decoder.target.runner, params)
    counts = dict.fromkeys(expected, 0)
    for i in range(NUM_SAMPLES):
        generation = decoder.generate(PROMPT, params.model_copy(update={"seed": i}), NUM_TOKENS)
        counts[tuple(generation.token_ids)] += 1
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
    return float(chisquare(observed_bins, expected_arr).pvalue)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return {
        "small": tiny_runner(11, layers=1, vocab=VOCAB),
        "middle": tiny_runner(12, "qwen2", layers=1, vocab=VOCAB),
        "target": tiny_runner(13, layers=1, vocab=VOCAB),
    }


def test_two_level_sampling_matches_target(tiny):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2])
    assert chi_square_p(decoder, SamplingParams(temperature=1.0)) > 1e-3


def test_three_level_sampling_matches_target(tiny):
    decoder = HierarchicalDecoder([tiny["small"], tiny["middle"], tiny["target"]], [2, 3])
    assert chi_square_p(decoder, SamplingParams(temperature=0.8, top_k=5, top_p=0.95)) > 1e-3


def test_broken_verifier_fails_the_same_test(tiny):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2], sampler=ResidualIgnoringSampler())
    assert chi_square_p(decoder, SamplingParams(temperature=1.0)) < 1e-3


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


def test_tree_drafts_sampling_matches_target(tiny):
    decoder = HierarchicalDecoder([tiny["target"]], [], proposer=tiny_drafter(1))
    assert chi_square_p(decoder, SamplingParams(temperature=1.0)) > 1e-3
    # a fresh drafter: this one's model DB has learnt from 20,000 outputs and now answers everything
    decoder = HierarchicalDecoder([tiny["target"]], [], proposer=tiny_drafter(1))
    sources = set()
    for seed in range(200):
        sources |= set(decoder.generate(PROMPT, SamplingParams(temperature=1.0, seed=seed), NUM_TOKENS).stats.sources)
    assert sources == {"context", "model", "statistics"}


def test_tree_drafts_under_a_model_level_sampling_matches_target(tiny):
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [2], proposer=tiny_drafter(2))
    assert chi_square_p(decoder, SamplingParams(temperature=0.9, top_p=0.9)) > 1e-3


def test_confidence_stop_over_tree_drafts_sampling_matches_target(tiny):
    """The level under the target ends its batch after an unsure one-token step of its own (the
    database drafter had no tree there): a stopping rule on its own output, so still exact."""
    decoder = HierarchicalDecoder([tiny["small"], tiny["target"]], [DraftPolicy(3, 0.3)], proposer=tiny_drafter(4))
    assert chi_square_p(decoder, SamplingParams(temperature=1.0)) > 1e-3


def test_switching_hierarchies_every_round_sampling_matches_target(tiny):
    small, middle, target = (LocalLevel(tiny[name]) for name in ("small", "middle", "target"))
    drafter = tiny_drafter(3)
    members = [HierarchicalDecoder([target], [], proposer=drafter),
               HierarchicalDecoder([small, target], [2]),
               HierarchicalDecoder([small, middle, target], [1, 2], proposer=drafter)]
    decoder = SwitchingDecoder(members, ["hd", "hsd", "hd+hsd"], RandomChooser(len(members), seed=5))
    assert chi_square_p(decoder, SamplingParams(temperature=1.0)) > 1e-3

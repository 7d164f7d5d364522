"""The rejection sampler's stages, pinned on hand-made distributions."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from services.engine.sampling import GUMBEL_SPAN, Picks, SamplingParams, uniform
from services.engine.tree import TokenTree
from services.engine.verify import RejectionSampler

SAMPLER = RejectionSampler()


def test_greedy_accepts_the_matching_prefix_then_corrects():
    verdict = SAMPLER.picked([1, 2, 3], [1, 2, 4, 0])
    assert (verdict.num_accepted, verdict.next_token) == (2, 4)


def test_greedy_full_acceptance_adds_the_bonus_token():
    verdict = SAMPLER.picked([1, 2], [1, 2, 3])
    assert (verdict.num_accepted, verdict.next_token) == (2, 3)


def test_greedy_without_draft_is_one_plain_step():
    verdict = SAMPLER.picked([], [4])
    assert (verdict.num_accepted, verdict.next_token) == (0, 4)


def test_point_mass_draft_is_rejected_where_target_gives_it_no_mass():
    target = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    verdict = SAMPLER.sampled([0], None, target, torch.Generator().manual_seed(0))
    assert verdict.num_accepted == 0
    assert verdict.next_token == 1  # the residual p minus the point mass at 0 is all on 1


def test_residual_excludes_what_the_draft_covered():
    draft = torch.tensor([0.7, 0.3, 0.0])
    target = torch.tensor([0.4, 0.3, 0.3])
    gen = torch.Generator().manual_seed(0)
    # residual max(0, p - q) = [0, 0, 0.3]: only token 2 can be recovered
    assert {SAMPLER.recover(0, draft, target, gen) for _ in range(50)} == {2}


def test_acceptance_probability_is_min_one_p_over_q():
    draft_probs = torch.tensor([[0.8, 0.2]])
    target_probs = torch.tensor([[0.4, 0.6], [0.5, 0.5]])
    gen = torch.Generator().manual_seed(1)
    trials = 20_000
    accepted = sum(SAMPLER.sampled([0], draft_probs, target_probs, gen).num_accepted for _ in range(trials))
    assert abs(accepted / trials - 0.5) < 0.02  # p/q = 0.4/0.8


class HighestDraws(RejectionSampler):
    """Every uniform draw is the largest value torch.rand returns (1 - 2^-24): rare, but legal."""

    def uniform(self, n, generator):
        return torch.full((n,), 1.0 - 2.0**-24)


def test_tree_whose_children_hold_all_mass_still_yields_a_token():
    """p puts all its mass on the root's two children; after the first is rejected the second's
    renormalised mass rounds to 1 - 2^-24 and the highest draw rejects it too. The residual is then
    empty: the sampler must fall back (as the linear path does) instead of failing."""
    tree = TokenTree()
    tree.add_path([0], "context", 8)
    tree.add_path([1], "context", 8)
    p = torch.tensor([[0.058, 0.942, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    verdict = HighestDraws().sampled_tree(tree, p, torch.Generator().manual_seed(0))
    assert verdict.path == [] and verdict.next_token in (0, 1)


def test_tiny_temperatures_are_finite_and_greedy():
    """(logits - max) / T before the softmax: no inf - inf for any T > 0, 1e-45 included."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6]])
    for temperature in (1e-45, 1e-30, 1e-8):
        probs = SamplingParams(temperature=temperature).probs(logits)
        assert torch.isfinite(probs).all() and int(probs.argmax()) == 1 and float(probs[0, 1]) > 0.5


@pytest.mark.parametrize("value", [5e-324, 1e-45, 1e-30])
def test_the_smallest_top_p_and_temperature_keep_the_most_likely_token(value):
    """A top_p or a temperature that float32 cannot hold (5e-324, found by the reliability suite's fuzzer: a 500)
    keeps only the most likely token, as the smallest float32 does."""
    logits = torch.randn(3, 50)
    for params in (SamplingParams(temperature=1.0, top_p=value), SamplingParams(temperature=value)):
        probs = params.probs(logits)
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float()), params


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(ValidationError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed)


def test_largest_seeds_work():
    for seed in (2**64 - 1, -(2**63)):
        SamplingParams(temperature=1.0, seed=seed).generator()


def test_coupled_noise_is_finite_at_the_extremes_of_the_hash():
    """A uniform of exactly 1 would give a token infinite noise (it would win whatever its logit)."""
    extremes = uniform(torch.tensor([0, 2**32 - 1]))
    assert float(extremes[0]) > 0 and float(extremes[1]) < 1
    noise = -torch.log(-torch.log(extremes))
    assert torch.isfinite(noise).all() and float(noise[1] - noise[0]) < GUMBEL_SPAN


def test_coupled_picks_do_not_depend_on_the_other_rows():
    logits = torch.randn(6, 5000) * 3
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    together = Picks.of(logits, params, list(range(20, 26))).tokens
    assert together == [Picks.of(logits[i : i + 1], params, [20 + i]).tokens[0] for i in range(6)]

"""The rejection sampler's stages, pinned on hand-made distributions."""

from __future__ import annotations

import torch

from services.engine.verify import RejectionSampler

SAMPLER = RejectionSampler()


def test_greedy_accepts_the_matching_prefix_then_corrects():
    verdict = SAMPLER.greedy([1, 2, 3], [1, 2, 4, 0])
    assert (verdict.num_accepted, verdict.next_token) == (2, 4)


def test_greedy_full_acceptance_adds_the_bonus_token():
    verdict = SAMPLER.greedy([1, 2], [1, 2, 3])
    assert (verdict.num_accepted, verdict.next_token) == (2, 3)


def test_greedy_without_draft_is_one_plain_step():
    verdict = SAMPLER.greedy([], [4])
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

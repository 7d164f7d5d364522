"""Log-probabilities are the target's own: every method reports, for each generated token, exactly the numbers a
forward of the target over the whole output gives (greedy and coupled: the same from every method, since their text
is the same), at no extra forward."""

from __future__ import annotations

import pytest
import torch
from test_batching import hierarchies, levels  # noqa: F401  (a fixture)
from test_batching import prompts as make_prompts

from services.engine.sampling import SamplingParams, logprobs_of

TOP = 3


def reference(target, prompt: list[int], output: list[int], top: int) -> list:
    """The target's log-probabilities of `output` from one forward over prompt and output."""
    logits = target.runner.logits(f"reference-{len(prompt)}", prompt + output[:-1], len(output))  # rows -> output
    target.runner.release(f"reference-{len(prompt)}")
    return logprobs_of(logits, output, top)


@pytest.mark.parametrize("sampling", [SamplingParams(logprobs=TOP),
                                      SamplingParams(temperature=0.9, seed=5, logprobs=TOP),
                                      SamplingParams(temperature=0.9, sampler="rejection", seed=5, logprobs=0)],
                         ids=["greedy", "coupled", "rejection"])
def test_every_method_reports_the_targets_own_logprobs(levels, sampling):  # noqa: F811
    decoders = hierarchies(levels)
    target = levels["target"]
    reported = {}
    for prompt in make_prompts(3):
        for name, decoder in decoders.items():
            generation = decoder.generate(prompt, sampling, 20)
            assert len(generation.logprobs) == len(generation.token_ids) > 0, name
            expected = reference(target, prompt, generation.token_ids, sampling.logprobs)
            assert generation.logprobs == expected, name
            reported.setdefault(tuple(prompt), {})[name] = generation.logprobs
            assert all(len(top) == sampling.logprobs and (not top or top[0][1] >= value)
                       for value, top in generation.logprobs)
    if sampling.picks:  # the same text from every method, so the same numbers
        for by_method in reported.values():
            assert all(values == by_method["ar"] for values in by_method.values())


def test_logprobs_are_only_computed_when_asked_for(levels):  # noqa: F811
    generation = hierarchies(levels)["hd+hsd"].generate(make_prompts(1)[0], SamplingParams(), 12)
    assert generation.logprobs is None


def test_logprobs_of_is_a_log_softmax_with_a_stable_top():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    out = logprobs_of(logits, [1, 3], 2)
    expected = torch.log_softmax(logits, -1)
    assert out[0][0] == pytest.approx(float(expected[0, 1]), abs=1e-6)
    assert [token for token, _ in out[0][1]] == [1, 2]  # a tie: the lower token id first
    assert [token for token, _ in out[1][1]] == [0, 1]
    assert out[1][0] == pytest.approx(-float(torch.log(torch.tensor(4.0))), abs=1e-6)

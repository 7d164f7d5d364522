"""Prefix caching: a request new to a level starts from the longest prefix another request's cache holds, running
or released, and its logits are the bits a fresh cache would give (row-invariant numerics), in every dtype."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_runner

from services.engine.runner import PREFIX_DONORS
from services.engine.tree import TokenTree

VOCAB = 32
PROMPT = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(4)).tolist()  # two forwards' rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_new_request_starts_from_a_released_requests_cache_with_the_same_logits(dtype):
    runner, fresh = tiny_runner(3, vocab=VOCAB, dtype=dtype), tiny_runner(3, vocab=VOCAB, dtype=dtype)
    # the donor's answer verified through a token tree, one path kept: its keys moved within the cache
    runner.logits("a", PROMPT, 1)
    tree = TokenTree()
    for path in ([5, 6, 7], [5, 9], [1]):
        tree.add_path(path, "context", 8)
    runner.tree_logits("a", [*PROMPT, 2], tree)
    runner.logits("a", [*PROMPT, 2, 5, 9, 11], 1)
    runner.release("a")

    follow_up = [*PROMPT, 2, 5, 9, 11, 4, 4, 30]  # the next turn of a conversation: all of "a" and more
    reused = runner.prefix_tokens_reused
    logits = runner.logits("b", follow_up, 3)
    assert runner.prefix_tokens_reused - reused == len(PROMPT) + 4
    assert torch.equal(logits, fresh.logits("b", follow_up, 3))

    other = [*PROMPT[:40], 0, 1, 2]  # shares only the start (a system prompt)
    reused = runner.prefix_tokens_reused
    logits = runner.logits("c", other, 2)
    assert runner.prefix_tokens_reused - reused == 40
    assert torch.equal(logits, fresh.logits("c", other, 2))


def test_a_running_requests_cache_is_shared_and_stays_its_own():
    runner, fresh = tiny_runner(3, vocab=VOCAB), tiny_runner(3, vocab=VOCAB)
    runner.logits("a", PROMPT, 1)
    sibling = [*PROMPT[:100], 7, 7]
    assert torch.equal(runner.logits("b", sibling, 2), fresh.logits("b", sibling, 2))
    assert runner.prefix_tokens_reused == 100
    # the donor goes on from its own cache, unaffected by the copy
    assert torch.equal(runner.logits("a", [*PROMPT, 3, 1], 2), fresh.logits("a", [*PROMPT, 3, 1], 2))


def test_the_longest_prefix_is_taken_and_never_the_whole_sequence():
    runner, fresh = tiny_runner(3, vocab=VOCAB), tiny_runner(3, vocab=VOCAB)
    runner.logits("short", PROMPT[:30], 1)
    runner.logits("long", PROMPT[:90], 1)  # all of the running "short"
    assert runner.prefix_tokens_reused == 30
    for request in ("short", "long"):
        runner.release(request)
    # the same sequence as a donor holds: its last position's logits must be computed, so one token is left
    assert torch.equal(runner.logits("again", PROMPT[:90], 1), fresh.logits("x", PROMPT[:90], 1))
    assert runner.prefix_tokens_reused == 30 + 89


def test_released_caches_kept_are_bounded_by_count_and_bytes():
    runner = tiny_runner(3, vocab=VOCAB)
    for k in range(PREFIX_DONORS + 3):
        runner.logits(f"r{k}", [k % VOCAB, *PROMPT[:20]], 1)
        runner.release(f"r{k}")
    assert runner.cached_requests() == 0 and len(runner._donors) == PREFIX_DONORS
    assert runner.cache_bytes() == PREFIX_DONORS * runner.decoder.new_cache().nbytes()
    # a byte bound drops released caches before any running request's
    runner.max_cache_bytes = runner.decoder.new_cache().nbytes()
    runner.logits("running", PROMPT[:10], 1)
    assert len(runner._donors) == 0 and runner.cached_requests() == 1 and runner.caches_dropped == 0
    # a release that asks not to keep the cache (the cost probe's synthetic requests) keeps nothing
    runner.release("running", keep_prefix=False)
    assert runner.cache_bytes() == 0


def test_the_transformers_fallback_shares_no_prefix():
    runner = tiny_runner(3, "phi3", vocab=VOCAB)
    runner.logits("a", PROMPT[:20], 1)
    runner.release("a")
    runner.logits("b", PROMPT[:30], 1)
    assert runner.prefix_tokens_reused == 0


def test_forgetting_released_caches_keeps_the_running_ones():
    """What a benchmark does between methods on the same prompts: released caches go, running requests keep theirs."""
    runner = tiny_runner(3, vocab=VOCAB)
    runner.logits("done", PROMPT[:50], 1)
    runner.release("done")
    runner.logits("running", PROMPT[:40], 1)
    runner.forget_released()
    reused = runner.prefix_tokens_reused
    runner.logits("new", PROMPT[:60], 1)
    assert runner.prefix_tokens_reused - reused == 40  # the running request's, not the 49 "done" held

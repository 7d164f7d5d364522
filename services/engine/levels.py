"""What the decoder needs from a level, whether it runs in this process or in a Serve replica.

The decoder awaits every level call, so one router can keep many requests in
flight: while one request waits for the target, another can run on a draft
level. A local level (`services.engine.batching`) runs the calls of concurrent
requests in shared forwards; a remote one is a deployment handle.

A call asks either for logits (the rejection sampler needs whole distributions)
or, passing the request's `SamplingParams` as `picks`, for each row's pick
(greedy or coupled sampling; `services.engine.sampling.Picks`), which the level
computes next to its logits.
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.engine.sampling import Picks, SamplingParams
from services.engine.tree import TokenTree

Scores = torch.Tensor | Picks  # logits [rows, vocab] (on the CPU) for the rejection sampler, else Picks


class Level(Protocol):
    name: str
    vocab_size: int

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int,
                     picks: SamplingParams | None = None, confidence: bool = False) -> Scores: ...

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          picks: SamplingParams | None = None) -> Scores: ...

    async def release(self, request_id: str) -> None: ...


def linear_positions(length: int, num_logits: int) -> list[int]:
    """Positions of the tokens the last `num_logits` rows of a `length`-token sequence predict."""
    return list(range(length - num_logits + 1, length + 1))


def tree_positions(length: int, tree: TokenTree) -> list[int]:
    """Positions predicted by a tree forward's rows: after the sequence, then after each node."""
    return [length] + [length + 1 + depth for depth in tree.depths]


def scores(logits: torch.Tensor, picks: SamplingParams | None, positions: list[int],
           confidence: bool = False) -> Scores:
    return logits.cpu() if picks is None else Picks.of(logits, picks, positions, confidence)

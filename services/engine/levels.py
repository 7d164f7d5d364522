"""What the decoder needs from a level, whether it runs in this process or in a Serve replica.

The decoder awaits every level call, so one router can keep many requests in
flight: while one request waits for the target, another can run on a draft
level. A local level answers at once; a remote one is a deployment handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from services.engine.runner import LevelRunner
from services.engine.tree import TokenTree


@dataclass(frozen=True)
class GreedyScores:
    """All that greedy decoding needs from a forward: each row's argmax and, when asked for (a
    drafter's confidence), that token's probability. A few numbers instead of [rows, vocab] logits,
    which matters when a level answers over the network."""

    tokens: list[int]
    probs: list[float]  # empty unless asked for: a softmax over the vocabulary costs as much as the argmax

    @classmethod
    def of(cls, logits: torch.Tensor, confidence: bool = False) -> GreedyScores:
        tokens = logits.argmax(-1)  # on the logits: rounded probabilities could tie where logits do not
        probs = logits.softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist() if confidence else []
        return cls(tokens.tolist(), probs)


Scores = torch.Tensor | GreedyScores  # logits [rows, vocab] when sampling, else GreedyScores


class Level(Protocol):
    """`greedy=True` asks for GreedyScores instead of logits (`confidence=True`: with probabilities)."""

    name: str
    vocab_size: int

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int, greedy: bool = False,
                     confidence: bool = False) -> Scores: ...

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          greedy: bool = False) -> Scores: ...

    async def release(self, request_id: str) -> None: ...


def scores(logits: torch.Tensor, greedy: bool, confidence: bool = False) -> Scores:
    return GreedyScores.of(logits, confidence) if greedy else logits


class LocalLevel:
    """A runner in this process (the CLI, the benchmark, tests)."""

    def __init__(self, runner: LevelRunner):
        self.runner = runner
        self.name = runner.name
        self.vocab_size = runner.vocab_size

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int, greedy: bool = False,
                     confidence: bool = False) -> Scores:
        return scores(self.runner.logits(request_id, token_ids, num_logits), greedy, confidence)

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree,
                          greedy: bool = False) -> Scores:
        return scores(self.runner.tree_logits(request_id, token_ids, tree), greedy)

    async def release(self, request_id: str) -> None:
        self.runner.release(request_id)


def as_level(level: Level | LevelRunner) -> Level:
    return LocalLevel(level) if isinstance(level, LevelRunner) else level

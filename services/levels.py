"""What the decoder needs from a level, whether it runs in this process or in a Serve replica.

The decoder awaits every level call, so one router can keep many requests in
flight: while one request waits for the target, another can run on a draft
level. A local level answers at once; a remote one is a deployment handle.
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.runner import LevelRunner
from services.tree import TokenTree


class Level(Protocol):
    name: str
    vocab_size: int

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor: ...

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree) -> torch.Tensor: ...

    async def release(self, request_id: str) -> None: ...


class LocalLevel:
    """A runner in this process (the CLI, the benchmark, tests)."""

    def __init__(self, runner: LevelRunner):
        self.runner = runner
        self.name = runner.name
        self.vocab_size = runner.vocab_size

    async def logits(self, request_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        return self.runner.logits(request_id, token_ids, num_logits)

    async def tree_logits(self, request_id: str, token_ids: list[int], tree: TokenTree) -> torch.Tensor:
        return self.runner.tree_logits(request_id, token_ids, tree)

    async def release(self, request_id: str) -> None:
        self.runner.release(request_id)


def as_level(level: Level | LevelRunner) -> Level:
    return LocalLevel(level) if isinstance(level, LevelRunner) else level

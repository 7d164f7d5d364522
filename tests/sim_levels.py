"""Synthetic levels on a virtual clock: the real decoder runs over them as a Monte Carlo of the algorithm.

Every level's greedy choice is a hash of the context. Level i agrees with
level i + 1 with probability `agree[i]`, independently at every context (a
disagreeing level shifts the token by one, so tokens of two levels match
exactly when every level between them agrees). A forward of n tokens advances
the shared clock by the level's cost curve at n, so "ms per token" of a run is
exact and free of this machine's noise.
"""

from __future__ import annotations

import random

from deploy.planner.latency import CostCurve
from services.engine.sampling import Picks
from services.engine.tree import TokenTree

VOCAB = 1000


# What each draw is for. Integers, not strings: a string's hash changes with every process
# (PYTHONHASHSEED), a tuple of integers hashes the same everywhere, so every run sees one world.
TARGET, AGREE, CONFIDENCE, DEPTH, HIT = range(5)
SALT = 20


def _uniform(*key) -> float:
    return ((hash(key) * 2654435761) % (1 << 32)) / (1 << 32)


def _key(tokens: list[int], end: int) -> tuple:
    return (end, *tokens[max(0, end - 3):end])


class Clock:
    def __init__(self):
        self.ms = 0.0


class World:
    """Levels 0..K-1 below the target K; `agree[i]`: P(level i's choice == level i+1's)."""

    def __init__(self, agree: list[float]):
        self.agree = agree

    def choice(self, level: int, tokens: list[int], end: int) -> int:
        key = _key(tokens, end)
        token = int(_uniform(TARGET, key) * VOCAB)
        for i in range(len(self.agree) - 1, level - 1, -1):
            if _uniform(AGREE, i, key) >= self.agree[i]:
                token = (token + 1) % VOCAB
        return token

    def greedy_text(self, level: int, prompt: list[int], length: int) -> list[int]:
        """`length` tokens of a level's greedy decoding after `prompt`."""
        text = list(prompt)
        for _ in range(length):
            text.append(self.choice(level, text, len(text)))
        return text[len(prompt):]

    def confidence(self, level: int, tokens: list[int], end: int) -> float:
        return 0.2 + 0.8 * _uniform(CONFIDENCE, level, _key(tokens, end))


class SimLevel:
    def __init__(self, world: World, index: int, cost: CostCurve, clock: Clock):
        self.world, self.index, self.cost, self.clock = world, index, cost, clock
        self.name = f"sim-{index}"
        self.vocab_size = VOCAB

    async def logits(self, request_id, token_ids, num_logits, picks=None, confidence=False):
        self.clock.ms += self.cost(num_logits)
        ends = range(len(token_ids) - num_logits + 1, len(token_ids) + 1)
        return Picks([self.world.choice(self.index, token_ids, e) for e in ends],
                            [self.world.confidence(self.index, token_ids, e) for e in ends] if confidence else [])

    async def tree_logits(self, request_id, token_ids, tree: TokenTree, picks=None):
        self.clock.ms += self.cost(len(tree) + 1)
        rows = [self.world.choice(self.index, token_ids, len(token_ids))]
        for node in range(len(tree)):
            path = []
            while node >= 0:
                path.append(tree.tokens[node])
                node = tree.parents[node]
            context = token_ids + path[::-1]
            rows.append(self.world.choice(self.index, context, len(context)))
        return Picks(rows, [])

    async def release(self, request_id):
        return None


class SimDrafter:
    """A database drafter stand-in: one candidate of 0, 2 or 4 tokens, each the target's choice with
    probability `hit` (else a token no level picks), at a fixed cost on the clock. `hit` may depend
    on the request: a function of the context (the prompt comes first)."""

    def __init__(self, world: World, hit, clock: Clock, cost_ms: float):
        self.world, self.clock, self.cost_ms = world, clock, cost_ms
        self.hit = hit if callable(hit) else (lambda context: hit)

    def start(self, request_id, prompt_ids):
        pass

    def propose(self, request_id, context, max_depth, max_nodes=None):
        self.clock.ms += self.cost_ms
        depth = min(max_depth, (0, 2, 4)[int(_uniform(DEPTH, _key(context, len(context))) * 3)])
        tree, path = TokenTree(), []
        for _ in range(depth):
            tokens = context + path
            token = self.world.choice(len(self.world.agree), tokens, len(tokens))
            if _uniform(HIT, _key(tokens, len(tokens))) >= self.hit(context):
                token = (token + 7) % VOCAB
            path.append(token)
        tree.add_path(path, "context", 64)
        return tree

    def observe(self, request_id, tree, accepted_path):
        pass

    def commit(self, request_id, token_ids):
        pass

    def finish(self, request_id, completed):
        pass


class RandomChooser:
    """Runs every target round through a randomly chosen member hierarchy."""

    def __init__(self, members: int, seed: int = 0):
        self.members, self.rng = members, random.Random(seed)

    def choose(self, req, seq):
        return self.rng.randrange(self.members)

    def observe(self, req, member, seq, out):
        pass

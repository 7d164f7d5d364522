"""A decoder that may run each target round through a different hierarchy over the same target.

Why this is lossless: a target round is a complete draft-and-verify step of
the target, and verification makes the round's output independent of where
the draft came from (greedy: the target's argmax path; sampling: the target's
distribution). Choosing the hierarchy from what earlier rounds produced is a
stopping-time-like decision on the past only, so every choice keeps the
output exact. Levels keep per-request caches keyed by the full token sequence,
so a level joining a request late just computes what it lacks.
"""

from __future__ import annotations

from typing import Protocol

from services.engine.hsd import Draft, Generation, HierarchicalDecoder, TreeProposer


class RoundChooser(Protocol):
    """Picks the member decoder of every target round and hears what the round committed."""

    def choose(self, req: Generation, seq: list[int]) -> int: ...

    def observe(self, req: Generation, member: int, seq: list[int], out: list[int]) -> None: ...


class SwitchingDecoder(HierarchicalDecoder):
    def __init__(self, members: list[HierarchicalDecoder], names: list[str], chooser: RoundChooser,
                 proposer: TreeProposer | None = None):
        """`proposer`: the members' database drafter, also when none uses it (a chooser may consult it)."""
        target = members[0].target
        proposers = {id(m.proposer): m.proposer for m in members if m.proposer is not None}
        if proposer is not None:
            proposers.setdefault(id(proposer), proposer)
        if any(m.target is not target for m in members):
            raise ValueError("every member hierarchy must end in the same target level")
        if len(proposers) > 1:
            raise ValueError("members must share one database drafter")
        levels = {}
        for member in members:
            for level in member.levels[:-1]:
                levels.setdefault(level.name, level)
        super().__init__([*levels.values(), target], [1] * len(levels),
                         proposer=next(iter(proposers.values()), None))
        self.members = members
        self.names = names
        self.chooser = chooser
        for member in members:  # the members' draft budgets see this decoder's load
            member.load = self.load

    async def _target_round(self, req: Generation, seq: list[int], limit: int) -> Draft:
        index = self.chooser.choose(req, seq)
        out = await self.members[index]._target_round(req, seq, limit)
        plans = req.stats.plans_used
        plans[self.names[index]] = plans.get(self.names[index], 0) + 1
        self.chooser.observe(req, index, seq, out.tokens)
        return out

"""The expected-latency model of a hierarchy, fed with measured costs and measured acceptance.

It models the algorithm of `services.engine.hsd` as it runs. A *sub-round* of level j
is one verification forward of a draft from below; it costs X (the draft's
cost plus c_j(n + 1) for n drafted tokens) and yields Y = accepted + 1 tokens.
A non-target level hands up exactly T_j tokens: it runs sub-rounds until it
holds at least T_j and keeps the first T_j. The target runs one sub-round per
round. Three kinds of draft feed a sub-round:

- the HD drafter's token tree (cost: lookup + c_j(nodes + 1)),
- an autoregressive bottom model drafting up to T tokens and stopping early
  after a token it gave less than `min_confidence`,
- a lower model level handing up a batch of exactly T tokens.

HSD's model (DESIGN 1.2) assumes i.i.d. acceptance and a constant forward
cost; here c(n) is a measured curve and acceptance is the empirical
distribution of measured outcomes (`PairTable`, `TreeTable`), so runs of
acceptance, confidence stops and tree shapes are priced as they were seen.
What remains assumed is that successive sub-rounds are independent draws from
those tables. Then, by Wald's identity, a batch of T tokens costs
E[sub-rounds to reach T] * E[X], and by renewal-reward the target produces a
token every E[X] / E[Y] ms.

Why chains compose: a level's output is distributed as its own model's
decoding whatever drafts for it (speculative decoding is lossless), so the
acceptance of level i's tokens by level j does not depend on what sits below
i. A chain's cost therefore builds up level by level, which is what lets
`deploy.planner.optimizer` search it as a shortest path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field, model_validator

from services.engine.runner import COST_CONTEXT


class CostCurve(BaseModel):
    """c(n): ms of one forward scoring n new tokens, measured at a few n; linear in between and beyond."""

    tokens: list[int] = Field(min_length=1)
    ms: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> CostCurve:
        if len(self.tokens) != len(self.ms):
            raise ValueError("tokens and ms must have the same length")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError("tokens must increase")
        return self

    def __call__(self, n):
        n = np.asarray(n, dtype=float)
        x, y = np.asarray(self.tokens, float), np.asarray(self.ms, float)
        if len(x) == 1:
            return np.full_like(n, y[0]) if n.ndim else float(y[0])
        out = np.interp(n, x, y)
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out = np.where(n > x[-1], y[-1] + slope * (n - x[-1]), out)
        return out if out.ndim else float(out)

    def at_load(self, requests: int) -> CostCurve:
        """The cost a request sees when `requests` requests share every forward in lockstep (batched levels):
        a forward of n tokens each is one of requests * n rows."""
        return self if requests == 1 else CostCurve(tokens=self.tokens, ms=[float(self(requests * t))
                                                                              for t in self.tokens])


class ForwardCost(BaseModel):
    """ms of one batched forward: `curve` over its rows in total (timed with every request holding COST_CONTEXT
    tokens), plus, for each request in it, what reading its longer cache adds (`cache_ms` per token beyond
    COST_CONTEXT) and what attending from each of its rows adds (`key_ms` per row and token beyond). A decode
    row among 4 requests holding ~750 tokens took 1.3x the curve's figure on SmolLM2: the cache term."""

    curve: CostCurve
    cache_ms: float = Field(0.0, ge=0.0)
    key_ms: float = Field(0.0, ge=0.0)

    def __call__(self, rows: list[int], held: list[int]) -> float:
        """A forward of `rows[i]` new rows of a request holding `held[i]` tokens, for each request i."""
        beyond = [max(h - COST_CONTEXT, 0) for h in held]
        return float(self.curve(sum(rows))) + sum(b * (self.cache_ms + self.key_ms * r) for r, b in zip(rows, beyond))


class PairTable:
    """Measured outcomes of a lower model drafting autoregressively for an upper one, at every position
    of some texts (the upper model's greedy output for calibration prompts).

    Position s: `runs[s]` is how many of the lower model's greedy tokens in a row the upper model
    accepts from there (capped at `max_draft`); `confidence[s]` the lower model's probability of each
    of those tokens and of the first rejected one (what an early confidence stop looks at); `starts`
    are the first positions of each text. Rounds are replayed over the texts, not drawn from every
    position: a long run of agreement is consumed by a few rounds, so per-position statistics would
    count it many times over."""

    def __init__(self, runs: list[int], confidence: list[list[float]], max_draft: int,
                 starts: list[int] | None = None):
        if not runs:
            raise ValueError("a pair table needs samples")
        self.max_draft = max_draft
        self.runs = np.minimum(np.asarray(runs, dtype=np.int64), max_draft)
        self.confidence = np.full((len(runs), max_draft), np.nan)
        for row, probs in enumerate(confidence):
            probs = probs[:max_draft]
            self.confidence[row, : len(probs)] = probs
        self.starts = list(starts or [0])
        self._stops: dict[float, np.ndarray] = {}
        self._rounds: dict[tuple[int, float | None], tuple[np.ndarray, np.ndarray]] = {}

    def rounds(self, draft_tokens: int, min_confidence: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(drafted, accepted) of each round replayed over the texts: at position p the lower level
        drafts T tokens (fewer when its confidence stop fires; None: a batch of exactly T), the upper
        accepts min(run, drafted), and the next round starts after those and the bonus token."""
        key = (draft_tokens, min_confidence)
        if key not in self._rounds:
            stops = self.stop_lengths(min_confidence) if min_confidence is not None else None
            runs = self.runs.tolist()
            drafted, accepted = [], []
            for start, end in zip(self.starts, [*self.starts[1:], len(runs)]):
                p = start
                while p < end:
                    n = draft_tokens if stops is None else min(draft_tokens, int(stops[p]))
                    a = min(runs[p], n)
                    drafted.append(n)
                    accepted.append(a)
                    p += a + 1
            self._rounds[key] = (np.asarray(drafted), np.asarray(accepted))
        return self._rounds[key]

    def stop_lengths(self, min_confidence: float) -> np.ndarray:
        """Tokens drafted before the confidence stop; max_draft when it never stops (or where the
        confidences are unknown: past the first rejected token)."""
        if min_confidence not in self._stops:
            low = np.nan_to_num(self.confidence, nan=1.0) < min_confidence
            self._stops[min_confidence] = np.where(low.any(axis=1), low.argmax(axis=1) + 1, self.max_draft)
        return self._stops[min_confidence]


class TreeTable:
    """Measured rounds of the HD drafter for one verifying model: tree size and accepted path length."""

    def __init__(self, nodes: list[int], accepted: list[int], drafter_ms: float):
        if not nodes or len(nodes) != len(accepted):
            raise ValueError("a tree table needs as many node counts as accepted lengths")
        self.nodes = np.asarray(nodes, dtype=np.int64)
        self.accepted = np.asarray(accepted, dtype=np.int64)
        self.drafter_ms = drafter_ms


@dataclass(frozen=True)
class SubRound:
    """One verification forward of a level: expected cost (ms) and the distribution of tokens it yields."""

    cost_ms: float
    yield_pmf: np.ndarray  # P(Y = y), y = 0, 1, ...

    @property
    def mean_yield(self) -> float:
        return float(np.dot(np.arange(len(self.yield_pmf)), self.yield_pmf))

    @property
    def ms_per_token(self) -> float:
        return self.cost_ms / self.mean_yield

    def batch_costs(self, max_tokens: int) -> np.ndarray:
        """[T] -> expected ms to hand up a batch of T tokens, T = 0..max_tokens (Wald: E[sub-rounds] * E[X])."""
        return self.cost_ms * rounds_to_reach(self.yield_pmf, max_tokens)


def rounds_to_reach(yield_pmf: np.ndarray, max_tokens: int) -> np.ndarray:
    """h[T] = expected number of sub-rounds until their yields add up to at least T (every yield >= 1)."""
    if yield_pmf[0] > 0:
        raise ValueError("a sub-round yields at least one token")
    h = np.zeros(max_tokens + 1)
    ys = np.arange(1, len(yield_pmf))
    probs = yield_pmf[1:]
    for t in range(1, max_tokens + 1):
        h[t] = 1.0 + float(np.dot(probs, h[np.maximum(t - ys, 0)]))
    return h


def _pmf(yields: np.ndarray) -> np.ndarray:
    return np.bincount(yields) / len(yields)


def single_step(cost: CostCurve) -> SubRound:
    """Plain decoding: one forward, one token."""
    return SubRound(cost(1), np.array([0.0, 1.0]))


def tree_round(trees: TreeTable, upper: CostCurve) -> SubRound:
    """The upper model verifies one HD token tree (an empty tree is a plain step)."""
    cost = trees.drafter_ms + float(np.mean(upper(trees.nodes + 1)))
    return SubRound(cost, _pmf(trees.accepted + 1))


def autoregressive_round(pair: PairTable, lower: CostCurve, upper: CostCurve, draft_tokens: int,
                         min_confidence: float) -> SubRound:
    """The lower (bottom) model drafts up to T tokens one at a time, stopping after an unsure one."""
    drafted, accepted = pair.rounds(draft_tokens, min_confidence)
    cost = float(np.mean(drafted)) * lower(1) + float(np.mean(upper(drafted + 1)))
    return SubRound(cost, _pmf(accepted + 1))


def batch_round(pair: PairTable, batch_ms: float, upper: CostCurve, draft_tokens: int) -> SubRound:
    """A lower model level hands up exactly T tokens (costing `batch_ms`); the upper verifies them."""
    _, accepted = pair.rounds(draft_tokens, None)
    return SubRound(batch_ms + upper(draft_tokens + 1), _pmf(accepted + 1))

"""The latency-optimal hierarchy: which models, in which order, which T_i, with or without the HD drafter.

`optimize` is HSD's generalized shortest path over (model, batch size) states,
on the latency model of `deploy.planner.latency`. State (m, T) is "model m hands up
batches of T tokens", valued at the least expected ms of one such batch over
every chain below m. A batch from (l, T_l) feeds m's sub-rounds at a cost
increasing in that value while the tokens they yield depend only on (l, m,
T_l) (a level's output does not depend on who drafts for it), so the best
chain below a state is part of the best chain through it: Bellman's principle
holds and one pass over the models in cost order is exact. Sources are the
HD drafter under any model and any model drafting autoregressively with any
T and confidence stop; the target closes a chain at E[X] / E[Y] ms per token.

Complexity: with M candidate models, batch sizes up to T, Θ confidence stops,
S samples per table and yields up to T + 1, the arcs number O(M² T (Θ + 1))
and each costs O(S + T²) (its sample means and the renewal recursion), so a
plan takes O(M² T (Θ + 1) (S + T²)) time and O(M T) memory: milliseconds for
the few models of a config.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from deploy.planner.latency import (
    CostCurve,
    PairTable,
    SubRound,
    TreeTable,
    autoregressive_round,
    batch_round,
    single_step,
    tree_round,
)

CONFIDENCE_STOPS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)


@dataclass
class Tables:
    """What the latency model needs for one workload category (or a mix of them)."""

    costs: dict[str, CostCurve]
    pairs: dict[tuple[str, str], PairTable]  # (lower, upper) -> outcomes
    trees: dict[str, TreeTable] = field(default_factory=dict)  # verifying model -> HD drafter outcomes
    max_draft: int = 16
    prompt_tokens: float = 0.0  # mean prompt tokens every level of a plan computes per request (not copied)
    new_tokens: float = 0.0  # mean generated length, over which the prefills are spread

    def pair(self, lower: str, upper: str) -> PairTable:
        try:
            return self.pairs[(lower, upper)]
        except KeyError:
            raise ValueError(f"no acceptance measured for {lower} drafting for {upper}") from None


class Plan(BaseModel):
    """A hierarchy: `models` from the bottom level to the target, `draft_tokens[i]` = T_i."""

    models: list[str] = Field(min_length=1)
    draft_tokens: list[int] = Field(default_factory=list)
    drafter: bool = Field(False, description="the HD drafter proposes token trees to the bottom model")
    min_confidence: float = Field(0.0, description="early stop of the bottom model's one-token drafting steps "
                                  "(the optimizer sets it only without the drafter; configs may set it either way)")
    predicted_ms_per_token: float | None = None

    @property
    def method(self) -> str:
        if len(self.models) == 1:
            return "hd" if self.drafter else "ar"
        return "hd+hsd" if self.drafter else "hsd"

    def describe(self) -> str:
        stop = f", stop<{self.min_confidence:g}" if self.min_confidence else ""
        parts = (["HD"] if self.drafter else []) + [
            f"{m} (T={t}{stop if i == 0 else ''})" for i, (m, t) in enumerate(zip(self.models, self.draft_tokens))
        ] + [self.models[-1]]
        return " -> ".join(parts)


def target_round(plan: Plan, tables: Tables) -> SubRound:
    """The sub-round of the plan's target (evaluated level by level, bottom up)."""
    models, tokens = plan.models, plan.draft_tokens
    if len(tokens) != len(models) - 1:
        raise ValueError("a plan needs one T per non-target level")
    costs = tables.costs
    if len(models) == 1:
        return tree_round(tables.trees[models[0]], costs[models[0]]) if plan.drafter else single_step(costs[models[0]])
    if plan.drafter:
        below = tree_round(tables.trees[models[0]], costs[models[0]])
        start = 1
    else:
        below = autoregressive_round(tables.pair(models[0], models[1]), costs[models[0]], costs[models[1]],
                                     tokens[0], plan.min_confidence)
        start = 2
    for index in range(start, len(models)):
        batch = below.batch_costs(tokens[index - 1])[tokens[index - 1]]
        below = batch_round(tables.pair(models[index - 1], models[index]), batch, costs[models[index]],
                            tokens[index - 1])
    return below


def plan_latency(plan: Plan, tables: Tables) -> float:
    """Predicted ms per generated token while decoding (the quantity the shortest path minimizes)."""
    return target_round(plan, tables).ms_per_token


def request_latency(plan: Plan, tables: Tables) -> float:
    """Predicted ms per generated token of a whole request: decoding plus each level's prefill of the
    prompt, spread over the tokens generated (what a user measures)."""
    if not tables.new_tokens:
        return plan_latency(plan, tables)
    prefill = sum(float(tables.costs[m](tables.prompt_tokens)) for m in plan.models)
    return plan_latency(plan, tables) + prefill / tables.new_tokens


@dataclass(frozen=True)
class _Chain:
    """The part of a plan below some model: its levels with their T, drafter, confidence stop."""

    drafter: bool = False
    models: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    min_confidence: float = 0.0

    def then(self, model: str, tokens: int) -> _Chain:
        return _Chain(self.drafter, self.models + (model,), self.tokens + (tokens,), self.min_confidence)

    def plan(self, target: str, ms: float) -> Plan:
        return Plan(models=[*self.models, target], draft_tokens=list(self.tokens), drafter=self.drafter,
                    min_confidence=self.min_confidence, predicted_ms_per_token=ms)


def optimize(tables: Tables, target: str, drafts: list[str], drafter: bool | None = None,
             chain: list[str] | None = None, confidence_stops: tuple[float, ...] = CONFIDENCE_STOPS) -> Plan:
    """The fastest plan. `drafts` are the candidate draft models, smallest first; `drafter` None lets
    the HD drafter in or out (needs `tables.trees`); `chain` fixes which drafts are used (the best
    T_i and confidence stop of one structure)."""
    if drafter is None:
        drafter_options = (False, True) if tables.trees else (False,)
    else:
        drafter_options = (drafter,)
    if chain is not None:
        drafts = list(chain)
    t_max = tables.max_draft
    order = [*drafts, target]
    best: dict[str, np.ndarray] = {}  # model -> [T] least expected ms of a batch of T
    back: dict[str, list[_Chain | None]] = {}

    def allowed(lower: str, upper: str) -> bool:
        if chain is None:
            return True
        return order.index(upper) == order.index(lower) + 1

    for index, model in enumerate(order):
        candidates: list[tuple[SubRound, _Chain]] = []
        cost = tables.costs[model]
        is_bottom = chain is None or index == 0
        if True in drafter_options and is_bottom and model in tables.trees:
            candidates.append((tree_round(tables.trees[model], cost), _Chain(drafter=True)))
        for lower in order[:index]:
            if not allowed(lower, model):
                continue
            pair = tables.pair(lower, model)
            if False in drafter_options and (chain is None or order.index(lower) == 0):
                for t in range(1, t_max + 1):
                    for stop in confidence_stops:
                        sub = autoregressive_round(pair, tables.costs[lower], cost, t, stop)
                        candidates.append((sub, _Chain(False, (lower,), (t,), stop)))
            for t in range(1, t_max + 1):
                below = back.get(lower, [None] * (t_max + 1))[t]
                if below is not None:
                    candidates.append((batch_round(pair, best[lower][t], cost, t), below))
        if model == target:
            if False in drafter_options and (chain is None or not drafts):
                candidates.append((single_step(cost), _Chain()))
            if not candidates:
                raise ValueError("no plan fits these constraints")
            sub, below = min(candidates, key=lambda c: c[0].ms_per_token)
            return below.plan(target, sub.ms_per_token)
        best[model] = np.full(t_max + 1, np.inf)
        back[model] = [None] * (t_max + 1)
        for sub, below in candidates:
            batch = sub.batch_costs(t_max)
            for t in range(1, t_max + 1):
                if batch[t] < best[model][t]:
                    best[model][t] = batch[t]
                    back[model][t] = below.then(model, t)
    raise AssertionError("unreachable: the target closes every chain")


def rank_structures(tables: Tables, target: str, drafts: list[str]) -> list[Plan]:
    """The best plan of every structure (drafter or not x which draft models), fastest first by
    `request_latency`: the chosen plan and its runners-up. Prefill depends only on which models a
    plan has, so it is added per structure, after the shortest path chose each structure's T_i."""
    plans = []
    for use_drafter in (False, True) if tables.trees else (False,):
        for size in range(len(drafts) + 1):
            for subset in itertools.combinations(drafts, size):
                plan = optimize(tables, target, drafts, drafter=use_drafter, chain=list(subset))
                plans.append(plan.model_copy(update={"predicted_ms_per_token": request_latency(plan, tables)}))
    return sorted(plans, key=lambda p: p.predicted_ms_per_token)

"""The planner's prediction for requests that share forwards: the batching level's schedule, simulated.

Pricing a batch as B requests in lockstep (each forward B times one request's
rows, `CostCurve.at_load`) misses what dominates B requests that start
together, and it erred by 16-48% at 8 requests on SmolLM2 (issue 18):

- prompts longer than one forward are prefilled `prompt_rows` rows per forward
  while other requests are active (chunked prefill, services.engine.batching),
  so a long prompt takes many forwards, each paying the weights' read;
- requests whose prompt is done decode during those forwards, so their draft
  rows ride on forwards that are large anyway;
- the target's draft is cut to the draft budget at the current load
  (services.engine.budget, the engine's own class, fed with the level's own
  batched cost curve), down to plain decoding where speculation does not pay.

So the planner runs the schedule: groups of B requests drawn from the
calibration requests (prompt and answer lengths, the prompt tokens a level
copied from earlier requests' caches when the calibration ran, category), forward by
forward. Each forward takes every active request's next prompt chunk or
decoding round; a round's draft rows and accepted tokens are drawn from the
request's category's measured outcomes (HD trees, or the draft level's runs)
cut to the budget (which learns the acceptance from its prior, as the
engine's does); the forward costs `ForwardCost` (the target's batched curve
at its total rows, plus each request's longer cache), scaled to what the
target's forwards cost when calibration prompts were decoded together
(`measure_load_scale`: mixed shapes, the machine's speed), plus the levels
below: their prompt chunks on their own curves and the draft of the round
priced by the lockstep model (`deploy.planner.optimizer`). A request's ms per
token is its time from the group's start to its last token over its tokens
(the stop token counted), as `hierspec plan` measures it.

Simplified, and so not modelled: a conversation's second turn starts with its
group rather than after its first; groups are drawn at random, where `plan`
measures the workload's questions in file order; the levels below the target
are priced at the group's full load even as requests finish; a tree cut to n
nodes is assumed to keep its accepted path up to n. How close it comes is
measured in the README (SmolLM2 at 8 requests: HD within 10%, plain decoding
15-27% optimistic; the measured figure itself moves by about 7% between runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from deploy.planner.latency import ForwardCost
from deploy.planner.optimizer import Plan, Tables, target_round
from services.engine.batching import BatchLimits
from services.engine.budget import CostModel, DraftBudget
from services.engine.kernels import MAX_ROWS

GROUPS = 64  # simulated groups of B requests: enough for the mean to settle to a fraction of a percent
SEED = 0


@dataclass(frozen=True)
class Request:
    category: str
    prompt_tokens: int
    new_tokens: int  # what `hierspec plan` counts: the answer, and its stop token when it has one
    limit: int  # max_tokens: what the engine cuts drafts to near the end
    reused: int = 0  # prompt tokens the levels copy from earlier requests' caches (prefix caching): not computed


@dataclass
class _Running:
    request: Request
    prompt_left: int
    long: bool  # its prompt takes several forwards: chunked while others are active
    tokens: int = 0
    done_ms: float | None = None
    acceptance: float | None = None  # the draft budget's estimate of this request's, as the engine keeps it

    @property
    def context(self) -> int:
        """Tokens the level holds for the request before its next rows."""
        return self.request.prompt_tokens - self.prompt_left + max(self.tokens - 1, 0)


class _Rounds:
    """A round of one category's requests under the plan: draft rows the target verifies, tokens they commit, and
    the levels below the target's cost, for a draft cut to n tokens by the budget (0: a plain step)."""

    def __init__(self, plan: Plan, tables: Tables, load_tables: Tables):
        self.plan, self.tables, self.load_tables = plan, tables, load_tables
        self._draws: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def most(self, left: int) -> int:
        """The engine's draft room with `left` tokens to go (`HierarchicalDecoder._target_room`): the tokens left
        but the bonus one, and no more than the level below hands up."""
        plan = self.plan
        if len(plan.models) > 1:
            return min(plan.draft_tokens[-1], left - 1)
        return left - 1 if plan.drafter else 0

    def guess(self, rng: np.random.Generator) -> bool | None:
        """Whether the database drafter's one-token guess holds, from a measured tree that had a node (the first
        token of its accepted path among the root's candidates: a little likelier than the top one alone); None
        where the drafter never found one."""
        hits = self._guess_hits
        return bool(hits[rng.integers(len(hits))]) if len(hits) else None

    @cached_property
    def _guess_hits(self) -> np.ndarray:
        trees = self.tables.trees[self.plan.models[-1]]
        return trees.accepted[trees.nodes > 0] > 0

    def draws(self, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(rows of each measured round, tokens it accepts, ms of the levels below per round) at this budget."""
        if budget not in self._draws:
            self._draws[budget] = self._measure(budget)
        return self._draws[budget]

    def _measure(self, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
        plan, tables = self.plan, self.tables
        target = plan.models[-1]
        if budget <= 0:  # no room: the engine neither proposes nor drafts
            return np.ones(1, np.int64), np.zeros(1, np.int64), 0.0
        if len(plan.models) == 1:
            trees = tables.trees[target]
            return np.minimum(trees.nodes, budget) + 1, np.minimum(trees.accepted, budget), trees.drafter_ms
        tokens = min(budget, plan.draft_tokens[-1])
        cut = plan.model_copy(update={"draft_tokens": [*plan.draft_tokens[:-1], tokens]})
        bottom = len(plan.models) == 2 and not plan.drafter
        drafted, accepted = tables.pair(plan.models[-2], target).rounds(tokens, plan.min_confidence if bottom else None)
        verify = self.load_tables.costs[target]
        below = target_round(cut, self.load_tables).cost_ms - float(np.mean(verify(drafted + 1)))
        return drafted + 1, accepted, max(below, 0.0)


def simulate(plan: Plan, tables: dict[str, Tables], load_tables: dict[str, Tables], requests: list[Request],
             costs: dict[str, ForwardCost], concurrency: int, scale: float = 1.0, limits: BatchLimits | None = None,
             groups: int = GROUPS, seed: int = SEED) -> dict[str, float]:
    """Predicted ms per token of each category's requests (and "_all") when `concurrency` requests start together,
    drawn from `requests`. `tables` are per category at one request, `load_tables` the same priced in lockstep at
    `concurrency` (for the levels below the target); `costs` each level's batched forward (its curve is the
    engine's, which the draft budget uses), `scale` what the target's forwards of requests decoding together cost
    over that (`Profile.load_scale`). The draft budget learns the acceptance as the engine's does: one budget for
    the whole run, from its prior, observing every round it sized, and under the database drafter alone each
    request's own, from its rounds and, where the budget gave it no room, from the drafter's one-token guesses."""
    pooled = [r for r in requests if r.category in tables]
    if not pooled:
        raise ValueError("no calibration requests to simulate")
    limits = limits or BatchLimits()
    rng = np.random.default_rng(seed)
    rounds = {name: _Rounds(plan, tables[name], load_tables[name]) for name in tables}
    curves = {m: CostModel(tuple(c.curve.tokens), tuple(c.curve.ms)) for m, c in costs.items()}
    budget = DraftBudget(curves[plan.models[-1]], curves.get(plan.models[-2]) if len(plan.models) > 1 else None)
    totals: dict[str, list[float]] = {}
    for _ in range(groups):
        group = [pooled[i] for i in rng.integers(len(pooled), size=concurrency)]
        for run in _run_group(group, plan, rounds, costs, scale, budget, limits, rng):
            for key in (run.request.category, "_all"):
                ms, tokens = totals.setdefault(key, [0.0, 0])
                totals[key] = [ms + run.done_ms, tokens + run.tokens]
    return {key: ms / tokens for key, (ms, tokens) in totals.items()}


def _run_group(group: list[Request], plan: Plan, rounds: dict[str, _Rounds], costs: dict[str, ForwardCost],
               scale: float, budget: DraftBudget, limits: BatchLimits, rng: np.random.Generator) -> list[_Running]:
    runs = [_Running(r, r.prompt_tokens - r.reused, r.prompt_tokens - r.reused > MAX_ROWS) for r in group]
    target = plan.models[-1]
    alone = len(plan.models) == 1  # no draft model: a request's own acceptance sizes its drafts
    now = 0.0
    while True:
        active = [r for r in runs if r.done_ms is None]
        if not active:
            return runs
        shared = len(active) > 1
        rows, held = [], []  # the target's forward: each request's new rows and the tokens it holds before them
        prompt_rows, prompt_held = [], []  # the prompt chunks, which the levels below compute too
        below_ms = drafter_ms = 0.0
        for run in active:
            held.append(run.context)
            if run.prompt_left:
                chunk = min(run.prompt_left, limits.prompt_rows if shared and run.long else MAX_ROWS)
                run.prompt_left -= chunk
                prompt_rows.append(chunk)
                prompt_held.append(held[-1])
                if run.prompt_left:
                    rows.append(chunk)
                    continue
                chunk -= 1  # the prompt's last forward verifies the first draft: its last row is the draft's root
            else:
                chunk = 0
            category = rounds[run.request.category]
            most = category.most(run.request.limit - run.tokens)
            size = budget.tokens(len(active), most, run.acceptance if alone else None) if most > 0 else 0
            draft_rows, accepted, below = category.draws(size)
            pick = rng.integers(len(draft_rows))
            rows.append(chunk + int(draft_rows[pick]))
            run.tokens += int(accepted[pick]) + 1
            if size:
                run.acceptance = budget.observe(int(draft_rows[pick]) - 1, int(accepted[pick]), run.acceptance)
            elif most > 0 and plan.drafter and alone:  # the engine's unverified one-token guess
                hit = category.guess(rng)
                run.acceptance = run.acceptance if hit is None else budget.guessed(hit, run.acceptance)
            if alone:
                drafter_ms += below  # the database drafter: one request's tree at a time
            else:
                below_ms = max(below_ms, below)  # the levels below run every request's draft in shared forwards
        now += scale * costs[target](rows, held) + below_ms + drafter_ms
        if prompt_rows:
            now += sum(costs[m](prompt_rows, prompt_held) for m in plan.models[:-1])
        for run in active:
            if run.tokens >= run.request.new_tokens:
                run.tokens = run.request.new_tokens
                run.done_ms = now

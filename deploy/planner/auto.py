"""`auto`: the planner's hierarchy, chosen at start-up and re-chosen while a request runs.

At start-up the profile of the config's calibration workload is loaded (or
measured once and cached) and the planner picks the best plan overall and the
best plan of every calibration category. While generating, the request's own
rounds tell which category it resembles: the database drafter proposes a
shadow tree every round (microseconds) that is checked against what the rounds
commit, and the target's verification of the active plan's draft is scored
too, both under each category's measured distributions. A decaying posterior
over categories prices every candidate plan (its predicted ms per token per
category); the drafter-only plan is also priced directly from the request's
own recent shadow trees (the request's text may copy more, or less, than any
calibration category did), their counts pooled with the posterior's expected
tree as prior pseudo-rounds: averaging ms per token instead would let one
12-node miss in a request's first round (466 ms for one token on the Qwen
pair) price HD out of a function that then copies its whole signature. Trees
the committed tokens are still walking count with the depth reached so far.
The request switches when the expected saving on its remaining tokens
outweighs prefilling the levels the new plan adds, by a margin. Every choice
is lossless (services.engine.switching).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from deploy.builder import RunnerPool, build_decoder, plan_decoder
from deploy.config import HierspecConfig, LevelConfig, packaged_path
from deploy.planner.optimizer import Plan, plan_latency
from deploy.planner.planning import choose, split_workload
from deploy.planner.profiler import UNBOUNDED_DEPTH, Profile, run_profile, stderr_log
from services.engine.hsd import Generation, HierarchicalDecoder
from services.engine.switching import SwitchingDecoder
from services.engine.tree import TokenTree

DECAY = 0.9  # weight of older rounds' evidence: a request can drift between kinds of text
MARGIN = 0.05  # a switch must save this share of the current plan's expected time
SHADOW_WINDOW = 16  # recent shadow trees that price "HD under the target" for this very request
SHADOW_PRIOR_ROUNDS = 4  # ... pooled with the category prior's expected tree as this many rounds
LOADS = (1, 2, 4, 8, 16, 32)  # concurrent requests the plans are priced at (the request's load rounds down)


def load_profile(config: HierspecConfig, dtype: str, pool: RunnerPool) -> Profile:
    settings = config.planner
    calibration, _ = split_workload(str(packaged_path(settings.workload)), settings.per_category, 0, None)
    profile, _ = run_profile(config, dtype, calibration, settings.max_tokens, settings.max_draft, pool=pool,
                             log=stderr_log)
    return profile


def candidate_plans(profile: Profile) -> list[Plan]:
    """The best plan overall first, then each category's best (distinct ones)."""
    plans = [choose(profile)[0]]
    for name in sorted(profile.categories):
        best = choose(profile, [name])[0]
        if all(best.model_dump(exclude={"predicted_ms_per_token"}) != p.model_dump(exclude={"predicted_ms_per_token"})
               for p in plans):
            plans.append(best)
    return plans


def _log_pmf(values: np.ndarray, size: int) -> np.ndarray:
    """log P(X = k) for k < size - 1 and log P(X >= k) tails, smoothed so no outcome is impossible."""
    counts = np.bincount(np.minimum(values, size - 1), minlength=size).astype(float) + 0.5
    return np.log(counts / counts.sum())


@dataclass
class _Evidence:
    """One category's distributions of what a round can show."""

    tree: np.ndarray | None  # log P(accepted = k), HD tree verified by the target
    runs: dict[str, tuple[np.ndarray, np.ndarray]]  # model below the target -> (log P(run = k), log P(run >= k))


def _with_tail(log_pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pmf = np.exp(log_pmf)
    tail = np.log(np.maximum(np.cumsum(pmf[::-1])[::-1], 1e-12))
    return log_pmf, tail


@dataclass
class _ShadowWalk:
    """A shadow tree followed along the committed tokens until they leave it. A round of plain decoding
    commits one token, so its shadow tree is followed over the next rounds too: scored on that round's
    token alone, every tree would look at most one token deep, and a request that switched to plain
    decoding would never see HD pay again."""

    tree: TokenTree
    node: int = -1
    depth: int = 0

    def follow(self, tokens: list[int]) -> bool:
        """Walk on; True while the tokens so far stay on the tree and it goes deeper."""
        for token in tokens:
            child = self.tree.children(self.node).get(token)
            if child is None:
                return False
            self.node, self.depth = child, self.depth + 1
        return bool(self.tree.children(self.node))


@dataclass
class _RequestState:
    loglik: np.ndarray
    current: int | None = None
    warm: set[str] = field(default_factory=set)
    walks: list[_ShadowWalk] = field(default_factory=list)  # shadow trees not yet left by the committed tokens
    # (nodes, accepted) of the recent shadow trees
    trees: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=SHADOW_WINDOW))
    counts: tuple[int, int] = (0, 0)  # drafted/accepted of the level below the target, before the round


class CategoryChooser:
    def __init__(self, profile: Profile, plans: list[Plan], proposer, adaptive: bool = True):
        self.plans = plans
        self.categories = sorted(profile.categories)
        # predictions at each load: requests sharing every forward make draft rows dearer (see Profile.tables)
        self.latency = {load: np.array([[plan_latency(p, profile.tables([c], load)) for c in self.categories]
                                        for p in plans]) for load in LOADS}
        self.costs = profile.costs
        self.target = profile.target
        tables = profile.tables()
        self.drafter_ms = tables.trees[profile.target].drafter_ms if profile.target in tables.trees else 0.0
        # the plan "HD under the target alone" can be priced from the request's own shadow trees
        self.hd_plan = next((i for i, p in enumerate(plans) if p.drafter and len(p.models) == 1), None)
        self.proposer = proposer
        self.adaptive = adaptive
        size = profile.max_draft + 2
        self.evidence = []
        # per load and category: mean (verification ms, accepted tokens) of an HD tree under the target
        self.tree_means = {load: np.zeros((len(self.categories), 2)) for load in LOADS}
        for i, name in enumerate(self.categories):
            tables = profile.tables([name])
            tree = tables.trees.get(profile.target)
            tree_pmf = _log_pmf(tree.accepted, size * 2) if tree is not None else None
            if tree is not None:
                for load in LOADS:
                    cost = self.costs[self.target].at_load(load)
                    self.tree_means[load][i] = float(np.mean(cost(tree.nodes + 1))), tree.accepted.mean()
            runs = {lower: _with_tail(_log_pmf(t.rounds(profile.max_draft, None)[1], size))
                    for (lower, upper), t in tables.pairs.items() if upper == profile.target}
            self.evidence.append(_Evidence(tree_pmf, runs))
        self._states: weakref.WeakKeyDictionary[Generation, _RequestState] = weakref.WeakKeyDictionary()

    def _state(self, req: Generation) -> _RequestState:
        if req not in self._states:
            self._states[req] = _RequestState(np.zeros(len(self.categories)))
        return self._states[req]

    def choose(self, req: Generation, seq: list[int]) -> int:
        state = self._state(req)
        if self.proposer is not None and self.adaptive:
            state.walks.append(_ShadowWalk(self.proposer.propose(req.id, seq, UNBOUNDED_DEPTH)))
        plan_below = self.plans[state.current].models[-2] if state.current is not None and \
            len(self.plans[state.current].models) > 1 else None
        if plan_below is not None:
            stats = req.stats.of(plan_below)
            state.counts = (stats.drafted, stats.accepted)
        if state.current is not None and not self.adaptive:
            return state.current
        posterior = np.exp(state.loglik - state.loglik.max())
        posterior /= posterior.sum()
        load = max((b for b in LOADS if b <= req.load), default=1)
        expected = self.latency[load] @ posterior
        if self.hd_plan is not None:
            expected[self.hd_plan] = self._direct_hd(state, posterior, load)
        remaining = max(1, req.max_tokens - len(req.token_ids))
        prefill = np.array([sum(float(self.costs[m](len(seq))) for m in p.models[:-1] if m not in state.warm)
                            for p in self.plans])
        total = expected * remaining + prefill
        best = int(np.argmin(total))
        if state.current is None or total[best] < total[state.current] - MARGIN * expected[state.current] * remaining:
            state.current = best
        state.warm.update(self.plans[state.current].models)
        return state.current

    def _direct_hd(self, state: _RequestState, posterior: np.ndarray, load: int = 1) -> float:
        """ms per token of HD under the target alone: the request's own shadow trees (finished, and the
        ones still being walked, at their depth so far) pooled with the posterior's expected tree, with
        `load` requests sharing the target's forwards."""
        prior_ms, prior_accepted = posterior @ self.tree_means[load]
        rounds = [*state.trees, *((len(w.tree), w.depth) for w in state.walks[:-1])]
        nodes, accepted = np.array(rounds, dtype=np.int64).reshape(-1, 2).T
        pooled = len(rounds) + SHADOW_PRIOR_ROUNDS
        cost = self.costs[self.target].at_load(load)
        ms = (float(np.sum(cost(nodes + 1))) + SHADOW_PRIOR_ROUNDS * prior_ms) / pooled
        return (load * self.drafter_ms + ms) / (1 + (accepted.sum() + SHADOW_PRIOR_ROUNDS * prior_accepted) / pooled)

    def observe(self, req: Generation, member: int, seq: list[int], out: list[int]) -> None:
        if not self.adaptive:
            return
        state = self._state(req)
        evidence = np.zeros(len(self.categories))
        walking = []
        for walk in state.walks:
            if walk.follow(out):
                walking.append(walk)
                continue
            state.trees.append((len(walk.tree), walk.depth))
            for i, e in enumerate(self.evidence):
                if e.tree is not None and len(walk.tree):
                    evidence[i] += e.tree[min(walk.depth, len(e.tree) - 1)]
        state.walks = walking
        plan = self.plans[member]
        if len(plan.models) > 1:
            below = plan.models[-2]
            stats = req.stats.of(below)
            drafted, accepted = stats.drafted - state.counts[0], stats.accepted - state.counts[1]
            if drafted > 0:
                for i, e in enumerate(self.evidence):
                    if below in e.runs:
                        pmf, tail = e.runs[below]
                        index = min(accepted, len(pmf) - 1)
                        evidence[i] += tail[index] if accepted >= drafted else pmf[index]
        state.loglik = DECAY * state.loglik + evidence


def resolve_auto(config: HierspecConfig, method: str, dtype: str) -> tuple[HierspecConfig, str]:
    """For the Serve app, whose level deployments are fixed at start-up: `auto` becomes the plan that is
    best overall, written out as a config hierarchy (no switching during requests there)."""
    if method != "auto":
        return config, method
    plan = choose(load_profile(config, dtype, RunnerPool()))[0]
    stderr_log(f"auto: serving {plan.describe()}")
    levels = [LevelConfig(model=m, draft_tokens=t, min_confidence=plan.min_confidence if i == 0 else 0.0)
              for i, (m, t) in enumerate(zip(plan.models, plan.draft_tokens))]
    return config.model_copy(update={"hierarchy": levels, "method": plan.method}), plan.method


def auto_decoder(config: HierspecConfig, dtype: str, pool: RunnerPool) -> SwitchingDecoder:
    profile = load_profile(config, dtype, pool)
    plans = candidate_plans(profile)
    members = [plan_decoder(config, plan, dtype, pool) for plan in plans]
    drafter = pool.drafter(config, members[0].target.runner.tokenizer)
    stderr_log("auto: candidate plans " + "; ".join(p.describe() for p in plans))
    chooser = CategoryChooser(profile, plans, drafter, adaptive=config.planner.adaptive)
    return SwitchingDecoder(members, [p.describe() for p in plans], chooser, proposer=drafter)


def method_decoder(config: HierspecConfig, method: str, dtype: str | None = None,
                   pool: RunnerPool | None = None) -> HierarchicalDecoder:
    """The decoder of any `--method`: `auto`'s switching decoder over the planner's candidates, else the
    config's fixed hierarchy."""
    dtype, pool = dtype or config.dtype, pool or RunnerPool()
    if method == "auto":
        return auto_decoder(config, dtype, pool)
    return build_decoder(config, method, dtype, pool)

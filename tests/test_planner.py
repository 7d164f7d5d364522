"""The planner: its optimizer against brute force, its latency model against a Monte Carlo run of the
real decoder on synthetic levels, and profiles through JSON."""

from __future__ import annotations

import asyncio
import itertools
import random

import numpy as np
import pytest
from sim_levels import Clock, SimDrafter, SimLevel, World

from deploy.planner.latency import CostCurve, ForwardCost, PairTable, TreeTable, rounds_to_reach
from deploy.planner.load import Request, simulate
from deploy.planner.optimizer import CONFIDENCE_STOPS, Plan, Tables, optimize, plan_latency, rank_structures
from deploy.planner.planning import choose
from deploy.planner.profiler import CategoryProfile, Profile, measure_category
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.sampling import SamplingParams
from services.engine.tree import TokenTree


def _geometric_runs(rng: random.Random, alpha: float, n: int, cap: int) -> list[int]:
    runs = []
    for _ in range(n):
        k = 0
        while k < cap and rng.random() < alpha:
            k += 1
        runs.append(k)
    return runs


def synthetic_tables(costs: dict[str, tuple[float, float]], alpha: dict[tuple[str, str], float],
                     trees: dict[str, float] | None = None, max_draft: int = 5, seed: int = 0) -> Tables:
    """Cost c(n) = a + b n per model, geometric acceptance runs per pair, random confidences, and
    drafter trees whose paths are accepted token by token with the given probability."""
    rng = random.Random(seed)
    tables = Tables(costs={m: CostCurve(tokens=[1, 20], ms=[a + b, a + 20 * b]) for m, (a, b) in costs.items()},
                    pairs={}, max_draft=max_draft)
    for pair, a in alpha.items():
        runs = _geometric_runs(rng, a, 400, max_draft)
        conf = [[rng.random() for _ in range(min(k + 1, max_draft))] for k in runs]
        tables.pairs[pair] = PairTable(runs, conf, max_draft)
    for model, hit in (trees or {}).items():
        nodes = [rng.choice([0, 3, 6, 9]) for _ in range(400)]
        accepted = [min(n, r) for n, r in zip(nodes, _geometric_runs(rng, hit, 400, 9))]
        tables.trees[model] = TreeTable(nodes, accepted, drafter_ms=0.05)
    return tables


def brute_force(tables: Tables, target: str, drafts: list[str]) -> Plan:
    """Every subset of drafts (in order), with or without the drafter, every T_i and confidence stop."""
    best = None
    for drafter in (False, True) if tables.trees else (False,):
        for size in range(len(drafts) + 1):
            for subset in itertools.combinations(drafts, size):
                stops = CONFIDENCE_STOPS if subset and not drafter else (0.0,)
                for tokens in itertools.product(range(1, tables.max_draft + 1), repeat=size):
                    for stop in stops:
                        plan = Plan(models=[*subset, target], draft_tokens=list(tokens), drafter=drafter,
                                    min_confidence=stop)
                        plan.predicted_ms_per_token = plan_latency(plan, tables)
                        if best is None or plan.predicted_ms_per_token < best.predicted_ms_per_token - 1e-12:
                            best = plan
    return best


ALL_PAIRS = ("a", "b"), ("a", "c"), ("a", "t"), ("b", "c"), ("b", "t"), ("c", "t")


@pytest.mark.parametrize("case", ["middle-helps", "middle-hurts", "drafter", "random"])
def test_optimizer_matches_brute_force(case):
    if case == "random":
        rng = random.Random(7)
        costs = {"a": (rng.uniform(1, 5), 0.3), "b": (rng.uniform(5, 20), 1.0), "c": (rng.uniform(20, 60), 2.0),
                 "t": (100.0, 4.0)}
        alpha = {pair: rng.uniform(0.3, 0.95) for pair in ALL_PAIRS}
        tables = synthetic_tables(costs, alpha, trees={m: rng.uniform(0.2, 0.8) for m in costs}, seed=3)
        drafts = ["a", "b", "c"]
    else:
        middle_cost = (10.0, 1.0) if case != "middle-hurts" else (85.0, 3.0)
        costs = {"a": (2.0, 0.2), "b": middle_cost, "t": (100.0, 4.0)}
        alpha = {("a", "b"): 0.9, ("a", "t"): 0.6, ("b", "t"): 0.9}
        trees = {"a": 0.85, "b": 0.5, "t": 0.3} if case == "drafter" else None
        tables = synthetic_tables(costs, alpha, trees=trees)
        drafts = ["a", "b"]
    expected = brute_force(tables, "t", drafts)
    chosen = optimize(tables, "t", drafts)
    assert chosen.predicted_ms_per_token == pytest.approx(expected.predicted_ms_per_token, rel=1e-9)
    assert plan_latency(chosen, tables) == pytest.approx(chosen.predicted_ms_per_token, rel=1e-9)
    ranked = rank_structures(tables, "t", drafts)
    assert ranked[0].predicted_ms_per_token == pytest.approx(expected.predicted_ms_per_token, rel=1e-9)
    if case == "middle-helps":
        assert chosen.models == ["a", "b", "t"]  # a cheap, well-aligned middle level pays for itself
    elif case == "middle-hurts":
        assert chosen.models == ["a", "t"]  # a middle level almost as slow as the target does not
    elif case == "drafter":
        assert chosen.drafter


def test_rounds_to_reach_is_a_renewal_count():
    # yields of exactly 2 tokens: T tokens take ceil(T / 2) rounds
    h = rounds_to_reach(np.array([0.0, 0.0, 1.0]), 6)
    assert list(h) == [0, 1, 1, 2, 2, 3, 3]


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve(tokens=[1, 4, 8], ms=[10.0, 16.0, 20.0])
    assert curve(2) == pytest.approx(12.0)
    assert curve(12) == pytest.approx(24.0)
    assert list(curve(np.array([1, 8]))) == [10.0, 20.0]
    with pytest.raises(ValueError):
        CostCurve(tokens=[4, 1], ms=[1.0, 2.0])


def _simulate(world_agree, costs, plan_levels, policies, drafter_hit, prompts, max_tokens):
    """Run the real decoder on the synthetic world; returns (virtual ms per token, decoder levels)."""
    clock = Clock()
    world = World(world_agree)
    levels = [SimLevel(world, i, costs[i], clock) for i in plan_levels]
    proposer = SimDrafter(world, drafter_hit, clock, cost_ms=0.05) if drafter_hit is not None else None
    decoder = HierarchicalDecoder(levels, policies, proposer=proposer)
    tokens = 0
    for prompt in prompts:
        tokens += len(decoder.generate(prompt, SamplingParams(), max_tokens).token_ids)
    return clock.ms / tokens


def test_latency_model_matches_monte_carlo_of_the_decoder():
    """Profile synthetic levels with the profiler's own measurement code, predict ms per token for
    several hierarchies, and run the real decoder on a virtual clock: within 3%."""
    agree = [0.8, 0.85]  # level 0 -> 1, level 1 -> target (2)
    costs = [CostCurve(tokens=[1, 17], ms=[2.0, 4.0]), CostCurve(tokens=[1, 17], ms=[12.0, 30.0]),
             CostCurve(tokens=[1, 17], ms=[50.0, 110.0])]
    names = ["sim-0", "sim-1", "sim-2"]
    hit = 0.7
    rng = random.Random(1)
    prompts = [[rng.randrange(1000) for _ in range(8)] for _ in range(3)]
    max_tokens = 1500

    # the profile: target texts, teacher-forced draft choices, replayed drafter rounds
    clock = Clock()
    world = World(agree)
    levels = {name: SimLevel(world, i, costs[i], clock) for i, name in enumerate(names)}
    texts = [world.greedy_text(2, prompt, max_tokens) for prompt in prompts]
    category = CategoryProfile()
    asyncio.run(measure_category(levels, names, SimDrafter(world, hit, clock, 0.05), prompts, texts, 16, category))
    profile = Profile(target="sim-2", drafts=names[:2], costs=dict(zip(names, costs)), categories={"x": category})
    tables = profile.tables()
    for tree in tables.trees.values():
        tree.drafter_ms = 0.05  # the virtual clock's price, not this machine's lookup time

    cases = [
        (Plan(models=["sim-2"]), [2], []),
        (Plan(models=["sim-0", "sim-2"], draft_tokens=[4]), [0, 2], [4]),
        (Plan(models=["sim-1", "sim-2"], draft_tokens=[6]), [1, 2], [6]),
        (Plan(models=["sim-0", "sim-1", "sim-2"], draft_tokens=[3, 7]), [0, 1, 2], [3, 7]),
        (Plan(models=["sim-2"], drafter=True), [2], []),
        (Plan(models=["sim-0", "sim-2"], draft_tokens=[5], drafter=True), [0, 2], [5]),
        (Plan(models=["sim-0", "sim-1", "sim-2"], draft_tokens=[4, 8], drafter=True), [0, 1, 2], [4, 8]),
    ]
    for plan, indices, tokens in cases:
        predicted = plan_latency(plan, tables)
        measured = _simulate(agree, costs, indices, [DraftPolicy(t) for t in tokens],
                             hit if plan.drafter else None, prompts, max_tokens)
        assert measured == pytest.approx(predicted, rel=0.03), plan.describe()


def test_profile_round_trips_through_json():
    category = CategoryProfile(prompts=1, tokens=3)
    category.pair("a", "t").runs.extend([0, 2, 5])
    category.pair("a", "t").confidence.extend([[0.5], [0.9, 0.8, 0.1], [0.99] * 5])
    tree = category.tree("t")
    tree.nodes.extend([0, 4])
    tree.accepted.extend([0, 3])
    tree.drafter_us.extend([20.0, 30.0])
    profile = Profile(key={"dtype": "float32"}, target="t", drafts=["a"], max_draft=5,
                      costs={"a": CostCurve(tokens=[1, 4], ms=[1.0, 2.0]),
                             "t": CostCurve(tokens=[1, 4], ms=[9.0, 12.0])},
                      forward_costs={"a": ForwardCost(curve=CostCurve(tokens=[1, 8], ms=[1.0, 3.0])),
                                     "t": ForwardCost(curve=CostCurve(tokens=[1, 8], ms=[9.0, 15.0]), key_ms=0.01)},
                      categories={"code": category})
    category.requests.append((4, 3, 1))
    category.reused_tokens = 1
    again = Profile.model_validate_json(profile.model_dump_json())
    assert again == profile
    plan = Plan(models=["a", "t"], draft_tokens=[3], min_confidence=0.2)
    assert plan_latency(plan, again.tables()) == pytest.approx(plan_latency(plan, profile.tables()))
    assert again.tables().trees["t"].drafter_ms == pytest.approx(0.025)
    assert again.load_latency(plan, 4)["_all"] > again.load_latency(plan, 1)["_all"]  # the batch shares forwards


def test_adaptive_auto_beats_the_best_static_plan_on_alternating_categories():
    """Requests alternate between text the databases know (the drafter's tokens are right 95% of the
    time) and text they do not (5%). Per category a different plan is best; `auto` tells them apart
    from each request's own rounds and beats every static plan on the mixed stream."""
    from deploy.builder import assemble
    from deploy.planner.auto import CategoryChooser, candidate_plans
    from services.engine.switching import SwitchingDecoder

    agree = [0.75]
    costs = [CostCurve(tokens=[1, 17], ms=[6.0, 10.0]), CostCurve(tokens=[1, 17], ms=[50.0, 90.0])]
    names = ["sim-0", "sim-1"]

    def hit(context):
        return 0.95 if context[0] % 2 == 0 else 0.05

    rng = random.Random(2)
    prompts = {kind: [[2 * rng.randrange(500) + kind] + [rng.randrange(1000) for _ in range(7)] for _ in range(4)]
               for kind in (0, 1)}
    clock = Clock()
    world = World(agree)
    levels = {name: SimLevel(world, i, costs[i], clock) for i, name in enumerate(names)}
    drafter = SimDrafter(world, hit, clock, cost_ms=0.05)

    categories = {}
    for kind, label in ((0, "known"), (1, "novel")):
        categories[label] = CategoryProfile()
        calibration = prompts[kind][:2]
        texts = [world.greedy_text(1, p, 400) for p in calibration]
        asyncio.run(measure_category(levels, names, drafter, calibration, texts, 16, categories[label]))
    profile = Profile(target="sim-1", drafts=["sim-0"], costs=dict(zip(names, costs)), categories=categories)
    for category in profile.categories.values():
        for tree in category.trees:
            tree.drafter_us = [50.0] * len(tree.nodes)

    stream = [p for pair in zip(prompts[0][2:], prompts[1][2:]) for p in pair]  # alternating, unseen prompts

    def run(decoder) -> float:
        clock.ms = 0.0
        tokens = sum(len(decoder.generate(p, SamplingParams(), 200).token_ids) for p in stream)
        return clock.ms / tokens

    def build(plan):
        return assemble(plan, [levels[m] for m in plan.models], lambda: drafter)

    static = {plan.describe(): run(build(plan)) for plan in rank_structures(profile.tables(), "sim-1", ["sim-0"])}
    plans = candidate_plans(profile)
    assert len(plans) > 1, "each category should have its own best plan"
    members = [build(plan) for plan in plans]
    chooser = CategoryChooser(profile, plans, drafter)
    adaptive = run(SwitchingDecoder(members, [p.describe() for p in plans], chooser, proposer=drafter))
    assert adaptive < min(static.values()), (adaptive, static)


def test_shadow_trees_are_followed_across_one_token_rounds():
    """Under plain decoding a round commits one token: a shadow tree is scored by how far the following
    rounds stay on it, not cut at that one token (else `auto` could never see HD pay again)."""
    from deploy.planner.auto import _ShadowWalk

    tree = TokenTree()
    tree.add_path([5, 6, 7], "context", budget=8)
    tree.add_path([5, 9], "model", budget=8)
    walk = _ShadowWalk(tree)
    assert walk.follow([5]) and walk.follow([6])
    assert not walk.follow([7]) and walk.depth == 3  # reached a leaf: all of it accepted
    walk = _ShadowWalk(tree)
    assert not walk.follow([5, 8]) and walk.depth == 1  # left the tree after one token
    assert not _ShadowWalk(TokenTree()).follow([1])  # an empty tree is done at once


def test_one_missed_tree_does_not_price_hd_out_but_a_run_of_them_does():
    """`auto` prices "HD under the target" from the request's own shadow trees pooled with its category
    prior: one 12-node miss in the first round (the answer's opening words) must not switch a request
    whose category copies well to plain decoding; a run of misses must; trees still being walked count
    with the depth the committed tokens reached."""
    from deploy.planner.auto import CategoryChooser, _RequestState, _ShadowWalk

    category = CategoryProfile(prompts=1, tokens=70)
    tree = category.tree("t")
    tree.nodes.extend([12] * 10)
    tree.accepted.extend([6] * 10)
    tree.drafter_us.extend([20.0] * 10)
    profile = Profile(target="t", drafts=[], max_draft=16, categories={"code": category},
                      costs={"t": CostCurve(tokens=[1, 13], ms=[181.0, 466.0])})
    plans = [Plan(models=["t"], drafter=True), Plan(models=["t"])]
    chooser = CategoryChooser(profile, plans, proposer=None)
    posterior = np.ones(1)
    plain_ms = 181.0

    state = _RequestState(np.zeros(1))
    state.trees.append((12, 0))
    assert chooser._direct_hd(state, posterior) < plain_ms
    state.trees.extend([(12, 0)] * 15)  # the whole window
    missing = chooser._direct_hd(state, posterior)
    assert missing > plain_ms
    copying = TokenTree()
    copying.add_path(list(range(12)), "context", budget=12)
    walk = _ShadowWalk(copying)
    assert walk.follow(list(range(5)))
    state.walks = [walk, _ShadowWalk(copying)]  # the last one was proposed this round: nothing known yet
    assert chooser._direct_hd(state, posterior) < missing


# requests sharing forwards: the simulated schedule (deploy.planner.load) ------------------------------------------

LINEAR = CostCurve(tokens=[1, 64], ms=[10.0, 73.0])  # c(r) = 9 + r ms


def _simulate_load(plan: Plan, requests: list[Request], concurrency: int, cache_ms: float = 0.0,
                   key_ms: float = 0.0) -> dict[str, float]:
    tables = Tables(costs={"t": LINEAR}, pairs={}, max_draft=8)
    costs = {"t": ForwardCost(curve=LINEAR, cache_ms=cache_ms, key_ms=key_ms)}
    return simulate(plan, {"x": tables}, {"x": tables}, requests, costs, concurrency, groups=4)


def test_load_simulation_prices_a_batch_of_short_prompts_exactly():
    """Four requests of 10-token prompts and 5 tokens, plain decoding: one forward of the four prompts (49 ms, the
    first tokens), then four forwards of 4 rows (13 ms each): every request ends at 101 ms."""
    result = _simulate_load(Plan(models=["t"]), [Request("x", 10, 5, 5)], 4)
    assert result["_all"] == pytest.approx(101.0 / 5) and result["x"] == result["_all"]
    # a cache beyond the curve's 64 tokens: a 100-token prompt in 64 and 36 rows (after 0 and 64 tokens), then one
    # row after 100 tokens, 36 of them beyond the curve's context: 36 x (cache_ms + 1 row x key_ms)
    longer = _simulate_load(Plan(models=["t"]), [Request("x", 100, 2, 2)], 1, cache_ms=2.0, key_ms=0.5)
    assert longer["_all"] == pytest.approx(((9 + 64) + (9 + 36) + (9 + 1 + 36 * 2.5)) / 2)


def test_load_simulation_computes_only_the_prompt_tokens_not_copied_from_earlier_requests():
    """A 100-token prompt whose first 36 tokens a level copies (prefix caching): one forward of 64 rows, then the
    second token's, as a 64-token prompt would take."""
    copied = _simulate_load(Plan(models=["t"]), [Request("x", 100, 2, 2, reused=36)], 1)
    assert copied["_all"] == pytest.approx(((9 + 64) + (9 + 1)) / 2)
    assert copied == _simulate_load(Plan(models=["t"]), [Request("x", 64, 2, 2)], 1)


def test_load_simulation_chunks_a_long_prompt_only_while_others_run():
    """A 160-token prompt takes 3 forwards alone (64 rows each at most) but 10 beside a decoding request
    (`prompt_rows`, 16): the request beside it decodes a token in each of those forwards."""
    alone = _simulate_load(Plan(models=["t"]), [Request("x", 160, 1, 1)], 1)
    assert alone["_all"] == pytest.approx(9 * 3 + 160)
    plan = Plan(models=["t"])
    tables = {"long": Tables(costs={"t": LINEAR}, pairs={}), "short": Tables(costs={"t": LINEAR}, pairs={})}
    requests = [Request("long", 160, 1, 1), Request("short", 4, 11, 11)]
    for seed in range(6):  # groups drawn until one holds both kinds
        result = simulate(plan, tables, tables, requests, {"t": ForwardCost(curve=LINEAR)}, 2, groups=1, seed=seed)
        if set(result) == {"long", "short", "_all"}:
            break
    # forward 1: 16 + 4 rows; forwards 2-10: 16 + 1 rows (the short request's tokens 2-10), forward 11: its last
    assert result["long"] == pytest.approx(9 * 10 + 16 * 10 + 4 + 9)
    assert result["short"] == pytest.approx((9 * 11 + 16 * 10 + 4 + 9 + 1) / 11)


def test_load_simulation_cuts_trees_to_the_tokens_left_and_speculates_under_load():
    """c(r) = 30 + r ms; trees of 6 nodes of which 4 are accepted. Alone: the prompt's forward verifies the first
    tree (10 rows, 5 tokens), six whole trees follow, then the engine's cuts to the tokens left (5 nodes, then
    none). Among 16 requests, where a forward's fixed cost is shared, speculating still pays."""
    curve = CostCurve(tokens=[1, 64], ms=[31.0, 94.0])
    trees = TreeTable([6] * 20, [4] * 20, drafter_ms=0.0)
    hd, ar = Plan(models=["t"], drafter=True), Plan(models=["t"])
    request = [Request("x", 4, 41, 41)]

    def run(plan: Plan, concurrency: int) -> float:
        tables = Tables(costs={"t": curve}, pairs={}, trees={"t": trees})
        return simulate(plan, {"x": tables}, {"x": tables}, request, {"t": ForwardCost(curve=curve)}, concurrency,
                        groups=2)["_all"]
    assert run(hd, 1) == pytest.approx((40 + 6 * 37 + 36 + 31) / 41)
    assert run(ar, 16) == pytest.approx((94 + 40 * 46) / 41)
    assert run(hd, 16) < 0.9 * run(ar, 16)


def test_load_simulation_decodes_plainly_where_the_budget_allows_no_draft():
    """A draft model so dear that no draft pays among 4 requests: the budget gives 0 tokens, and the engine then
    neither drafts nor runs the draft level, so the hierarchy costs what plain decoding does."""
    dear = CostCurve(tokens=[1, 64], ms=[1000.0, 1063.0])
    tables = Tables(costs={"a": dear, "t": LINEAR}, pairs={("a", "t"): PairTable([3] * 50, [[0.9] * 4] * 50, 8)})
    requests = [Request("x", 4, 30, 30)]
    costs = {"a": ForwardCost(curve=dear), "t": ForwardCost(curve=LINEAR)}
    hsd = simulate(Plan(models=["a", "t"], draft_tokens=[4]), {"x": tables}, {"x": tables}, requests, costs, 4)
    ar = simulate(Plan(models=["t"]), {"x": tables}, {"x": tables}, requests, costs, 4)
    assert hsd["_all"] == pytest.approx(ar["_all"] + 1015.0 / 30)  # the draft level's prefill of the prompts only


@pytest.mark.parametrize("plan", [Plan(models=["a", "t"], draft_tokens=[4], min_confidence=0.4),
                                  Plan(models=["a", "b", "t"], draft_tokens=[2, 5]),
                                  Plan(models=["a", "t"], draft_tokens=[3], drafter=True),
                                  Plan(models=["t"], drafter=True)])
def test_load_simulation_of_one_request_agrees_with_the_latency_model(plan):
    """One request, a one-token prompt and long answers: the simulated schedule draws the latency model's own
    rounds, so it must price decoding as `plan_latency` does (within the draws' noise)."""
    tables = synthetic_tables({"a": (1.0, 0.1), "b": (4.0, 0.2), "t": (10.0, 0.5)},
                              {("a", "b"): 0.8, ("a", "t"): 0.7, ("b", "t"): 0.85}, trees={"a": 0.6, "t": 0.6})
    result = simulate(plan, {"x": tables}, {"x": tables}, [Request("x", 1, 3000, 3000)],
                      {m: ForwardCost(curve=c) for m, c in tables.costs.items()}, 1, groups=2)
    assert result["_all"] == pytest.approx(plan_latency(plan, tables), rel=0.03)


def test_plans_under_load_are_ranked_by_the_simulated_schedule():
    """`choose` at a concurrency above one ranks each structure's best plan by `Profile.load_latency`."""
    rng = random.Random(3)
    category = CategoryProfile(prompts=4, prompt_tokens=400, tokens=160, requests=[(100, 40, 0)] * 4)
    pair = category.pair("a", "t")
    pair.runs.extend(_geometric_runs(rng, 0.7, 300, 16))
    pair.confidence.extend([[0.9] * min(k + 1, 16) for k in pair.runs])
    for model in ("a", "t"):
        tree = category.tree(model)
        tree.nodes.extend([4] * 100)
        tree.accepted.extend([rng.choice([0, 2, 4]) for _ in range(100)])
        tree.drafter_us.extend([20.0] * 100)
    curves = {"a": CostCurve(tokens=[1, 64], ms=[2.0, 8.0]), "t": CostCurve(tokens=[1, 64], ms=[20.0, 83.0])}
    profile = Profile(target="t", drafts=["a"], costs=curves, categories={"x": category}, key={"max_tokens": 40},
                      forward_costs={m: ForwardCost(curve=c, cache_ms=0.01) for m, c in curves.items()})
    plans = choose(profile, concurrency=4)
    assert len(plans) == 4  # plain, HD, the draft model, both
    predicted = [profile.load_latency(plan, 4)["_all"] for plan in plans]
    assert [plan.predicted_ms_per_token for plan in plans] == pytest.approx(predicted)
    assert predicted == sorted(predicted)

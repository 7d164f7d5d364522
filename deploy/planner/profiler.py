"""`hierspec profile`: what the planner needs, measured on this machine and a calibration workload.

- Cost curves: ms of one forward of each model for n new tokens (after a
  cached context, as in decoding), at a few n; `CostCurve` interpolates.
- Acceptance per category, for every ordered pair of models: the target's
  greedy output is generated once per prompt; one teacher-forced forward of
  each draft model over it gives that model's greedy choice (and confidence) at
  every position, so "how many of model l's tokens would model m accept from
  here" is read off for every position at no further model cost. Where neither
  is the target, both are read along the target's text: an approximation of
  their agreement along the upper model's own text.
- The HD drafter per verifying model: its rounds are replayed against that
  model's greedy text (tree size, accepted path length, lookup time), with the
  drafter's databases fed as in serving (the model DB learns each prompt only
  after it was replayed).

A profile is cached under the model cache, keyed by everything it depends on
(models, dtype, device, threads, the CPU signature, calibration settings), and
reused until one of them changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from deploy.config import HierspecConfig
from deploy.planner.latency import CostCurve, ForwardCost, PairTable, TreeTable
from deploy.planner.load import Request, simulate
from deploy.planner.optimizer import Plan, Tables
from drafter_db.drafter import HierarchicalDrafter
from services.engine.batching import BatchingLevel
from services.engine.hsd import TreeProposer
from services.engine.kernels import cpu_signature
from services.engine.levels import Level
from services.engine.model_store import cache_dir
from services.engine.runner import COST_CONTEXT
from services.engine.sampling import SamplingParams
from services.engine.tree import TokenTree

GREEDY = SamplingParams()  # the profile measures greedy decoding

PROFILE_VERSION = 9  # 9: each request's prompt tokens a level copies from another's cache (prefix caching)
COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 17, 64, 256)  # up to T_max + 1 (a verification of 16 drafts), then prefills
UNBOUNDED_DEPTH = 1 << 16  # the engine lets the drafter's own depth limit apply
LOAD_REQUESTS, LOAD_TOKENS = 8, 16  # the load probe: calibration prompts decoded together, tokens each
KEY_ROWS, KEY_CONTEXT = 64, 1024  # a cache's cost per token: 1 and 64 rows timed after 1024 more tokens of context


class PairSamples(BaseModel):
    lower: str
    upper: str
    runs: list[int] = Field(default_factory=list)
    confidence: list[list[float]] = Field(default_factory=list)
    starts: list[int] = Field(default_factory=list, description="index of each text's first position")


class TreeSamples(BaseModel):
    upper: str
    nodes: list[int] = Field(default_factory=list)
    accepted: list[int] = Field(default_factory=list)
    drafter_us: list[float] = Field(default_factory=list)


class CategoryProfile(BaseModel):
    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = Field(0, description="prompt tokens a level copied from earlier requests' caches")
    tokens: int = 0
    pairs: list[PairSamples] = Field(default_factory=list)
    trees: list[TreeSamples] = Field(default_factory=list)
    requests: list[tuple[int, int, int]] = Field(default_factory=list,
                                                 description="(prompt, generated, reused prompt) tokens of each")

    def pair(self, lower: str, upper: str) -> PairSamples:
        for pair in self.pairs:
            if (pair.lower, pair.upper) == (lower, upper):
                return pair
        self.pairs.append(PairSamples(lower=lower, upper=upper))
        return self.pairs[-1]

    def tree(self, upper: str) -> TreeSamples:
        for tree in self.trees:
            if tree.upper == upper:
                return tree
        self.trees.append(TreeSamples(upper=upper))
        return self.trees[-1]


class Profile(BaseModel):
    version: int = PROFILE_VERSION
    key: dict = Field(default_factory=dict, description="what the measurements depend on")
    target: str
    drafts: list[str] = Field(description="draft models, cheapest first")
    max_draft: int = 16
    costs: dict[str, CostCurve]
    forward_costs: dict[str, ForwardCost] = Field(
        default_factory=dict, description="ms of one batched forward (over the engine's own curve, which its draft "
                                          "budget uses): what requests sharing forwards pay")
    cost_context: int = Field(0, description="context (tokens) before the forwards `costs` timed")
    load_scale: float = Field(1.0, gt=0.0, description="what the target's forwards of requests decoding together "
                                                       "cost, over what `forward_costs` price them at")
    categories: dict[str, CategoryProfile]

    def tables(self, categories: list[str] | None = None, concurrency: int = 1) -> Tables:
        """The latency model's inputs for some categories pooled (default: all), for a request among
        `concurrency` that share every forward (the router drafts for each of them in turn)."""
        names = categories or list(self.categories)
        prompts = sum(self.categories[n].prompts for n in names)
        pairs: dict[tuple[str, str], tuple[list, list, list]] = {}
        trees: dict[str, tuple[list, list, list]] = {}
        for name in names:
            category = self.categories[name]
            for p in category.pairs:
                runs, conf, starts = pairs.setdefault((p.lower, p.upper), ([], [], []))
                starts.extend(len(runs) + s for s in p.starts or [0])
                runs.extend(p.runs)
                conf.extend(p.confidence)
            for t in category.trees:
                nodes, accepted, us = trees.setdefault(t.upper, ([], [], []))
                nodes.extend(t.nodes)
                accepted.extend(t.accepted)
                us.extend(t.drafter_us)
        return Tables(
            costs={name: curve.at_load(concurrency) for name, curve in self.costs.items()},
            pairs={k: PairTable(runs, conf, self.max_draft, starts) for k, (runs, conf, starts) in pairs.items()
                   if runs},
            trees={k: TreeTable(nodes, acc, concurrency * statistics.fmean(us) / 1000 if us else 0.0)
                   for k, (nodes, acc, us) in trees.items() if nodes},
            max_draft=self.max_draft,
            prompt_tokens=sum(self.categories[n].prompt_tokens - self.categories[n].reused_tokens
                              for n in names) / max(1, prompts),
            new_tokens=sum(self.categories[n].tokens for n in names) / max(1, prompts),
        )

    def load_latency(self, plan: Plan, concurrency: int, categories: list[str] | None = None) -> dict[str, float]:
        """Predicted ms per token per category and "_all" of `concurrency` requests that start together, drawn
        from the calibration requests of `categories` (default: all): the batching level's schedule, simulated
        (`deploy.planner.load`)."""
        names = [n for n in categories or list(self.categories) if self.categories[n].requests]
        limit = self.key.get("max_tokens") or max((new for n in names for _, new, _ in self.categories[n].requests),
                                                  default=1)
        # `hierspec plan` counts a stop token as a token produced: an answer shorter than the limit ended on one
        requests = [Request(name, prompt, new + (new < limit), limit, reused) for name in names
                    for prompt, new, reused in self.categories[name].requests]
        return simulate(plan, {n: self.tables([n]) for n in names}, {n: self.tables([n], concurrency) for n in names},
                        requests, self.forward_costs, concurrency, self.load_scale)


# measurements ------------------------------------------------------------------------------------

async def measure_cost(level: Level, context: list[int], sizes=COST_SIZES, repeats: int = 7) -> CostCurve:
    """Median ms of a forward of n new tokens after `context` (cached first, as during decoding), made
    non-decreasing in n (more tokens never cost less; what says otherwise is this machine's noise)."""
    rng = random.Random(0)
    request = "profile-cost"
    await level.logits(request, context, 1, picks=GREEDY)
    ms = []
    for n in sizes:
        times = []
        for _ in range(repeats if n <= 32 else 3):  # a prefill takes seconds
            extra = [rng.randrange(level.vocab_size) for _ in range(n)]
            start = time.perf_counter()
            await level.logits(request, context + extra, n, picks=GREEDY)
            times.append(1000 * (time.perf_counter() - start))
        ms.append(max([statistics.median(times), *ms[-1:]]))
    await level.release(request)
    return CostCurve(tokens=list(sizes), ms=ms)


async def teacher_forced(level: Level, prompt: list[int], text: list[int]) -> tuple[list[int], list[float]]:
    """The level's greedy choice and its probability at every position of `text` after `prompt`."""
    request = "profile-teacher"
    scores = await level.logits(request, prompt + text[:-1], len(text), picks=GREEDY, confidence=True)
    await level.release(request)
    return scores.tokens, scores.probs


def pair_outcomes(lower: list[int], lower_probs: list[float], upper: list[int], max_draft: int,
                  samples: PairSamples) -> None:
    """At every position: how many of `lower`'s choices in a row match `upper`'s (capped), and the
    lower model's confidence along them and at the first mismatch. Positions whose outcome runs past
    the end of the text are unknown and skipped."""
    length = len(upper)
    samples.starts.append(len(samples.runs))
    for p in range(length):
        k = 0
        while k < max_draft and p + k < length and lower[p + k] == upper[p + k]:
            k += 1
        if k < max_draft and p + k >= length:
            continue
        samples.runs.append(k)
        samples.confidence.append([round(x, 4) for x in lower_probs[p : p + min(k + 1, max_draft)]])


def _accepted_path(tree: TokenTree, reference: list[int]) -> list[int] | None:
    """Greedy verification of a tree against a known continuation (None: it runs past its end)."""
    path, node = [], -1
    for token in reference:
        node = tree.children(node).get(token)
        if node is None:
            return path
        path.append(node)
    return None if tree.children(path[-1] if path else -1) else path


def tree_outcomes(drafter: TreeProposer, request_id: str, prompt: list[int], text: list[int],
                  reference: list[int], completed: bool, samples: TreeSamples) -> None:
    """Replay the drafter's rounds over `text` (the committed tokens) verified against `reference`
    (the verifying model's greedy choices along it)."""
    drafter.start(request_id, prompt)
    try:
        p = 0
        while p < len(text):
            start = time.perf_counter()
            tree = drafter.propose(request_id, prompt + text[:p], UNBOUNDED_DEPTH)
            seconds = time.perf_counter() - start
            path = _accepted_path(tree, reference[p:])
            if path is None:
                break
            samples.nodes.append(len(tree))
            samples.accepted.append(len(path))
            samples.drafter_us.append(round(1e6 * seconds, 2))
            drafter.observe(request_id, tree, path)
            step = text[p : p + len(path) + 1]
            drafter.commit(request_id, step)
            p += len(step)
    finally:
        drafter.finish(request_id, completed)


async def measure_category(levels: dict[str, Level], order: list[str], drafter: TreeProposer | None,
                           prompts: list[list[int]], texts: list[list[int]], max_draft: int,
                           category: CategoryProfile, label: str = "", reused: list[int] | None = None) -> None:
    """Acceptance samples for one category; `texts[i]` is the target's greedy output for `prompts[i]`,
    `order` the models cheapest first, the target last; `reused[i]` the prompt tokens the target copied from
    earlier requests' caches when it decoded `texts[i]` (default none)."""
    target = order[-1]
    for index, (prompt, text, copied) in enumerate(zip(prompts, texts, reused or [0] * len(prompts))):
        if len(text) < 2:
            continue
        choices = {target: (text, [1.0] * len(text))}
        for name in order[:-1]:
            choices[name] = await teacher_forced(levels[name], prompt, text)
        for i, lower in enumerate(order):
            for upper in order[i + 1:]:
                pair_outcomes(choices[lower][0], choices[lower][1], choices[upper][0], max_draft,
                              category.pair(lower, upper))
        if drafter is not None:
            for name in order:  # the target last: only then may the model DB learn this output
                tree_outcomes(drafter, f"profile-{label}-{index}-{name}", prompt, text, choices[name][0],
                              completed=name == target, samples=category.tree(name))
        category.prompts += 1
        category.prompt_tokens += len(prompt)
        category.reused_tokens += copied
        category.tokens += len(text)
        category.requests.append((len(prompt), len(text), copied))


# the command ---------------------------------------------------------------------------------------

def profile_key(config: HierspecConfig, dtype: str, calibration: dict) -> dict:
    import torch

    return {"version": PROFILE_VERSION, "target": config.models.target, "drafts": sorted(config.models.drafts),
            "dtype": dtype, "device": config.device, "threads": torch.get_num_threads(), "cpu": cpu_signature(),
            "drafter": config.drafter.model_dump(), **calibration}


def profile_path(key: dict) -> Path:
    """Under $HIERSPEC_PROFILE_DIR, else the model cache's `profiles/`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("HIERSPEC_PROFILE_DIR") or cache_dir() / "profiles").expanduser()
    return folder / f"{key['target']}-{digest}.json"


async def measure_costs(levels: dict[str, BatchingLevel], target: str, context: int, prompts: list[list[int]],
                        log=print) -> tuple[dict[str, CostCurve], dict[str, ForwardCost], float]:
    """Each model's forward cost: one request's new tokens after `context` tokens; its batched forward (the
    engine's curve over rows of several requests holding COST_CONTEXT tokens each, `BatchingLevel.costs`, and what
    a longer cache adds: 1 and KEY_ROWS rows timed after COST_CONTEXT and after KEY_CONTEXT more tokens); and the
    target's load scale on `prompts` (`measure_load_scale`)."""
    costs, forward_costs = {}, {}
    for name, level in levels.items():
        log(f"profile: forward cost of {name}")
        costs[name] = await measure_cost(level, _tokens(level, context))
        near, far = [(await measure_cost(level, _tokens(level, COST_CONTEXT + extra), sizes=(1, KEY_ROWS))).ms
                     for extra in (0, KEY_CONTEXT)]
        one, many = far[0] - near[0], far[1] - near[1]  # KEY_CONTEXT (cache_ms + rows key_ms) at 1 and KEY_ROWS rows
        key_ms = max(many - one, 0.0) / ((KEY_ROWS - 1) * KEY_CONTEXT)
        batched = level.costs  # the engine's own curve, cached per machine: what its draft budget uses
        forward_costs[name] = ForwardCost(curve=CostCurve(tokens=list(batched.rows), ms=list(batched.ms)),
                                          cache_ms=max(one / KEY_CONTEXT - key_ms, 0.0), key_ms=key_ms)
    scale = await measure_load_scale(levels[target], prompts, forward_costs[target], log)
    return costs, forward_costs, scale


async def measure_load_scale(level: BatchingLevel, prompts: list[list[int]], cost: ForwardCost, log=print) -> float:
    """Decode LOAD_REQUESTS calibration prompts together (plain decoding, LOAD_TOKENS tokens each: chunked
    prefills beside decoding rows, long caches) and return what their forwards took over what `cost` prices them
    at: the rest of what real forwards cost (requests of mixed shapes, the machine's speed at the time)."""
    log(f"profile: {LOAD_REQUESTS} requests at once on {level.name}")
    prompts = [prompts[i % len(prompts)] for i in range(LOAD_REQUESTS)]

    async def decode(index: int, prompt: list[int]) -> None:
        request, sequence = f"profile-load-{index}", list(prompt)
        for _ in range(LOAD_TOKENS):
            sequence.extend((await level.logits(request, sequence, 1, picks=GREEDY)).tokens)
        await level.release(request, keep_prefix=False)  # calibration prompts: what they copy must be earlier turns

    level.trace = []
    try:
        await asyncio.gather(*(decode(i, p) for i, p in enumerate(prompts)))
        trace = level.trace
    finally:
        level.trace = None
    return sum(ms for *_, ms in trace) / sum(cost(rows, held) for rows, held, _ in trace)


def _tokens(level: Level, length: int) -> list[int]:
    return [i % level.vocab_size for i in range(length)]


def run_profile(config: HierspecConfig, dtype: str, questions, max_tokens: int, max_draft: int = 16,
                pool=None, refresh: bool = False, log=print, fresh_costs: bool = False) -> tuple[Profile, Path]:
    """Load the cached profile for these settings, or measure it (minutes: one greedy generation
    per calibration prompt, one forward per draft model and prompt, a few cost curves). `fresh_costs`: time the
    forwards of a cached profile again (a minute or two), for a prediction of what runs next on this machine
    (a shared machine's speed moves by 10-30% between hours)."""
    from deploy.builder import RunnerPool, build_decoder
    from deploy.workload import category_group
    from services.engine.prompts import Conversation, stop_token_ids
    from services.engine.sampling import SamplingParams

    calibration = {"questions": [str(q.question_id) for q in questions],
                   # the prompts themselves: an edited calibration file is measured again
                   "prompts_sha256": hashlib.sha256(json.dumps([q.turns for q in questions]).encode()).hexdigest(),
                   "max_tokens": max_tokens, "max_draft": max_draft}
    key = profile_key(config, dtype, calibration)
    path = profile_path(key)
    cached = None
    if path.exists() and not refresh:
        try:
            cached = Profile.model_validate_json(path.read_text())
        except ValueError:  # a profile of an older layout (or damaged): measured again
            log(f"profile: {path} does not parse; measuring again")
    if cached is not None:
        if cached.key == key:
            log(f"profile: reusing {path}")
            if fresh_costs:
                pool = pool or RunnerPool()
                levels = {name: pool.level(name, dtype, config.device) for name in cached.costs}
                prompts = probe_prompts(questions, levels[cached.target].runner.tokenizer)
                cached.costs, cached.forward_costs, cached.load_scale = asyncio.run(
                    measure_costs(levels, cached.target, cached.cost_context, prompts, log))
                _write(path, cached)
            return cached, path

    pool = pool or RunnerPool()
    names = [config.models.target, *config.models.drafts]
    levels = {name: pool.level(name, dtype, config.device) for name in names}
    target_runner = levels[config.models.target].runner
    tokenizer = target_runner.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    reference = build_decoder(config, "hd", dtype, pool)
    drafter = reference.proposer
    # the reference text comes from a drafter without a model DB, so that the measured drafter
    # never sees a prompt's output before it is replayed
    reference.proposer = HierarchicalDrafter(drafter.config, None, drafter.statistics)
    categories: dict[str, CategoryProfile] = {}
    costs: dict[str, CostCurve] = {}
    forward_costs: dict[str, ForwardCost] = {}
    load_scale, context = 1.0, 0
    order: list[str] = []
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    try:
        for index, question in enumerate(questions, start=1):
            group = category_group(question.category)
            chat = Conversation(tokenizer)
            for turn, user_text in enumerate(question.turns):
                prompt = chat.ask(user_text)
                reused = target_runner.prefix_tokens_reused
                text = reference.generate(prompt, SamplingParams(), max_tokens, stop_ids).token_ids
                reused = target_runner.prefix_tokens_reused - reused  # its prompt's prefix cached before
                chat.answer(text)
                if not costs:  # at a context as long as mid-generation
                    context = len(prompt) + min(len(text), max_tokens // 2)
                    prompts = probe_prompts(questions, tokenizer)
                    costs, forward_costs, load_scale = loop.run_until_complete(
                        measure_costs(levels, config.models.target, context, prompts, log))
                    order = [*sorted(config.models.drafts, key=lambda n: costs[n](1)), config.models.target]
                loop.run_until_complete(measure_category(levels, order, drafter, [prompt], [text], max_draft,
                                                         categories.setdefault(group, CategoryProfile()),
                                                         label=f"{question.question_id}-{turn}", reused=[reused]))
                log(f"profile: [{index}/{len(questions)}] {question.category} #{question.question_id} "
                    f"turn {turn + 1}, {len(text)} tokens, {time.perf_counter() - started:.0f} s elapsed")
    finally:
        loop.close()
    profile = Profile(key=key, target=config.models.target, drafts=order[:-1], max_draft=max_draft, costs=costs,
                      forward_costs=forward_costs, cost_context=context, load_scale=load_scale,
                      categories=categories)
    _write(path, profile)
    return profile, path


def _write(path: Path, profile: Profile) -> None:
    """Whole or not at all: an interrupted write must not leave a profile that no longer parses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(profile.model_dump_json())
    os.replace(partial, path)


def probe_prompts(questions, tokenizer) -> list[list[int]]:
    """First turns of up to LOAD_REQUESTS calibration questions, the categories taken in turn (a workload lists
    them category by category, and the load probe should hold long prompts and short ones)."""
    from deploy.workload import category_group
    from services.engine.prompts import Conversation

    by_category: dict[str, list] = {}
    for question in questions:
        by_category.setdefault(category_group(question.category), []).append(question)
    mixed = [q for row in itertools.zip_longest(*by_category.values()) for q in row if q is not None]
    return [Conversation(tokenizer).ask(q.turns[0]) for q in mixed[:LOAD_REQUESTS]]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

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
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from deploy.config import HierspecConfig
from deploy.planner.latency import CostCurve, PairTable, TreeTable
from deploy.planner.optimizer import Tables
from drafter_db.drafter import HierarchicalDrafter
from services.engine.hsd import TreeProposer
from services.engine.kernels import cpu_signature
from services.engine.levels import Level
from services.engine.model_store import cache_dir
from services.engine.sampling import SamplingParams
from services.engine.tree import TokenTree

GREEDY = SamplingParams()  # the profile measures greedy decoding

PROFILE_VERSION = 6
COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 17, 64, 256)  # up to T_max + 1 (a verification of 16 drafts), then prefills
UNBOUNDED_DEPTH = 1 << 16  # the engine lets the drafter's own depth limit apply


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
    tokens: int = 0
    pairs: list[PairSamples] = Field(default_factory=list)
    trees: list[TreeSamples] = Field(default_factory=list)

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
            prompt_tokens=sum(self.categories[n].prompt_tokens for n in names) / max(1, prompts),
            new_tokens=sum(self.categories[n].tokens for n in names) / max(1, prompts),
        )


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
                           category: CategoryProfile, label: str = "") -> None:
    """Acceptance samples for one category; `texts[i]` is the target's greedy output for `prompts[i]`,
    `order` the models cheapest first, the target last."""
    target = order[-1]
    for index, (prompt, text) in enumerate(zip(prompts, texts)):
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
        category.tokens += len(text)


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


def run_profile(config: HierspecConfig, dtype: str, questions, max_tokens: int, max_draft: int = 16,
                pool=None, refresh: bool = False, log=print) -> tuple[Profile, Path]:
    """Load the cached profile for these settings, or measure it (minutes: one greedy generation
    per calibration prompt, one forward per draft model and prompt, a few cost curves)."""
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
    if path.exists() and not refresh:
        cached = Profile.model_validate_json(path.read_text())
        if cached.key == key:
            log(f"profile: reusing {path}")
            return cached, path

    pool = pool or RunnerPool()
    names = [config.models.target, *config.models.drafts]
    levels = {name: pool.level(name, dtype, config.device) for name in names}
    tokenizer = levels[config.models.target].runner.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    reference = build_decoder(config, "hd", dtype, pool)
    drafter = reference.proposer
    # the reference text comes from a drafter without a model DB, so that the measured drafter
    # never sees a prompt's output before it is replayed
    reference.proposer = HierarchicalDrafter(drafter.config, None, drafter.statistics)
    categories: dict[str, CategoryProfile] = {}
    costs: dict[str, CostCurve] = {}
    order: list[str] = []
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    try:
        for index, question in enumerate(questions, start=1):
            group = category_group(question.category)
            chat = Conversation(tokenizer)
            for turn, user_text in enumerate(question.turns):
                prompt = chat.ask(user_text)
                text = reference.generate(prompt, SamplingParams(), max_tokens, stop_ids).token_ids
                chat.answer(text)
                if not costs:  # at a context as long as mid-generation
                    for name in names:
                        log(f"profile: forward cost of {name}")
                        costs[name] = loop.run_until_complete(measure_cost(levels[name],
                                                                           prompt + text[: max_tokens // 2]))
                    order = [*sorted(config.models.drafts, key=lambda n: costs[n](1)), config.models.target]
                loop.run_until_complete(measure_category(levels, order, drafter, [prompt], [text], max_draft,
                                                         categories.setdefault(group, CategoryProfile()),
                                                         label=f"{question.question_id}-{turn}"))
                log(f"profile: [{index}/{len(questions)}] {question.category} #{question.question_id} "
                    f"turn {turn + 1}, {len(text)} tokens, {time.perf_counter() - started:.0f} s elapsed")
    finally:
        loop.close()
    profile = Profile(key=key, target=config.models.target, drafts=order[:-1], max_draft=max_draft, costs=costs,
                      categories=categories)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json())
    return profile, path


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""`hierspec bench`: tokens per second of each method on a Spec-Bench style workload.

Methods run interleaved, prompt by prompt (under `--concurrency`, chunk by
chunk), so that the machine's drift hits them alike. A shared VM's speed still
moves by 10-20% between minutes, which one chunk of concurrent questions per
method does not average out: with `--repeats N` the whole run is measured N
times, each with fresh drafters (a model DB that learnt a repeat's answers
would flatter the next) and the methods' order reversed every other repeat,
and each method's speed against `ar` is the median of the repeats' own ratios
(its tokens per second and the per-category figures pool all repeats).
Multi-turn questions run as conversations: each answer is appended
to the chat before the next user turn, and every turn's tokens count. Each
method's output is compared with our own plain decoding (`ar`); for the first
divergence of a question the bench reports the position and the margin
between `ar`'s top two logits there, so a bfloat16 near-tie can be told from
a bug.

The drafter's cost is reported twice: per draft inside the decoding loop
(each draft follows a forward that has evicted the CPU's caches, so the
first touch of any Python object is a memory access), and as the lookup
latency proper, replaying the plain-decoding outputs through each method's
drafter after the run, its databases and caches warm.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deploy.bench.baselines import BASELINES, Baselines, check_baseline
from deploy.bench.chart import draw_chart
from deploy.builder import RunnerPool, configure_torch
from deploy.config import ConfigError, HierspecConfig
from deploy.planner.auto import method_decoder
from deploy.workload import Question, category_group, load_workload
from drafter_db.replay import replay
from services.engine.kernels import machine
from services.engine.prompts import Conversation, stop_token_ids
from services.engine.sampling import SamplingParams

OUR_METHODS = ("ar", "hsd", "hd", "hd+hsd", "auto")


@dataclass
class MethodTotals:
    tokens: int = 0
    seconds: float = 0.0
    verifications: int = 0
    questions: int = 0
    identical: int = 0
    divergences: list[dict] = field(default_factory=list)
    draft_seconds: list[float] = field(default_factory=list)

    def summary(self, ar_speed: float | None) -> dict:
        speed = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(speed, 3),
            "speedup_vs_ar": round(speed / ar_speed, 3) if ar_speed else None,
            "mean_accepted": round(self.tokens / self.verifications, 3) if self.verifications else None,
            "identical_to_ar": round(self.identical / self.questions, 4) if self.questions else None,
            "drafter_median_us": round(1e6 * statistics.median(self.draft_seconds), 1) if self.draft_seconds else None,
            "divergences": self.divergences,
        }


def _top2_margin(decoder, prompt_ids: list[int], ar_ids: list[int], position: int) -> float:
    logits = decoder.target.runner.logits("bench-margin", prompt_ids + ar_ids[:position], 1)[0]
    decoder.target.runner.release("bench-margin")
    top = torch.topk(logits, 2).values
    return round(float(top[0] - top[1]), 5)


@dataclass
class _Answer:
    """One question's conversation under one method: each turn's (prompt ids, output ids), the tokens produced
    (a stop token included), the target's verifications and the drafter's seconds per draft."""

    turns: list[tuple[list[int], list[int]]] = field(default_factory=list)
    produced: int = 0
    verifications: int = 0
    draft_seconds: list[float] = field(default_factory=list)


def _divergence(ar, question: Question, params: SamplingParams, reference: _Answer, result: _Answer) -> dict | None:
    """Where `result` first differs from `ar`'s answer to the same question, with ar's top-2 margin there."""
    for turn_index, ((ar_prompt, ar_ids), (prompt_ids, ids)) in enumerate(zip(reference.turns, result.turns)):
        if ar_prompt != prompt_ids or ar_ids != ids:
            position = next((i for i, (a, b) in enumerate(zip(ar_ids, ids)) if a != b), min(len(ar_ids), len(ids)))
            margin = _top2_margin(ar, ar_prompt, ar_ids, position) if ar_prompt == prompt_ids else None
            return {"question_id": question.question_id, "seed": params.seed, "turn": turn_index,
                    "position": position, "ar_top2_margin": margin}
    return None


def run_bench(config: HierspecConfig, workload: str, methods: list[str], out: str, per_category: int | None,
              max_tokens: int, dtype: str | None, categories: str | None,
              sampling: SamplingParams | None = None, seeds: int = 1, concurrency: int = 1,
              repeats: int = 1) -> dict:
    """`sampling` (default greedy): with a temperature, every question runs once per seed 0..seeds-1, and a
    method's output is compared with `ar`'s for the same seed (coupled sampling: identical). `concurrency`:
    N questions are in flight at all times (the next starts as soon as one ends, as under a serving load), their
    level calls batched; methods take turns over chunks of 4N questions, and a method's speed is its tokens over
    its wall time. `repeats`: see the module's docstring."""
    sampling = sampling or SamplingParams()
    dtype = dtype or config.dtype
    for method in methods:
        if method not in OUR_METHODS and method not in BASELINES:
            raise ConfigError(f"unknown method {method!r}; available: {', '.join([*OUR_METHODS, *BASELINES])}")
        if method in BASELINES:
            check_baseline(method, config, dtype, sampling.greedy, concurrency)
    runs = [sampling] if sampling.greedy else [sampling.model_copy(update={"seed": s}) for s in range(seeds)]
    questions = load_workload(workload, per_category, categories)
    configure_torch(config)
    run_methods = ["ar"] + [m for m in methods if m != "ar"]  # ar is the reference for identity
    pool = RunnerPool()
    # each method its own drafter: a model DB shared between methods would hold the same prompt's output
    decoders = {m: method_decoder(config, m, dtype, pool.sibling()) for m in run_methods if m in OUR_METHODS}
    baselines = [m for m in run_methods if m in BASELINES]
    others = Baselines(config, dtype, baselines, decoders["ar"].target.runner.context_window) if baselines else None
    ar = decoders["ar"]
    tokenizer = ar.target.runner.tokenizer
    stop_ids = stop_token_ids(tokenizer)

    async def answer(method: str, turns: list[str], params: SamplingParams, limit: int) -> _Answer:
        chat, result = Conversation(tokenizer), _Answer()
        for turn in turns:
            prompt_ids = chat.ask(turn)
            if method in decoders:
                generation = decoders[method].start(prompt_ids, params, limit, stop_ids)
                async for _ in generation.stream():
                    pass
                ids = generation.token_ids
                result.produced += len(ids) + (generation.finish_reason == "stop")
                result.verifications += generation.stats.levels[-1].verifications
                result.draft_seconds.extend(generation.stats.draft_seconds)
            else:
                ids, produced = others.generate(method, prompt_ids, limit, stop_ids)
                result.produced += produced
            chat.answer(ids)
            result.turns.append((prompt_ids, ids))
        return result

    def run_group(method: str, items: list[tuple[Question, SamplingParams]], limit: int) -> tuple[list[_Answer], float]:
        pool.forget_released()  # each method computes its prompts itself, not from another's caches
        async def together():
            in_flight = asyncio.Semaphore(concurrency)

            async def one(question: Question, params: SamplingParams) -> _Answer:
                async with in_flight:
                    return await answer(method, question.turns, params, limit)
            return await asyncio.gather(*(one(q, p) for q, p in items))

        start = time.perf_counter()
        answers = asyncio.run(together())
        return answers, time.perf_counter() - start

    warm = Question("warm-up", "warm-up", ["Say hi."])
    totals: dict[str, dict[str, MethodTotals]] = {m: defaultdict(MethodTotals) for m in run_methods}
    records: list[tuple[list[int], list[int]]] = []  # ar's (prompt, output) turns, for the drafter replay
    own: list[dict[str, list[float]]] = []  # per repeat, each method's [tokens, seconds]
    items = [(q, p) for q in questions for p in runs]
    started = time.perf_counter()
    chunk = 1 if concurrency == 1 else 4 * concurrency
    for repeat in range(repeats):
        if repeat:
            decoders.update({m: method_decoder(config, m, dtype, pool.sibling()) for m in decoders})
        order = run_methods if repeat % 2 == 0 else run_methods[::-1]
        for method in order:
            run_group(method, [(warm, runs[0])] * concurrency, 8)
        own.append({m: [0, 0.0] for m in run_methods})
        for first in range(0, len(items), chunk):
            group_items = items[first : first + chunk]
            answered = {method: run_group(method, group_items, max_tokens) for method in order}
            reference = answered["ar"][0]
            if repeat == 0:
                records.extend(turn for a in reference for turn in a.turns)
            for method in run_methods:
                answers, seconds = answered[method]
                produced = sum(a.produced for a in answers) or 1
                own[-1][method][0] += produced
                own[-1][method][1] += seconds
                for (question, params), result, ar_result in zip(group_items, answers, reference):
                    diverged = None if method == "ar" else _divergence(ar, question, params, ar_result, result)
                    for key in (category_group(question.category), "_all"):
                        t = totals[method][key]
                        t.tokens += result.produced
                        t.seconds += seconds * result.produced / produced  # a group's wall time, shared by tokens
                        t.verifications += result.verifications
                        t.draft_seconds.extend(result.draft_seconds)
                        t.questions += 1
                        t.identical += diverged is None
                        if diverged is not None and key == "_all" and diverged not in t.divergences:
                            t.divergences.append(diverged)  # (once: every repeat computes the same text)
            last = group_items[-1][0]
            print(f"[{f'repeat {repeat + 1} of {repeats}: ' if repeats > 1 else ''}{first + len(group_items)}/"
                  f"{len(items)}] {last.category} #{last.question_id} done, {time.perf_counter() - started:.0f} s "
                  "elapsed", file=sys.stderr, flush=True)

    result = {
        "machine": {**machine(), "device": config.device},
        "kernels": ar.target.runner.decoder.kernels,
        "sampling": sampling.model_dump(),
        "seeds": len(runs),
        "concurrency": concurrency,
        "config": config.name,
        "dtype": dtype,
        "max_tokens": max_tokens,
        "workload": workload,
        "questions": len(questions),
        "repeats": repeats,
        "baselines": others.about() if others else {},
        "methods": {},
    }
    ar_all = totals["ar"]["_all"]
    ar_speed = ar_all.tokens / ar_all.seconds
    for method in run_methods:
        if method == "ar" and "ar" not in methods:
            continue
        summary = totals[method]["_all"].summary(ar_speed)
        if repeats > 1:
            summary["speedup_per_repeat"] = speedups = repeat_speedups(own, method)
            summary["speedup_vs_ar"] = round(statistics.median(speedups), 3)
        summary["per_category"] = {}
        for group, t in sorted(totals[method].items()):
            if group == "_all":
                continue
            ar_group = totals["ar"][group]
            per = t.summary(ar_group.tokens / ar_group.seconds)
            del per["divergences"]
            del per["drafter_median_us"]
            summary["per_category"][group] = per
        proposer = getattr(decoders.get(method), "proposer", None)
        if proposer is not None and records:
            replayed = replay(proposer, records, lambda rows: 0.0)
            summary["drafter_lookup_median_us"] = round(1e6 * statistics.median(replayed.propose_seconds), 1)
        result["methods"][method] = summary
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    chart = draw_chart(result, Path(out).with_suffix(".png"))
    print(format_table(result))
    print(f"\nwrote {out} and {chart}")
    return result


def repeat_speedups(own: list[dict[str, list[float]]], method: str) -> list[float]:
    """Each repeat's speed of `method` over `ar`'s in that repeat (`own`: per repeat, method -> [tokens, seconds])."""
    return [round((run[method][0] / run[method][1]) / (run["ar"][0] / run["ar"][1]), 3) for run in own]


def format_table(result: dict) -> str:
    # questions in flight together share their wall time, so a category has no speed of its own then
    groups = sorted({g for m in result["methods"].values() for g in m["per_category"]}) \
        if result.get("concurrency", 1) == 1 else []
    header = ["method", "tok/s", "vs ar", "mean acc", "identical", "draft us (loop)", "lookup us",
              *[f"{g} tok/s" for g in groups]]
    rows = [header]
    for name, m in result["methods"].items():
        rows.append([
            name, f"{m['tokens_per_s']:.2f}", f"{m['speedup_vs_ar']:.2f}x",
            "-" if m["mean_accepted"] is None else f"{m['mean_accepted']:.2f}",
            "-" if m["identical_to_ar"] is None else f"{m['identical_to_ar']:.2f}",
            "-" if m["drafter_median_us"] is None else f"{m['drafter_median_us']:.0f}",
            f"{m['drafter_lookup_median_us']:.0f}" if "drafter_lookup_median_us" in m else "-",
            *[f"{m['per_category'][g]['tokens_per_s']:.2f}" if g in m["per_category"] else "-" for g in groups],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    sampling = result["sampling"]
    mode = "greedy" if not sampling["temperature"] else \
        f"temperature {sampling['temperature']:g}, {result['seeds']} seeds, {sampling['sampler'] or 'coupled'} sampling"
    if result.get("concurrency", 1) > 1:
        mode += f", {result['concurrency']} at a time"
    lines = [f"{result['config']}, {result['dtype']}, {result['questions']} questions, {mode}, "
             f"max {result['max_tokens']} tokens, {result['machine']['processor']} "
             f"({' '.join(result['machine']['isa']) or 'no AVX2'})"]
    for r in rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    if result.get("repeats", 1) > 1 and len(result["methods"]) > 1:
        lines.append(f"vs ar: the median of {result['repeats']} repeats' own ratios, "
                     + ", ".join(f"{name} [{', '.join(f'{x:.2f}' for x in m['speedup_per_repeat'])}]"
                                 for name, m in result["methods"].items() if name != "ar"))
    for name, m in result["methods"].items():
        for d in m["divergences"]:
            seed = "" if d.get("seed") is None else f" seed {d['seed']}"
            lines.append(f"  {name} diverges from ar: question {d['question_id']}{seed} turn {d['turn']} "
                         f"position {d['position']}, ar top-2 margin {d['ar_top2_margin']}")
    return "\n".join(lines)

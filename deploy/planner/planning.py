"""`hierspec plan` and `auto`: profile, choose the hierarchy, and check the prediction against a run.

Calibration and measurement use different prompts of the workload (the first
`per_category` of each category, then the next `measure_per_category`), so the
drafter's model DB, which learns every calibration output, cannot flatter the
plans it is measured on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from deploy.builder import RunnerPool, configure_torch, plan_decoder
from deploy.config import HierspecConfig
from deploy.planner.optimizer import Plan, rank_structures, request_latency
from deploy.planner.profiler import Profile, run_profile, stderr_log
from deploy.workload import Question, category_group, load_workload
from services.engine.prompts import Conversation, chat_prompt_ids, stop_token_ids
from services.engine.sampling import SamplingParams

RUNNERS_UP = 2


def split_workload(path: str, per_category: int, measure_per_category: int,
                   categories: str | None) -> tuple[list[Question], list[Question]]:
    """(calibration questions, measurement questions): disjoint, per category in file order."""
    questions = load_workload(path, per_category + measure_per_category, categories)
    seen: dict[str, int] = {}
    calibration, measurement = [], []
    for question in questions:
        group = category_group(question.category)
        seen[group] = seen.get(group, 0) + 1
        (calibration if seen[group] <= per_category else measurement).append(question)
    return calibration, measurement


def choose(profile: Profile, categories: list[str] | None = None, concurrency: int = 1) -> list[Plan]:
    """The chosen plan followed by the best plan of every other structure, by predicted ms per token
    of whole requests (decoding and prefill). Among `concurrency` requests, each structure's T_i come from
    the lockstep model (every request in every forward) and the structures are ranked by the simulated
    schedule of requests that start together (`Profile.load_latency`)."""
    plans = rank_structures(profile.tables(categories, concurrency), profile.target, profile.drafts)
    if concurrency == 1:
        return plans
    return sorted((plan.model_copy(update={"predicted_ms_per_token": predicted(profile, plan, categories,
                                                                              concurrency)["_all"]})
                   for plan in plans), key=lambda p: p.predicted_ms_per_token)


def predicted(profile: Profile, plan: Plan, categories: list[str], concurrency: int = 1) -> dict[str, float]:
    """Predicted ms per token of the plan, per category and "_all" (the categories pooled)."""
    names = categories or sorted(profile.categories)
    if concurrency > 1:
        return profile.load_latency(plan, concurrency, names)
    return {"_all": request_latency(plan, profile.tables(names)),
            **{name: request_latency(plan, profile.tables([name])) for name in names}}


def measure(config: HierspecConfig, plan: Plan, dtype: str, pool: RunnerPool,
            questions: list[Question], max_tokens: int, concurrency: int = 1) -> dict[str, float]:
    """Measured ms per token of a plan, per category and overall (whole conversations, greedy), questions
    running `concurrency` at a time (each request's own time from its start to its end). The plan gets a
    drafter of its own: its model DB must not have learnt another plan's outputs for these prompts, nor its levels
    kept another plan's caches of them (prefix caching)."""
    pool.forget_released()
    decoder = plan_decoder(config, plan, dtype, pool.sibling())
    tokenizer = decoder.target.runner.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    decoder.generate(chat_prompt_ids(tokenizer, [{"role": "user", "content": "Say hi."}]), SamplingParams(), 8,
                     stop_ids)
    totals: dict[str, list[float]] = {}

    async def conversation(question: Question) -> None:
        chat = Conversation(tokenizer)
        for turn in question.turns:
            generation = decoder.start(chat.ask(turn), SamplingParams(), max_tokens, stop_ids)
            async for _ in generation.stream():
                pass
            chat.answer(generation.token_ids)
            produced = len(generation.token_ids) + (generation.finish_reason == "stop")
            for key in (category_group(question.category), "_all"):
                seconds, tokens = totals.setdefault(key, [0.0, 0])
                totals[key] = [seconds + generation.stats.seconds, tokens + produced]

    async def groups() -> None:
        for first in range(0, len(questions), concurrency):
            await asyncio.gather(*(conversation(q) for q in questions[first : first + concurrency]))

    asyncio.run(groups())
    return {key: round(1000 * seconds / tokens, 3) for key, (seconds, tokens) in totals.items()}


def _plan_record(plan: Plan, profile: Profile, categories: list[str], measured: dict[str, float] | None,
                 concurrency: int = 1) -> dict:
    record = {"method": plan.method, "hierarchy": plan.describe(),
              **plan.model_dump(exclude={"predicted_ms_per_token"}),
              "predicted_ms_per_token": {key: round(value, 3) for key, value in
                                         predicted(profile, plan, categories, concurrency).items()}}
    if measured is not None:
        record["measured_ms_per_token"] = measured
        record["error"] = {key: round(record["predicted_ms_per_token"][key] / value - 1, 4)
                           for key, value in measured.items() if key in record["predicted_ms_per_token"]}
    return record


def profile_summary(profile: Profile) -> dict:
    """What the plan used, readable: cost curves and mean acceptance per pair and category."""
    summary = {"costs_ms": {m: dict(zip(c.tokens, [round(x, 2) for x in c.ms])) for m, c in profile.costs.items()},
               "acceptance": {}}
    for name in profile.categories:
        tables = profile.tables([name])
        summary["acceptance"][name] = {
            **{f"{lower}->{upper}": {"mean_run": round(float(t.runs.mean()), 3), "samples": len(t.runs)}
               for (lower, upper), t in tables.pairs.items()},
            **{f"HD->{upper}": {"mean_accepted": round(float(t.accepted.mean()), 3),
                                "mean_nodes": round(float(t.nodes.mean()), 2),
                                "drafter_ms": round(t.drafter_ms, 4), "rounds": len(t.nodes)}
               for upper, t in tables.trees.items()},
        }
    return summary


def run_plan(config: HierspecConfig, workload: str, out: str, dtype: str | None, per_category: int,
             measure_per_category: int, max_tokens: int, categories: str | None, refresh: bool = False,
             concurrency: int = 1) -> dict:
    dtype = dtype or config.dtype
    configure_torch(config)
    calibration, measurement = split_workload(workload, per_category, measure_per_category, categories)
    pool = RunnerPool()
    profile, profile_file = run_profile(config, dtype, calibration, max_tokens, pool=pool, refresh=refresh,
                                        log=stderr_log, fresh_costs=True)
    names = sorted(profile.categories)
    plans = choose(profile, concurrency=concurrency)[: 1 + RUNNERS_UP]
    records = []
    for plan in plans:
        started = time.perf_counter()
        measured = measure(config, plan, dtype, pool, measurement, max_tokens, concurrency) if measurement else None
        stderr_log(f"plan: measured {plan.describe()} in {time.perf_counter() - started:.0f} s")
        records.append(_plan_record(plan, profile, names, measured, concurrency))
    result = {
        "config": config.name, "dtype": dtype, "workload": workload, "max_tokens": max_tokens,
        "concurrency": concurrency,
        "calibration_questions": len(calibration), "measurement_questions": len(measurement),
        "profile": str(profile_file),
        "chosen": records[0], "runners_up": records[1:],
        "per_category_choice": {name: choose(profile, [name], concurrency)[0].describe() for name in names},
        **profile_summary(profile),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(format_plans(result))
    print(f"\nwrote {out}")
    return result


def format_plans(result: dict) -> str:
    load = f", {result['concurrency']} requests at a time" if result.get("concurrency", 1) > 1 else ""
    lines = [f"{result['config']}, {result['dtype']}{load}: plans by predicted ms per token "
             f"(calibrated on {result['calibration_questions']} prompts, "
             f"measured on {result['measurement_questions']})"]
    for label, record in [("chosen", result["chosen"])] + [("runner-up", r) for r in result["runners_up"]]:
        predicted = record["predicted_ms_per_token"]
        measured = record.get("measured_ms_per_token", {})
        cells = [f"{key}: {predicted[key]:.1f} predicted"
                 + (f" / {measured[key]:.1f} measured ({100 * record['error'][key]:+.0f}%)" if key in measured else "")
                 for key in predicted]
        lines.append(f"  {label:>9}  {record['hierarchy']}")
        lines.extend(f"             {cell}" for cell in cells)
    for name, choice in result["per_category_choice"].items():
        lines.append(f"  best for {name}: {choice}")
    return "\n".join(lines)


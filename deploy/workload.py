"""Workload files in the Spec-Bench format: one JSON object per line, `{"question_id", "category", "turns"}`.

Read by the benchmarks, the planner's calibration and `hierspec db answers`; a
category's group is the part before '/' (`mt_bench/writing` -> `mt_bench`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from deploy.config import ConfigError


@dataclass
class Question:
    question_id: object
    category: str
    turns: list[str]


def load_workload(path: str, per_category: int | None, categories: str | None) -> list[Question]:
    """Questions grouped by category (the part before '/'), the first `per_category` of each."""
    wanted = [c.strip() for c in categories.split(",")] if categories else None
    taken: dict[str, int] = defaultdict(int)
    questions = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"workload file {path} does not exist") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            question = Question(raw["question_id"], str(raw["category"]), [str(t) for t in raw["turns"]])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{number}: not a workload entry ({exc})") from None
        group = category_group(question.category)
        if wanted and group not in wanted and question.category not in wanted:
            continue
        if per_category is not None and taken[group] >= per_category:
            continue
        taken[group] += 1
        questions.append(question)
    if not questions:
        raise ConfigError(f"{path}: no questions match")
    return questions


def category_group(category: str) -> str:
    return category.split("/", 1)[0]

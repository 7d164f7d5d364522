"""Offline replay: measure a drafter on recorded greedy outputs without running a model.

Under greedy verification a tree path is accepted exactly when it matches the
output plain decoding produced, so replaying recorded (prompt, output) pairs
through the drafter gives the exact number of target steps a real run would
take. Priced with a measured cost curve (ms per forward by number of rows),
it predicts tokens per second, cheaply and deterministically: the way to
tune drafter settings (as ArcticInference's suffix-decoding simulator does).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.engine.tree import TokenTree


@dataclass
class ReplayResult:
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    propose_seconds: list[float] = field(default_factory=list)  # wall time of each draft, one per step
    accepted_by_source: Counter = field(default_factory=Counter)
    drafted_by_source: Counter = field(default_factory=Counter)

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def accepted_path(tree: TokenTree, truth: list[int]) -> list[int]:
    """The nodes greedy verification would accept when the target's choices are `truth`."""
    path: list[int] = []
    node = -1
    for token in truth:
        child = tree.children(node).get(token)
        if child is None:
            break
        path.append(child)
        node = child
    return path


def replay(drafter, records: Iterable[tuple[list[int], list[int]]], cost: Callable[[int], float]) -> ReplayResult:
    """Replay (prompt ids, output ids) pairs; `cost(rows)` is the seconds of one forward over `rows` rows."""
    result = ReplayResult()
    for number, (prompt, output) in enumerate(records):
        request_id = f"replay-{number}"
        drafter.start(request_id, prompt)
        position = 0
        while position < len(output):
            context = prompt + output[:position]
            start = time.perf_counter()
            tree = drafter.propose(request_id, context, len(output) - position - 1)
            result.propose_seconds.append(time.perf_counter() - start)
            path = accepted_path(tree, output[position:])
            drafter.observe(request_id, tree, path)
            result.steps += 1
            result.seconds += cost(1 + len(tree))
            for source in tree.sources:
                result.drafted_by_source[source] += 1
            for node in path:
                result.accepted_by_source[tree.sources[node]] += 1
            step = min(len(path) + 1, len(output) - position)
            drafter.commit(request_id, output[position : position + step])
            position += step
        result.tokens += len(output)
        drafter.finish(request_id, completed=True)
    return result

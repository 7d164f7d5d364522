"""Turns a config and a method into a running hierarchy, loading each model once per process."""

from __future__ import annotations

import os

import torch

from deploy.config import HierspecConfig
from services.hsd import DraftPolicy, HierarchicalDecoder
from services.runner import LevelRunner


class RunnerPool:
    """Loaded levels keyed by (model, dtype, device), so methods of one process share weights."""

    def __init__(self):
        self._runners: dict[tuple[str, str, str], LevelRunner] = {}

    def get(self, model: str, dtype: str, device: str) -> LevelRunner:
        key = (model, dtype, device)
        if key not in self._runners:
            self._runners[key] = LevelRunner.load(model, dtype, device)
        return self._runners[key]


def configure_torch(config: HierspecConfig) -> None:
    torch.set_num_threads(config.threads or os.cpu_count() or 1)


def build_decoder(config: HierspecConfig, method: str, dtype: str | None = None,
                  pool: RunnerPool | None = None) -> HierarchicalDecoder:
    pool = pool or RunnerPool()
    dtype = dtype or config.dtype
    chain = config.chain(method)
    levels = [pool.get(model, dtype, config.device) for model, _ in chain]
    return HierarchicalDecoder(levels, [DraftPolicy(c.draft_tokens, c.min_confidence) for _, c in chain[:-1]])

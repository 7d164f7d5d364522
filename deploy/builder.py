"""Turns a config and a method into a running hierarchy, loading each model once per process."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deploy.config import ConfigError, DrafterSettings, HierspecConfig
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.model_db import ModelDB
from drafter_db.shared_outputs import SharedOutputs
from drafter_db.stores import EmbeddedStore, RedisStore, tokenizer_namespace
from services.hsd import DraftPolicy, HierarchicalDecoder
from services.model_store import cache_dir
from services.runner import LevelRunner


class RunnerPool:
    """Loaded levels keyed by (model, dtype, device), so methods of one process share weights,
    and one database drafter per process (its model DB learns from every request)."""

    def __init__(self):
        self._runners: dict[tuple[str, str, str], LevelRunner] = {}
        self._drafter: HierarchicalDrafter | None = None

    def drafter(self, config: HierspecConfig, tokenizer) -> HierarchicalDrafter:
        if self._drafter is None:
            self._drafter = build_drafter(config.drafter, tokenizer)
        return self._drafter

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
    levels = [pool.get(model, dtype, config.device) for model, _ in config.chain(method)]
    return chain_decoder(config, method, levels, lambda: pool.drafter(config, levels[-1].tokenizer))


def chain_decoder(config: HierspecConfig, method: str, levels: list, drafter, **options) -> HierarchicalDecoder:
    """The hierarchy of `method` over loaded levels (runners here, or remote levels in the Serve app);
    `drafter()` gives the database drafter, asked for only by the hd methods."""
    policies = [DraftPolicy(c.draft_tokens, c.min_confidence) for _, c in config.chain(method)[:-1]]
    proposer = drafter() if method.startswith("hd") else None
    return HierarchicalDecoder(levels, policies, proposer=proposer, **options)


def redis_url(settings: DrafterSettings) -> str | None:
    return settings.redis_url or os.environ.get("HIERSPEC_REDIS_URL")


def statistics_store(settings: DrafterSettings, namespace: str):
    """The configured statistics store: Redis when a URL is set (config or $HIERSPEC_REDIS_URL),
    else the embedded store file."""
    url = redis_url(settings)
    if url:
        return RedisStore(url)
    path = settings.statistics_path or cache_dir() / "stats" / f"{namespace}.pkl"
    return EmbeddedStore(Path(path).expanduser())


def build_drafter(settings: DrafterSettings, tokenizer) -> HierarchicalDrafter:
    namespace = tokenizer_namespace(tokenizer)
    if settings.share_model_db and not redis_url(settings):
        raise ConfigError("drafter.share_model_db needs Redis: set drafter.redis_url or $HIERSPEC_REDIS_URL")
    mirror = SharedOutputs(redis_url(settings), namespace) if settings.share_model_db else None
    model_db = ModelDB(max_key=settings.max_key, max_keys=settings.model_db_max_keys, mirror=mirror)
    if settings.model_db_path and Path(settings.model_db_path).expanduser().exists():
        model_db.load(Path(settings.model_db_path).expanduser())
    config = DrafterConfig(max_key=settings.max_key, max_depth=settings.max_depth,
                           max_candidates=settings.max_candidates, max_nodes=settings.max_nodes)
    return HierarchicalDrafter(config, model_db, StatisticsDB(statistics_store(settings, namespace), namespace))

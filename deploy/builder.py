"""Turns a config and a method into a running hierarchy, loading each model once per process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from deploy.config import ConfigError, DrafterSettings, HierspecConfig
from deploy.planner.optimizer import Plan
from drafter_db.drafter import DrafterConfig, HierarchicalDrafter, StatisticsDB
from drafter_db.files import TableFileError
from drafter_db.model_db import ModelDB, ModelDBSaver
from drafter_db.shared_outputs import SharedOutputs
from drafter_db.stores import EmbeddedStore, RedisStore, tokenizer_namespace
from services.engine.batching import BatchingLevel
from services.engine.hsd import DraftPolicy, HierarchicalDecoder
from services.engine.model_store import cache_dir
from services.engine.runner import LevelRunner

log = logging.getLogger("hierspec.builder")


class RunnerPool:
    """Loaded levels keyed by (model, dtype, device), so methods of one process share weights,
    and one database drafter per pool (its model DB learns from every request it drafts for)."""

    def __init__(self, shared: RunnerPool | None = None):
        self._runners: dict[tuple[str, str, str], LevelRunner] = shared._runners if shared else {}
        self._levels: dict[tuple[str, str, str], BatchingLevel] = shared._levels if shared else {}
        self._statistics: dict[str, StatisticsDB] = shared._statistics if shared else {}
        self._drafter: HierarchicalDrafter | None = None

    def sibling(self) -> RunnerPool:
        """The same loaded models and statistics DB with a drafter of its own: benchmarked methods
        must not draft from a model DB that learnt another method's output for the same prompt."""
        return RunnerPool(self)

    def drafter(self, config: HierspecConfig, tokenizer) -> HierarchicalDrafter:
        if self._drafter is None:
            namespace = tokenizer_namespace(tokenizer)
            if namespace not in self._statistics:
                self._statistics[namespace] = StatisticsDB(statistics_store(config.drafter, namespace), namespace,
                                                           vocab_size=len(tokenizer))
            self._drafter = build_drafter(config.drafter, tokenizer, self._statistics[namespace])
        return self._drafter

    def get(self, model: str, dtype: str, device: str) -> LevelRunner:
        key = (model, dtype, device)
        if key not in self._runners:
            self._runners[key] = LevelRunner.load(model, dtype, device)
        return self._runners[key]

    def forget_released(self) -> None:
        """Every loaded level drops the caches it keeps of released requests (`LevelRunner.forget_released`)."""
        for runner in self._runners.values():
            runner.forget_released()

    def level(self, model: str, dtype: str, device: str) -> BatchingLevel:
        """One level object per runner, so hierarchies switching per round share it."""
        key = (model, dtype, device)
        if key not in self._levels:
            self._levels[key] = BatchingLevel(self.get(model, dtype, device))
        return self._levels[key]


def configure_torch(config: HierspecConfig) -> None:
    torch.set_num_threads(config.threads or os.cpu_count() or 1)


def build_decoder(config: HierspecConfig, method: str, dtype: str | None = None,
                  pool: RunnerPool | None = None) -> HierarchicalDecoder:
    """The config's hierarchy for a fixed method; `auto` is the planner's (`deploy.planner.auto.method_decoder`)."""
    if method == "auto":
        raise ValueError("method auto is resolved by the planner: use deploy.planner.auto.method_decoder")
    return plan_decoder(config, config_plan(config, method), dtype or config.dtype, pool or RunnerPool())


def plan_decoder(config: HierspecConfig, plan: Plan, dtype: str, pool: RunnerPool) -> HierarchicalDecoder:
    levels = [pool.level(model, dtype, config.device) for model in plan.models]
    return assemble(plan, levels, lambda: pool.drafter(config, levels[-1].runner.tokenizer))


def config_plan(config: HierspecConfig, method: str) -> Plan:
    """The hierarchy a config writes out for `method`."""
    chain = config.chain(method)
    return Plan(models=[model for model, _ in chain], draft_tokens=[c.draft_tokens for _, c in chain[:-1]],
                drafter=method.startswith("hd"), min_confidence=chain[0][1].min_confidence if len(chain) > 1 else 0.0)


def chain_decoder(config: HierspecConfig, method: str, levels: list, drafter, **options) -> HierarchicalDecoder:
    """The hierarchy of `method` over loaded levels (remote levels in the Serve app)."""
    return assemble(config_plan(config, method), levels, drafter, **options)


def assemble(plan: Plan, levels: list, drafter, **options) -> HierarchicalDecoder:
    """A decoder running `plan` over `levels` (one per plan model); `drafter()` gives the database
    drafter, asked for only when the plan has it. The confidence stop applies to the bottom model's
    own one-token steps (all of its drafting, or where the database drafter had no tree)."""
    policies = [DraftPolicy(t, plan.min_confidence if i == 0 else 0.0) for i, t in enumerate(plan.draft_tokens)]
    return HierarchicalDecoder(levels, policies, proposer=drafter() if plan.drafter else None, **options)


def redis_url(settings: DrafterSettings) -> str | None:
    return settings.redis_url or os.environ.get("HIERSPEC_REDIS_URL")


def statistics_path(settings: DrafterSettings, namespace: str) -> Path:
    return Path(settings.statistics_path or cache_dir() / "stats" / f"{namespace}.ngrams").expanduser()


def statistics_store(settings: DrafterSettings, namespace: str, timeout: float = 0.05):
    """The configured statistics store: Redis when a URL is set (config or $HIERSPEC_REDIS_URL), with
    `timeout` on its sockets (a lookup's: drafting never waits long), else the embedded store file. An
    unreadable file is reported and left out: drafting goes on from the other databases (`hierspec db build`
    writes a new one)."""
    url = redis_url(settings)
    if url:
        return RedisStore(url, timeout=timeout)
    path = statistics_path(settings, namespace)
    if not path.exists() and path.with_suffix(".pkl").exists():
        log.warning("statistics DB %s is in the old pickle format, which is no longer read: rebuild it "
                    "(`make stats`, or `hierspec db build`)", path.with_suffix(".pkl"))
    try:
        return EmbeddedStore(path)
    except TableFileError as error:
        log.warning("statistics DB left out: %s", error)
        return EmbeddedStore()


def serving_drafter(settings: DrafterSettings, method: str,
                    tokenizer) -> tuple[HierarchicalDrafter | None, ModelDBSaver | None]:
    """Where a server runs the rounds (its ingress, or a target replica): the database drafter of `method` (None
    but for `hd` methods), and what keeps its model DB's file current when `model_db_path` is set (close it at
    shutdown)."""
    drafter = build_drafter(settings, tokenizer) if method.startswith("hd") else None
    if drafter is None or not settings.model_db_path:
        return drafter, None
    return drafter, ModelDBSaver(drafter.model_db, Path(settings.model_db_path).expanduser(), settings.model_db_save_s)


def build_drafter(settings: DrafterSettings, tokenizer, statistics: StatisticsDB | None = None) -> HierarchicalDrafter:
    namespace = tokenizer_namespace(tokenizer)
    if settings.share_model_db and not redis_url(settings):
        raise ConfigError("drafter.share_model_db needs Redis: set drafter.redis_url or $HIERSPEC_REDIS_URL")
    mirror = SharedOutputs(redis_url(settings), namespace) if settings.share_model_db else None
    model_db = ModelDB(max_key=settings.max_key, max_keys=settings.model_db_max_keys, mirror=mirror,
                       vocab_size=len(tokenizer))
    if settings.model_db_path and Path(settings.model_db_path).expanduser().exists():
        try:
            model_db.load(Path(settings.model_db_path).expanduser())
        except TableFileError as error:  # damaged, or another format: it refills from outputs
            log.warning("model DB starts empty: %s", error)
    config = DrafterConfig(max_key=settings.max_key, max_depth=settings.max_depth,
                           max_candidates=settings.max_candidates, max_nodes=settings.max_nodes)
    statistics = statistics or StatisticsDB(statistics_store(settings, namespace), namespace,
                                            vocab_size=len(tokenizer))
    return HierarchicalDrafter(config, model_db, statistics)

"""The hierarchy config: one YAML file names the models, the hierarchy and how to run them.

The same file drives `hierspec generate`, `hierspec bench`, the Serve
application and (later) the Kubernetes manifests, so they never drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.engine.batching import BatchLimits
from services.engine.model_store import PACKAGED_MODELS, resolve

METHODS: tuple[str, ...] = ("ar", "hsd", "hd", "hd+hsd", "auto")


class ConfigError(Exception):
    """A config file that cannot be used; the message is meant for the user as is."""


class LevelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a draft model of `models.drafts`")
    draft_tokens: int = Field(ge=1, le=64, description="T_i: tokens this level hands up per batch (at most)")
    min_confidence: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="bottom level only: end a batch after a token the drafter gave less than this probability",
    )


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="short name, Hugging Face directory or GGUF path of the target model")
    drafts: list[str] = Field(default_factory=list, description="draft models sharing the target's tokenizer")


class DrafterSettings(BaseModel):
    """Hierarchy Drafting: the databases below the lowest model level (methods hd and hd+hsd)."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        None, description="statistics DB in Redis (e.g. redis://host:6379/0); default: the embedded store file")
    statistics_path: str | None = Field(
        None, description="embedded statistics store file; default: <model cache>/stats/<tokenizer>.ngrams")
    model_db_path: str | None = Field(None, description="the model DB's file: loaded at start; the Serve app saves "
                                                         "it every model_db_save_s and when it shuts down")
    model_db_save_s: float = Field(300.0, gt=0.0, description="how often the Serve app saves the model DB")
    model_db_max_keys: int = Field(200_000, ge=1000, description="model DB bound (keys) before eviction")
    share_model_db: bool = Field(
        False, description="mirror the model DB through the statistics Redis, so router replicas learn from each "
                           "other's requests (needs redis_url or $HIERSPEC_REDIS_URL)")
    max_key: int = Field(4, ge=1, le=8, description="longest n-gram key tried")
    max_depth: int = Field(12, ge=1, le=32, description="longest drafted continuation")
    max_candidates: int = Field(4, ge=1, le=16, description="candidates merged into one token tree")
    max_nodes: int = Field(12, ge=1, le=63, description="tree size: rows of one verification forward (with the "
                                                          "last committed token, at most 64)")


class PlannerSettings(BaseModel):
    """How `auto` chooses the hierarchy (`hierspec plan`, DESIGN 1.2): calibration and adaptation."""

    model_config = ConfigDict(extra="forbid")

    workload: str = Field("deploy/calibration.jsonl",
                          description="calibration prompts (Spec-Bench JSONL), relative to the working directory")
    per_category: int = Field(2, ge=1, le=100, description="calibration prompts per category")
    max_tokens: int = Field(128, ge=8, le=4096, description="tokens generated per calibration prompt")
    max_draft: int = Field(16, ge=1, le=32, description="largest T_i considered")
    adaptive: bool = Field(True, description="switch plans during a request when its acceptance says another "
                                              "category's plan is faster")


class ServingSettings(BaseModel):
    """How the Serve application runs the hierarchy (`hierspec serve`, `serve run`, KubeRay)."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    replicas_per_level: int = Field(1, ge=1, le=64, description="replicas of each level deployment")
    gpus_per_level: float = Field(0.0, ge=0.0, le=8.0, description="GPUs of each level replica (0 on CPU)")
    cpus_per_level: float = Field(1.0, ge=0.0, le=256.0, description="Ray CPUs reserved by each level replica")
    level_threads: int | None = Field(
        None, ge=1, le=1024,
        description="torch threads of a level replica while other levels compute too (default: the cores divided "
                    "among the levels); a level computing alone gets `threads` (default: all cores)")
    router_replicas: int = Field(1, ge=1, le=64, description="replicas of the HTTP ingress and router")
    max_in_flight: int = Field(32, ge=1, le=4096,
                               description="requests a router replica runs at once; more get HTTP 503")
    request_timeout_s: float = Field(600.0, gt=0.0, description="a request running longer is ended")
    pipelined: bool = Field(
        True, description="interleave the rounds of concurrent requests over the levels (False: one round at a time)")
    rounds_in: Literal["ingress", "target"] = Field(
        "ingress", description="where a request's draft-and-verify rounds run: in the ingress, each level call a "
                               "Serve call (any hierarchy); or, for a one-level hierarchy (only the database drafter "
                               "below the target), in the target's replica, which streams the tokens to the ingress: "
                               "no Serve call per round, but a request whose replica dies fails instead of being "
                               "retried, and a replica being replaced waits up to request_timeout_s for its "
                               "requests. A hierarchy of several models runs in the ingress whatever this says")
    max_cached_requests: int = Field(64, ge=1, le=100_000, description="request KV caches a level replica keeps")
    max_cache_gib: float | None = Field(
        None, gt=0, description="GiB of request KV caches a level replica keeps (least recently used dropped first; "
                                "a dropped request recomputes its prefix: the same output, but from the transformers "
                                "fallback only up to near-ties); default: no bound "
                                "but max_cached_requests. A replica logs what the bound holds per running request")
    batch: BatchLimits = Field(default_factory=BatchLimits,
                               description="one forward of a level replica: the calls of how many requests it batches")
    api_key_env: str = Field("HIERSPEC_API_KEY", description="environment variable holding the API key")
    allow_unauthenticated: bool = Field(
        False, description="serve without an API key where others can reach the server (a Kubernetes deployment, "
                           "`hierspec serve --host 0.0.0.0`); without it, no key there is an error")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30,
                                description="larger request bodies get HTTP 413 before they are read")
    max_queued_requests: int = Field(
        64, ge=1, le=100_000, description="requests Serve's proxy holds for a busy ingress replica; more get 503")

    @model_validator(mode="after")
    def _caches_hold_every_running_request(self) -> ServingSettings:
        running = self.max_in_flight * self.router_replicas
        if self.max_cached_requests < running:
            raise ValueError(f"max_cached_requests ({self.max_cached_requests}) is below the requests the routers "
                             f"run at once (max_in_flight x router_replicas = {running}): a level replica would "
                             "evict the caches of running requests and recompute them every round")
        return self

    @model_validator(mode="after")
    def _sequential_rounds_run_in_the_ingress(self) -> ServingSettings:
        if not self.pipelined and self.rounds_in == "target":
            raise ValueError("pipelined: false (one round at a time across requests) runs the rounds in the "
                             "ingress: set rounds_in: ingress")
        return self


class KubernetesSettings(BaseModel):
    """What `hierspec k8s render` needs beyond the hierarchy: image, sizes, scheduling, the Redis store."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field("hierspec", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field("hierspec:0.1.0", description="built by `make image` (k8s/Dockerfile)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu: str = "4"
    worker_memory: str = "16Gi"
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of a GPU")
    node_selector: dict[str, str] = Field(default_factory=dict, description="for the level worker groups")
    tolerations: list[dict] = Field(default_factory=list, description="for the level worker groups")
    redis_storage: str = Field("10Gi", description="PersistentVolumeClaim size of the statistics Redis")
    redis_memory: str = Field("2Gi", description="memory limit of the statistics Redis (maxmemory: 75%)")
    storage_class: str | None = None
    corpus_claim: str = Field("hierspec-corpus", description="PersistentVolumeClaim the db-build Job reads")
    api_key_secret: str | None = Field(
        "hierspec-api-key", description="Secret (key `api-key`) every pod requires; null only with "
                                        "serving.allow_unauthenticated: true")
    operator_namespace: str = Field("kuberay-system", description="namespace of the KubeRay operator, the one "
                                                           "client outside the cluster's pods its NetworkPolicy "
                                                           "lets reach the Ray dashboard")
    gcs_redis_address: str | None = Field(
        None, description="host:port of a Redis for GCS fault tolerance (its own, not the statistics store)")


class HierspecConfig(BaseModel):
    """A validated config; cross-field rules live in `_check_hierarchy`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the served model name")
    models: ModelsConfig
    hierarchy: list[LevelConfig] | Literal["auto"] = Field(
        default_factory=list,
        description="draft levels, smallest first (the target is the implied top level), or `auto`: planned from "
                    "a measured profile at start-up")
    dtype: Literal["float32", "bfloat16", "int8", "int4"] = Field(
        "bfloat16", description="weights' dtype (int8, int4: weight-only quantised block matmuls, the rest "
                                "bfloat16); "
                                "activations, KV cache and attention are float32")
    device: str = Field("cpu", description="torch device of every level, e.g. cpu or cuda")
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; default: all cores")
    max_tokens: int = Field(256, ge=1, le=32768, description="default limit on generated tokens per request")
    method: Literal["ar", "hsd", "hd", "hd+hsd", "auto"] | None = Field(
        None, description="what --method defaults to; default: auto for `hierarchy: auto`, hd+hsd with draft "
                          "levels, else hd")
    drafter: DrafterSettings = Field(default_factory=DrafterSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)

    @property
    def default_method(self) -> str:
        if self.method:
            return self.method
        if self.hierarchy == "auto":
            return "auto"
        return "hd+hsd" if self.hierarchy else "hd"

    @model_validator(mode="after")
    def _check_hierarchy(self) -> HierspecConfig:
        seen = set()
        for index, level in enumerate(self.hierarchy if self.hierarchy != "auto" else []):
            if level.model not in self.models.drafts:
                raise ValueError(f"hierarchy[{index}].model {level.model!r} is not listed in models.drafts")
            if level.model in seen:
                raise ValueError(f"hierarchy[{index}].model {level.model!r} appears twice in the hierarchy")
            seen.add(level.model)
        if self.models.target in self.models.drafts:
            raise ValueError("the target cannot also be a draft model")
        if self.dtype == "int4" and self.device != "cpu":
            raise ValueError("dtype int4 has torch's int4 GEMM on CPU only: serve int8 or bfloat16 on "
                             f"{self.device}")
        return self

    def rounds_in_target(self, method: str) -> bool:
        """Whether the target's replicas run the rounds of `method` (`serving.rounds_in: target`, one level)."""
        return self.serving.rounds_in == "target" and len(self.chain(method)) == 1

    def chain(self, method: str) -> list[tuple[str, LevelConfig | None]]:
        """(model reference, level config) from the bottom level to the target (whose config is None)."""
        if method in ("ar", "hd"):
            levels = []
        elif method == "auto":
            raise ConfigError("method auto is chosen from a measured profile when a process starts; here a fixed "
                              "hierarchy is needed: run `hierspec plan` and write its choice into the config")
        elif method in ("hsd", "hd+hsd"):
            if self.hierarchy == "auto":
                raise ConfigError(f"config {self.name!r} says `hierarchy: auto`: use --method auto (or ar, hd)")
            if not self.hierarchy:
                raise ConfigError(f"config {self.name!r} has no draft levels: method {method!r} needs a hierarchy")
            levels = [(level.model, level) for level in self.hierarchy]
        else:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        return levels + [(self.models.target, None)]


def _format_validation_error(path: str, error: ValidationError) -> str:
    """One line per mistake. For `hierarchy` (a list of levels, or "auto") pydantic reports each union
    branch; the branch names are dropped, and the "auto" branch's complaint kept only when alone."""
    def branch(part) -> bool:
        return isinstance(part, str) and part.startswith(("list[", "literal["))

    items = error.errors()
    plain = [i for i in items if not any(isinstance(p, str) and p.startswith("literal[") for p in i["loc"])]
    lines = []
    for item in plain or items:
        where = ".".join(str(part) for part in item["loc"] if not branch(part)) or "(top level)"
        message = item["msg"] + (" (or the string auto)" if item["loc"][:1] == ("hierarchy",) and
                                 any(branch(p) for p in item["loc"]) and len(item["loc"]) == 2 else "")
        lines.append(f"{path}: {where}: {message}")
    return "\n".join(lines)


def packaged_path(path: str) -> Path:
    """A path as given, else relative to the installed `deploy` package (images without the repo)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    here = Path(__file__).parent
    packaged = here / given.relative_to("deploy") if given.parts[:1] == ("deploy",) else here / given
    return packaged if packaged.exists() else given


def model_name(reference: str) -> str:
    """The served name of a model reference: a packaged short name as is, else its directory or file stem."""
    path = Path(reference)
    return path.stem if path.suffix == ".gguf" else path.name or reference


def _absolute(reference: str) -> str:
    return reference if reference in PACKAGED_MODELS else str(Path(reference).expanduser().resolve())


def config_for_models(target: str, drafts: list[str], device: str = "cpu") -> HierspecConfig:
    """The config `hierspec serve --model M --draft D ...` runs: the drafts (smallest first) as levels, the bottom
    one drafting as the packaged Qwen pair's does (32 tokens, ending a batch below 0.4 confidence), the others 8;
    every other setting at its default. `--print-config` writes it out for editing."""
    for reference in [target, *drafts]:
        if reference not in PACKAGED_MODELS:
            resolve(reference, download=False)  # a ModelError naming what is accepted, before anything starts
    # paths made absolute: Ray's workers need not share this process's working directory
    target, drafts = _absolute(target), [_absolute(draft) for draft in drafts]
    levels = [LevelConfig(model=draft, draft_tokens=8) for draft in drafts]
    if levels:
        levels[0] = LevelConfig(model=drafts[0], draft_tokens=32, min_confidence=0.4)
    try:
        return HierspecConfig(name=model_name(target), models=ModelsConfig(target=target, drafts=drafts),
                              hierarchy=levels, device=device)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("--model/--draft", exc)) from None


def with_dtype(config: HierspecConfig, dtype: str | None) -> HierspecConfig:
    """The config with a command line's --dtype written in, checked as if the file said it (int4 off CPU is
    refused here, before anything loads)."""
    if not dtype or dtype == config.dtype:
        return config
    try:
        return HierspecConfig.model_validate({**config.model_dump(), "dtype": dtype})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("--dtype", exc)) from None


def load_config(path: str | Path) -> HierspecConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return HierspecConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None

"""The Serve application built from a hierarchy config: one deployment per level, one ingress.

`build_app` is the `import_path` of the Serve config files in `deploy/serve/`
(`serve run deploy/serve/smollm2-cpu.yaml`); `serve_foreground` is what
`hierspec serve` runs. Both read the same hierarchy config, so the CLI, Serve
and the Kubernetes manifests never drift apart.
"""

from __future__ import annotations

import os
import re
import signal

from ray import serve
from ray.serve import Application

from deploy.app.rounds_service import TargetRounds
from deploy.app.server import HierspecServer
from deploy.config import ConfigError, HierspecConfig, load_config, packaged_path
from deploy.planner.auto import resolve_auto
from services.serve.level_service import LevelService


def _deployment_name(index: int, model: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(model.rstrip("/"))).strip("-").lower()
    return f"level{index}-{stem}"


def level_deployment_names(config: HierspecConfig, method: str) -> list[str]:
    return [_deployment_name(i, model) for i, (model, _) in enumerate(config.chain(method))]


def level_options(config: HierspecConfig, method: str) -> list[dict]:
    """Serve options of each level deployment, bottom level first (also what sizes GPU worker groups)."""
    serving = config.serving
    actor = {"num_cpus": serving.cpus_per_level, "num_gpus": serving.gpus_per_level}
    options = {"num_replicas": serving.replicas_per_level, "ray_actor_options": actor,
               "max_ongoing_requests": 4 * serving.max_in_flight, "health_check_period_s": 10}
    if config.rounds_in_target(method):
        # a request holds its call for its whole generation: room for every running request, and a replica
        # being replaced (a redeploy, a scale-down) lets its requests finish
        options.update(max_ongoing_requests=max(4 * serving.max_in_flight,
                                                serving.max_in_flight * serving.router_replicas),
                       graceful_shutdown_timeout_s=serving.request_timeout_s)
    return [{"name": name, **options} for name in level_deployment_names(config, method)]


def cache_limits(serving) -> dict:
    """What a level replica keeps of request KV caches, and how many requests the routers run at once."""
    return {"requests": serving.max_cached_requests, "running": serving.max_in_flight * serving.router_replicas,
            "max_bytes": None if serving.max_cache_gib is None else int(serving.max_cache_gib * (1 << 30))}


def build_from_config(config: HierspecConfig, method: str | None = None, dtype: str | None = None,
                      require_key: bool = True) -> Application:
    """`require_key`: others can reach the app, so its ingress refuses to start without an API key unless the
    config allows an open API (checked again in every ingress replica, whose environment is the one that
    counts)."""
    dtype = dtype or config.dtype
    config, method = resolve_auto(config, method or config.default_method, dtype)
    serving = config.serving
    chain = config.chain(method)
    in_target = config.rounds_in_target(method)
    levels = []
    for options, (model, _) in zip(level_options(config, method), chain):
        level_args = (model, dtype, config.device, config.threads, serving.level_threads, len(chain),
                      serving.batch.model_dump(), cache_limits(serving))
        levels.append(serve.deployment(TargetRounds).options(**options).bind(config.model_dump(), method, *level_args)
                      if in_target else serve.deployment(LevelService).options(**options).bind(*level_args))
    ingress = serve.deployment(HierspecServer).options(
        name="ingress", num_replicas=serving.router_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=2 * serving.max_in_flight, max_queued_requests=serving.max_queued_requests)
    return ingress.bind(config.model_dump(), method, levels, require_key)


def build_app(args: dict) -> Application:
    """Serve's application builder: `args` has `config` (a path) and optionally `method`, `dtype`."""
    unknown = set(args) - {"config", "method", "dtype"}
    if unknown or "config" not in args:
        raise ConfigError(f"application args: expected config (and optionally method, dtype); got {sorted(args)}")
    config = load_config(packaged_path(args["config"]))
    require_api_key(config, "the Serve config's http_options")
    return build_from_config(config, args.get("method"), args.get("dtype"))


def require_api_key(config: HierspecConfig, exposure: str) -> None:
    """Fail closed: an app others can reach runs with an API key unless the config says
    `serving.allow_unauthenticated: true` (here, before anything starts; the ingress checks its own
    environment again)."""
    serving = config.serving
    if not os.environ.get(serving.api_key_env) and not serving.allow_unauthenticated:
        raise ConfigError(f"no API key: ${serving.api_key_env} is unset, and {exposure} let other machines reach "
                          "the server; set the key, or `serving.allow_unauthenticated: true` in the config to "
                          "serve without one")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def http_options(config: HierspecConfig, host: str, port: int) -> dict:
    """The proxy's options: past `request_timeout_s` (with a margin for the router's own timeout, which answers
    with an OpenAI error first) the proxy ends a request too."""
    return {"host": host, "port": port, "request_timeout_s": config.serving.request_timeout_s + 30}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_foreground(config: HierspecConfig, method: str | None = None, dtype: str | None = None,
                     port: int | None = None, metrics_port: int = 8080, host: str = "127.0.0.1") -> None:
    """Start a local Ray cluster and the app, print how to query it, serve until Ctrl-C or SIGTERM
    (what `kill`, systemd and Kubernetes send), then shut Serve and the cluster down. Only this machine
    reaches it unless `host` says otherwise (then an API key is required, see `require_api_key`)."""
    import ray

    if host not in LOOPBACK:
        require_api_key(config, f"--host {host}")
    config, method = resolve_auto(config, method or config.default_method, dtype or config.dtype)
    port = port or config.serving.port
    serving = config.serving
    replicas = len(config.chain(method)) * serving.replicas_per_level
    ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * serving.cpus_per_level) + 1),
             include_dashboard=True, dashboard_host="127.0.0.1", _metrics_export_port=metrics_port,
             log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init: Ray's own handler aborts the process
    try:
        serve.start(http_options=http_options(config, host, port))
        print(f"starting {config.name} ({method}, {dtype or config.dtype}): loading "
              f"{len(config.chain(method))} level(s); the first start may take a minute", flush=True)
        serve.run(build_from_config(config, method, dtype, require_key=host not in LOOPBACK), name=config.name,
                  route_prefix="/")
        dashboard = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") \
            else None
        print(_usage(config.name, host, port, dashboard or "http://127.0.0.1:8265", metrics_port), flush=True)
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _usage(model: str, host: str, port: int, dashboard: str, metrics_port: int) -> str:
    reach = "only this machine reaches it (--host 0.0.0.0 opens it to others)" if host in LOOPBACK else \
        f"listening on {host}"
    return f"""
hierspec is serving {model!r} on http://localhost:{port}; {reach} (Ctrl-C stops it)

  curl http://localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Write a haiku about caches."}}]}}'

  from openai import OpenAI   # Python
  client = OpenAI(base_url="http://localhost:{port}/v1", api_key="-")
  client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi!"}}])

  Ray dashboard: {dashboard}    Prometheus metrics: http://localhost:{metrics_port}/metrics
"""

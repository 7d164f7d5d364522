"""`hierspec bench-serve`: the Serve app under concurrent streaming clients.

It starts a local Ray cluster, deploys the config's app with the pipelined
router, and streams the first prompts through one client alone; then sweeps
1, 2, 4, 8 and 16 concurrent streaming chat clients over first turns of a
workload (greedy, `max_tokens` each): throughput, time to first token and
inter-token latency per client count, drawn as a PNG; then 4 streams alone and
with a long prompt arriving among them (chunked prefill); then `clients`
clients with the sequential router (one round at a time), and
finally the one client's prompts in this process without Serve (`hierspec
generate`'s path) for the HTTP overhead. The one client runs first, on a fresh
app: its model DB then knows what the in-process decoder's knows (a warm-up),
not the answers to its own prompts from the concurrent run. With `--repeats N`
the one stream, the sweep and the in-process run are measured N times, each on
a fresh cluster, and every ratio is the median of the repeats' own ratios.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from deploy.config import HierspecConfig
from deploy.workload import load_workload
from services.engine.kernels import machine


@dataclass
class StreamResult:
    tokens: int
    seconds: float
    ttft: float
    chunk_gaps: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None  # the error event that ended a stream after its 200
    done: bool = False  # the stream ended with `data: [DONE]`


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stream_chat(url: str, model: str, prompt: str, max_tokens: int, headers: dict | None = None) -> StreamResult:
    """One streamed greedy chat completion, timed at the client."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens, pieces, error, done = [], 0, [], None, False
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=1800,
                       headers=headers) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line == b"data: [DONE]":
                done = True
            if not line.startswith(b"data: ") or done:
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message", str(chunk["error"]))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            content = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
            if content:
                arrivals.append(time.perf_counter())
                pieces.append(content)
    end = time.perf_counter()
    ttft = (arrivals[0] if arrivals else end) - start
    return StreamResult(tokens, end - start, ttft, [b - a for a, b in zip(arrivals, arrivals[1:])], "".join(pieces),
                        error, done)


def run_load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
             headers: dict | None = None) -> dict:
    """`clients` concurrent streams over all prompts; aggregate throughput and latencies."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: stream_chat(url, model, p, max_tokens, headers), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    itl = [(r.seconds - r.ttft) / (r.tokens - 1) for r in results if r.tokens > 1]
    gaps = [g for r in results for g in r.chunk_gaps]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 3),
        "stream_tokens_per_s": round(tokens / sum(r.seconds for r in results), 3),
        # streams open at a time, on average: below `clients` by the time the last ones take alone
        "mean_streams": round(sum(r.seconds for r in results) / wall, 2),
        "ttft_ms": {"p50": ms(_percentile([r.ttft for r in results], 0.5)),
                    "p99": ms(_percentile([r.ttft for r in results], 0.99))},
        "itl_ms": {"p50": ms(_percentile(itl, 0.5)), "p99": ms(_percentile(itl, 0.99))},
        "chunk_gap_ms": {"p50": ms(_percentile(gaps, 0.5)), "p99": ms(_percentile(gaps, 0.99))},
    }


def _in_process(config: HierspecConfig, method: str, prompts: list[str], max_tokens: int) -> dict:
    """The same prompts through the engine in this process: what HTTP serving is compared with."""
    from deploy.builder import RunnerPool, configure_torch
    from deploy.planner.auto import method_decoder
    from services.engine.prompts import chat_prompt_ids, stop_token_ids
    from services.engine.sampling import SamplingParams

    configure_torch(config)
    decoder = method_decoder(config, method, pool=RunnerPool())
    tokenizer = decoder.target.runner.tokenizer
    stops = stop_token_ids(tokenizer)
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    decoder.generate(ids[0], SamplingParams(), 4, stops)  # warm-up
    tokens, seconds = 0, 0.0
    for prompt_ids in ids:
        start = time.perf_counter()
        tokens += len(decoder.generate(prompt_ids, SamplingParams(), max_tokens, stops).token_ids)
        seconds += time.perf_counter() - start
    return {"requests": len(ids), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 3)}


def long_prompt(tokens: int) -> str:
    """A prompt of about `tokens` tokens (numbered sentences, so the tokenizer cannot compress it)."""
    return " ".join(f"Sentence {i} says the number {i * 7 % 1000}." for i in range(tokens // 12)) + \
        "\nRepeat the last sentence."


def run_with_long_prompt(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                         prompt_tokens: int) -> dict:
    """`clients` streams, and a prompt of `prompt_tokens` tokens that arrives once they are under way: its
    prefill is chunked between their decode steps (the streams' inter-token latency is what it costs them)."""
    with ThreadPoolExecutor(1) as pool:
        def late():
            time.sleep(1.0)
            return stream_chat(url, model, long_prompt(prompt_tokens), 8)
        intruder = pool.submit(late)
        streams = run_load(url, model, prompts, clients, max_tokens)
        intruder.result()
    return streams


def run_serve_bench(config: HierspecConfig, workload: str, out: str, clients: int = 8, num_requests: int = 16,
                    max_tokens: int = 64, method: str | None = None, categories: str | None = None,
                    port: int = 8000, single_requests: int = 8, sweep: tuple[int, ...] = (1, 2, 4, 8, 16),
                    long_prompt_tokens: int = 4000, repeats: int = 1) -> dict:
    """`repeats` times: a fresh cluster and app, the one stream and the sweep, the cluster stopped, the one
    stream's prompts in-process. A ratio (a sweep point against one client, one HTTP stream against in-process)
    is taken within each repeat and reported as the median over repeats: a shared VM's speed moves by 20% from
    one minute to the next, which a single pair of runs minutes apart takes for the ratio. The long prompt and
    the sequential router run in the first repeat only."""
    from deploy.bench.chart import draw_load_chart
    from deploy.planner.auto import resolve_auto

    config, method = resolve_auto(config, method or config.default_method, config.dtype)
    questions = load_workload(workload, None, categories)
    prompts = [q.turns[0] for q in questions][: max(num_requests, *sweep)]
    result = {"config": config.name, "method": method, "dtype": config.dtype, "max_tokens": max_tokens,
              "machine": machine(), "repeats": repeats, "modes": {}, "sweep": [], "runs": []}
    for repeat in range(repeats):
        if repeats > 1:
            print(f"[repeat {repeat + 1} of {repeats}]", flush=True)
        run = _serve_runs(config, method, prompts, clients, num_requests, max_tokens, port, single_requests, sweep,
                          long_prompt_tokens if repeat == 0 else 0, first=repeat == 0)
        print("[in-process] the same prompts without Serve", flush=True)
        run["in_process"] = _in_process(config, method, prompts[:single_requests], max_tokens)
        modes = run.pop("modes")
        if repeat == 0:  # one stream, the long prompt, the routers, in-process: the first repeat's, in that order
            result["modes"] = {"single_stream": run["single_stream"], **modes, "in_process": run["in_process"]}
        result["runs"].append(run)
    result["sweep"], result["single_stream_vs_in_process"] = combine_runs(result["runs"])
    modes = result["modes"]
    result["pipelined_vs_sequential"] = round(modes["pipelined"]["tokens_per_s"] /
                                              modes["sequential"]["tokens_per_s"], 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    chart = draw_load_chart(result, Path(out).with_suffix(".png")) if result["sweep"] else None
    print(format_serve_table(result))
    print(f"\nwrote {out}" + (f" and {chart}" if chart else ""))
    return result


def combine_runs(runs: list[dict]) -> tuple[list[dict], float]:
    """Each repeat's ratios, taken within it (written into `runs`), then across repeats: per client count of the
    sweep the point of the median repeat (by tokens/s) with the medians of the repeats' ratios to one client, and
    the median of the one HTTP stream's ratio to in-process."""
    for run in runs:
        run["single_stream_vs_in_process"] = round(run["single_stream"]["stream_tokens_per_s"] /
                                                   run["in_process"]["tokens_per_s"], 3)
        one = next((p for p in run["sweep"] if p["clients"] == 1), None)
        for point in run["sweep"] if one else []:
            point["vs_one_client"] = round(point["tokens_per_s"] / one["tokens_per_s"], 3)
            point["itl_p50_vs_one_client"] = round(point["itl_ms"]["p50"] / one["itl_ms"]["p50"], 3)
    sweep = []
    for index in range(len(runs[0]["sweep"])):
        points = sorted((run["sweep"][index] for run in runs), key=lambda p: p["tokens_per_s"])
        point = dict(points[len(points) // 2])
        for key in ("vs_one_client", "itl_p50_vs_one_client"):
            if key in point:
                point[key] = _median([p[key] for p in points])
        sweep.append(point)
    return sweep, _median([run["single_stream_vs_in_process"] for run in runs])


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _serve_runs(config: HierspecConfig, method: str, prompts: list[str], clients: int, num_requests: int,
                max_tokens: int, port: int, single_requests: int, sweep: tuple[int, ...], long_prompt_tokens: int,
                first: bool) -> dict:
    """One cluster's measurements: the one stream and the sweep; with `first`, the long prompt and the pipelined
    and sequential routers at `clients` too (under "modes")."""
    import ray
    from ray import serve

    from deploy.app.app import build_from_config

    url = f"http://127.0.0.1:{port}"
    run: dict = {"sweep": [], "modes": {}}
    levels = len(config.chain(method)) * config.serving.replicas_per_level
    ray.init(num_cpus=max(4, levels + 2), include_dashboard=False, log_to_driver=False)
    caches = _PrefixCaches()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, pipelined in (("pipelined", True), ("sequential", False))[: 2 if first else 1]:
            # the sequential router is the ingress's (one round at a time across requests)
            layout = {} if pipelined else {"rounds_in": "ingress"}
            variant = config.model_copy(update={"serving": config.serving.model_copy(
                update={"pipelined": pipelined, **layout})})
            print(f"[{mode}] deploying {config.name} ({method})", flush=True)
            # on 127.0.0.1: no key needed
            serve.run(build_from_config(variant, method, require_key=False), name=config.name, route_prefix="/")
            stream_chat(url, config.name, prompts[0], 4)  # warm-up
            if pipelined:
                print(f"[single stream] {single_requests} requests, one client", flush=True)
                run["single_stream"] = run_load(url, config.name, prompts[:single_requests], 1, max_tokens)
                for count in sweep:
                    caches.forget(variant, method)
                    point = run_load(url, config.name, prompts[: max(num_requests, count)], count, max_tokens)
                    run["sweep"].append(point)
                    print(f"[sweep] {count} clients: {point['tokens_per_s']} tokens/s, inter-token p50 "
                          f"{point['itl_ms']['p50']} ms, {point['mean_streams']} streams at a time", flush=True)
                if long_prompt_tokens:
                    print(f"[long prompt] 4 streams and a {long_prompt_tokens}-token prompt", flush=True)
                    caches.forget(variant, method)
                    run["modes"]["4 streams"] = run_load(url, config.name, prompts[:4], 4, max_tokens)
                    caches.forget(variant, method)
                    run["modes"][f"4 streams + {long_prompt_tokens}-token prompt"] = run_with_long_prompt(
                        url, config.name, prompts[:4], 4, max_tokens, long_prompt_tokens)
            if first:
                print(f"[{mode}] {len(prompts[:num_requests])} requests, {clients} concurrent clients", flush=True)
                caches.forget(variant, method)
                run["modes"][mode] = run_load(url, config.name, prompts[:num_requests], clients, max_tokens)
                print(f"[{mode}] {run['modes'][mode]['tokens_per_s']} tokens/s", flush=True)
            serve.delete(config.name)
    finally:
        caches.close()
        serve.shutdown()
        ray.shutdown()
    return run


class _PrefixCaches:
    """Each phase sends the same prompts again: between phases the level replicas drop the caches the phase
    before left them (prefix caching would otherwise spare this phase's prompts their prefill). Through Serve
    handles in an event loop of their own, on a thread, running while they live: the cluster's environment runs a
    handle's router in its caller's loop. One call per replica, which Serve routes as it likes: with several
    replicas per level some may keep theirs."""

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-handles", daemon=True)
        self._thread.start()
        self._calls: dict[tuple[str, str], object] = {}

    def forget(self, config: HierspecConfig, method: str) -> None:
        asyncio.run_coroutine_threadsafe(self._forget(config, method), self._loop).result()

    async def _forget(self, config: HierspecConfig, method: str) -> None:
        from ray.serve.handle import DeploymentHandle

        from deploy.app.app import level_deployment_names

        for name in level_deployment_names(config, method):
            call = self._calls.setdefault((config.name, name), DeploymentHandle(name, config.name).forget_released)
            for _ in range(config.serving.replicas_per_level):
                await call.remote()

    def close(self) -> None:
        async def shut() -> None:
            for call in self._calls.values():
                await call.shutdown_async()
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def format_serve_table(result: dict) -> str:
    header = ["mode", "clients", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    rows = [header]
    for name, m in result["modes"].items():
        rows.append([name, str(m.get("clients", 1)), str(m["requests"]), f"{m['tokens_per_s']:.2f}",
                     *[str(m.get(k, {}).get(q, "-")) for k in ("ttft_ms", "itl_ms") for q in ("p50", "p99")]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{result['config']} ({result['method']}, {result['dtype']}), max {result['max_tokens']} tokens, "
             f"{result['machine']['processor']}"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    runs = result.get("runs", [])
    of_runs = (lambda values: "" if len(runs) < 2 else  # noqa: E731
               " [" + ", ".join(f"{v:.2f}" for v in values) + "]")
    for index, point in enumerate(result["sweep"]):
        lines.append(f"{point['clients']:>3} clients: {point['tokens_per_s']:.2f} tokens/s "
                     f"({point.get('vs_one_client', 0):.2f}x one client"
                     f"{of_runs([r['sweep'][index].get('vs_one_client', 0) for r in runs])}), inter-token p50 "
                     f"{point['itl_ms']['p50']} ms ({point.get('itl_p50_vs_one_client', 0):.2f}x)")
    lines.append(f"pipelined / sequential router: {result['pipelined_vs_sequential']:.2f}x; "
                 f"one HTTP stream / in-process: {result['single_stream_vs_in_process']:.2f}x"
                 f"{of_runs([r['single_stream_vs_in_process'] for r in runs])}"
                 + (f" (medians of {len(runs)} repeats)" if len(runs) > 1 else ""))
    return "\n".join(lines)

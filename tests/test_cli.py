"""`hierspec generate --json` honours the contract of DESIGN section 5, through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HIERSPEC = Path(sys.executable).with_name("hierspec")


def generate(*args: str) -> dict:
    proc = subprocess.run([str(HIERSPEC), "generate", *args, "--json"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_generate_json_contract():
    out = generate("--config", "deploy/configs/smollm2-cpu.yaml", "--prompt", "Name a colour.",
                   "--max-tokens", "12", "--dtype", "float32")
    assert isinstance(out["text"], str) and out["text"]
    assert all(isinstance(t, int) for t in out["token_ids"]) and 0 < len(out["token_ids"]) <= 12
    stats = out["stats"]
    for key in ("tokens", "seconds", "tokens_per_s", "mean_accepted", "levels", "accepted_by_level",
                "accepted_by_source", "drafted_by_source"):
        assert key in stats
    assert stats["tokens"] == len(out["token_ids"])
    assert out["method"] == "hd" and out["dtype"] == "float32"  # the config's default method


def test_generate_methods_agree_in_float32():
    args = ("--config", "deploy/configs/smollm2-cpu.yaml", "--prompt", "Repeat after me: one two three, one two three.",
            "--max-tokens", "24", "--dtype", "float32")
    assert generate(*args, "--method", "ar")["token_ids"] == generate(*args, "--method", "hd")["token_ids"]


def test_generate_sampling_is_reproducible_with_a_seed():
    args = ("--config", "deploy/configs/smollm2-cpu.yaml", "--prompt", "Tell me a fact.", "--max-tokens", "10",
            "--temperature", "0.9", "--seed", "7")
    assert generate(*args)["token_ids"] == generate(*args)["token_ids"]


@pytest.mark.parametrize("dtype", [(), ("--dtype", "int8"), ("--dtype", "int4")], ids=["bfloat16", "int8", "int4"])
def test_generate_methods_agree_in_the_default_dtype_greedy_and_seeded(dtype):
    """bfloat16 (the config's dtype), and weight-only int8 and int4: row-invariant numerics make speculation plain
    decoding to the last bit, and a seed makes sampled text the same under every method (coupled sampling)."""
    args = ("--config", "deploy/configs/smollm2-cpu.yaml", "--prompt", "Repeat after me: one two three, one two three.",
            "--max-tokens", "24", *dtype)
    assert generate(*args, "--method", "ar")["token_ids"] == generate(*args, "--method", "hd")["token_ids"]
    seeded = (*args, "--temperature", "0.9", "--seed", "11")
    assert generate(*seeded, "--method", "ar")["token_ids"] == generate(*seeded, "--method", "hd")["token_ids"]


def test_verbose_prints_the_kernels_chosen():
    proc = subprocess.run([str(HIERSPEC), "generate", "--config", "deploy/configs/smollm2-cpu.yaml", "--prompt", "Hi",
                           "--max-tokens", "2", "--verbose"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "hierspec: kernel for linear" in proc.stderr and "576x49152" in proc.stderr
    assert "hierspec: attention: query rows padded" in proc.stderr


def test_bench_ratios_are_taken_within_each_repeat():
    """A repeat that ran in a slow minute is slow for every method: hd's ratio to ar is its own repeat's."""
    from deploy.bench.bench import repeat_speedups

    own = [{"ar": [100, 10.0], "hd": [100, 8.0]}, {"ar": [100, 20.0], "hd": [100, 10.0]}]
    assert repeat_speedups(own, "hd") == [1.25, 2.0]
    assert repeat_speedups(own, "ar") == [1.0, 1.0]


def test_bench_serve_ratios_are_the_medians_of_each_repeats_own():
    """A slow minute of a shared VM moves a repeat's figures together: each ratio is taken within its repeat, then
    the median over repeats (the median points' own ratio, 28 / 10, would be 2.8x)."""
    from deploy.bench.bench_serve import combine_runs, format_serve_table

    def run(one: float, eight: float, http: float) -> dict:
        point = lambda clients, speed: {"clients": clients, "tokens_per_s": speed,  # noqa: E731
                                        "itl_ms": {"p50": 1000 * clients / speed, "p99": None}}
        return {"single_stream": {"stream_tokens_per_s": http}, "in_process": {"tokens_per_s": 10.0},
                "sweep": [point(1, one), point(8, eight)]}
    runs = [run(10.0, 28.0, 8.0), run(5.0, 17.0, 9.0), run(12.0, 36.0, 5.0)]
    sweep, http = combine_runs(runs)
    assert [p["tokens_per_s"] for p in sweep] == [10.0, 28.0]  # the median repeat's points
    assert sweep[1]["vs_one_client"] == 3.0 and http == 0.8
    assert [r["sweep"][1]["vs_one_client"] for r in runs] == [2.8, 3.4, 3.0]
    result = {"config": "c", "method": "hd", "dtype": "bfloat16", "max_tokens": 64, "machine": {"processor": "cpu"},
              "modes": {}, "sweep": sweep, "runs": runs, "single_stream_vs_in_process": http,
              "pipelined_vs_sequential": 2.0}
    table = format_serve_table(result)
    assert "(3.00x one client [2.80, 3.40, 3.00])" in table and "0.80x [0.80, 0.90, 0.50] (medians of 3" in table

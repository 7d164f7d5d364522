"""`hierspec plan`, `--method auto` and the benchmark's chart, through the console script on SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HIERSPEC = Path(sys.executable).with_name("hierspec")
QUESTIONS = [
    ("code", "Write a Python function that returns the square of a number."),
    ("code", "Write a Python function that reverses a string."),
    ("chat", "Describe a sunrise in two sentences."),
    ("chat", "Give me three tips for sleeping well."),
]


@pytest.fixture
def workspace(tmp_path):
    workload = tmp_path / "workload.jsonl"
    workload.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                                for i, (c, t) in enumerate(QUESTIONS)))
    env = {**os.environ, "HIERSPEC_PROFILE_DIR": str(tmp_path / "profiles")}
    return tmp_path, workload, env


def hierspec(env, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(HIERSPEC), *args], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_plan_profiles_once_chooses_and_measures(workspace):
    tmp_path, workload, env = workspace
    args = ("plan", "--config", "deploy/configs/smollm2-cpu.yaml", "--workload", str(workload),
            "--per-category", "1", "--measure-per-category", "1", "--max-tokens", "16", "--dtype", "float32",
            "--out", str(tmp_path / "p.json"))
    first = hierspec(env, *args)
    result = json.loads((tmp_path / "p.json").read_text())
    plans = [result["chosen"], *result["runners_up"]]
    assert {p["method"] for p in plans} == {"ar", "hd"}  # SmolLM2 has no draft model: two structures
    for plan in plans:
        assert set(plan["predicted_ms_per_token"]) == {"_all", "code", "chat"}
        assert set(plan["measured_ms_per_token"]) == {"_all", "code", "chat"}
        assert all(v > 0 for v in plan["measured_ms_per_token"].values())
    predicted = [p["predicted_ms_per_token"]["_all"] for p in plans]
    assert predicted[0] <= predicted[1]
    assert set(result["acceptance"]) == {"code", "chat"} and "smollm2-135m" in result["costs_ms"]
    assert "chosen" in first.stdout and Path(result["profile"]).exists()
    # every request after the first copies the chat template's system prompt from an earlier one's cache
    profile = json.loads(Path(result["profile"]).read_text())
    requests = [r for c in profile["categories"].values() for r in c["requests"]]
    assert len(requests) == 2 and sum(reused > 0 for _, _, reused in requests) == len(requests) - 1
    assert all(reused < prompt for prompt, _, reused in requests)
    assert "reusing" in hierspec(env, *args).stderr  # same models, dtype, device and calibration: cached


def test_generate_auto_equals_plain_decoding(workspace, monkeypatch):
    tmp_path, workload, env = workspace
    config = yaml.safe_load((ROOT / "deploy/configs/smollm2-cpu.yaml").read_text())
    config.update(hierarchy="auto", planner={"workload": str(workload), "per_category": 1, "max_tokens": 16})
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    common = ("--config", str(path), "--prompt", "Count from one to ten in words.", "--max-tokens", "24",
              "--dtype", "float32", "--json")
    auto = json.loads(hierspec(env, "generate", *common).stdout)  # the config's default method: auto
    plain = json.loads(hierspec(env, "generate", *common, "--method", "ar").stdout)
    assert auto["method"] == "auto"
    assert auto["token_ids"] == plain["token_ids"]
    assert sum(auto["stats"]["plans_used"].values()) == auto["stats"]["levels"][-1]["verifications"]

    # the Serve app's levels are fixed at start-up: there `auto` is the best plan overall, from the cached profile
    from deploy.builder import configure_torch
    from deploy.config import load_config
    from deploy.planner.auto import resolve_auto

    monkeypatch.setenv("HIERSPEC_PROFILE_DIR", env["HIERSPEC_PROFILE_DIR"])
    config = load_config(path)
    configure_torch(config)  # as the CLI did: the profile is keyed by thread count too
    resolved, method = resolve_auto(config, "auto", "float32")
    assert method in ("ar", "hd") and resolved.chain(method)[-1][0] == "smollm2-135m"


def test_bench_writes_json_and_chart(workspace):
    """Also repeated (`--repeats 2`, 2 questions at a time): hd's ratio is the median of the repeats' own, and
    each repeat's output is ar's."""
    tmp_path, workload, env = workspace
    out = tmp_path / "bench.json"
    proc = hierspec(env, "bench", "--config", "deploy/configs/smollm2-cpu.yaml", "--workload", str(workload),
                    "--per-category", "1", "--max-tokens", "8", "--methods", "ar,hd", "--out", str(out),
                    "--concurrency", "2", "--repeats", "2")
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"ar", "hd"} and result["repeats"] == 2
    hd = result["methods"]["hd"]
    assert len(hd["speedup_per_repeat"]) == 2 and hd["identical_to_ar"] == 1.0
    assert hd["speedup_vs_ar"] == round(sum(hd["speedup_per_repeat"]) / 2, 3)
    assert "vs ar: the median of 2 repeats' own ratios, hd [" in proc.stdout
    chart = out.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(chart) in proc.stdout

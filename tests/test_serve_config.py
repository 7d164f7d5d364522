"""The Serve config files and the app builder, without starting a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deploy.app.app import build_app, http_options, level_options
from deploy.config import ConfigError, HierspecConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SERVE_FILES = sorted((ROOT / "deploy/serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_files_are_valid_and_build(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HIERSPEC_API_KEY", "a-key")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in schema.applications:
        assert application.import_path == "deploy.app:build_app"
        config = load_config(application.args["config"])
        assert application.name == config.name
        assert schema.http_options.request_timeout_s == http_options(config, "", 0)["request_timeout_s"]
        assert build_app(application.args) is not None


def test_multi_gpu_config_puts_each_level_on_its_own_gpu():
    config = load_config(ROOT / "deploy/configs/qwen-coder-gpu.yaml")
    options = level_options(config, config.default_method)
    assert [o["name"] for o in options] == ["level0-qwen2-5-coder-0-5b", "level1-qwen2-5-coder-1-5b"]
    assert all(o["ray_actor_options"]["num_gpus"] == 1 for o in options)


def test_level_options_follow_the_hierarchy():
    config = load_config(ROOT / "deploy/configs/qwen-coder-cpu.yaml")
    assert len(level_options(config, "ar")) == 1 and len(level_options(config, "hsd")) == 2
    assert all(o["ray_actor_options"]["num_gpus"] == 0 for o in level_options(config, "hsd"))


def test_rounds_in_target_applies_to_one_level_hierarchies_only():
    """`serving.rounds_in: target` moves the rounds of `ar` and `hd` into the target's replica (which then waits
    for its requests when replaced); a hierarchy of several models keeps them in the ingress; the sequential
    router (the benchmark's baseline) is the ingress's."""
    raw = yaml.safe_load((ROOT / "deploy/configs/qwen-coder-cpu.yaml").read_text())
    raw.setdefault("serving", {})["rounds_in"] = "target"
    config = HierspecConfig.model_validate(raw)
    assert config.rounds_in_target("hd") and config.rounds_in_target("ar") and not config.rounds_in_target("hsd")
    assert level_options(config, "hd")[0]["graceful_shutdown_timeout_s"] == config.serving.request_timeout_s
    assert all("graceful_shutdown_timeout_s" not in o for o in level_options(config, "hsd"))
    with pytest.raises(ValidationError, match="rounds_in: ingress"):
        HierspecConfig.model_validate({**raw, "serving": {"rounds_in": "target", "pipelined": False}})


def test_builder_args_are_checked():
    with pytest.raises(ConfigError, match="expected config"):
        build_app({"conf": "x.yaml"})
    with pytest.raises(ConfigError, match="does not exist"):
        build_app({"config": "deploy/configs/missing.yaml"})


def test_grafana_dashboard_queries_the_metrics_we_export():
    import json
    import re

    import services.serve.metrics as metrics

    dashboard = json.loads((ROOT / "deploy/grafana_dashboard.json").read_text())
    source = Path(metrics.__file__).read_text()
    exported = set(re.findall(r'"(hierspec_[a-z_]+)"', source))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(hierspec_[a-z_]+?)(?:_total|_bucket)?\{", target["expr"]):
                assert name in exported, (panel["title"], name)


def test_an_app_others_can_reach_needs_an_api_key_or_says_it_is_open(monkeypatch, tmp_path, capsys):
    """Fail closed: the Serve config files listen on every interface, so without a key the app does not build;
    `hierspec serve` listens on this machine only unless --host says otherwise, and then needs one too."""
    from deploy.app.cluster_env import CLUSTER_ENV
    from deploy.cli import main

    monkeypatch.chdir(ROOT)
    for name in ("HIERSPEC_API_KEY", "RAY_worker_niceness", *CLUSTER_ENV):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no API key"):
        build_app({"config": "deploy/configs/smollm2-cpu.yaml"})
    raw = yaml.safe_load((ROOT / "deploy/configs/smollm2-cpu.yaml").read_text())
    raw.setdefault("serving", {})["allow_unauthenticated"] = True
    (tmp_path / "open.yaml").write_text(yaml.safe_dump(raw))
    assert build_app({"config": str(tmp_path / "open.yaml")}) is not None
    assert main(["serve", "--config", "deploy/configs/smollm2-cpu.yaml", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "no API key" in error and "--host 0.0.0.0" in error and len(error.splitlines()) == 1


def test_an_error_after_the_stream_began_ends_it_with_an_error_event_and_done():
    """Once the 200 is sent, a failure can only be told in the stream: an error event, then [DONE]; one choice
    failing ends the others' streams too."""
    import asyncio
    import functools
    import json
    from types import SimpleNamespace

    from deploy.app.server import HierspecServer, StreamedChoice

    async def failing():
        yield "partial "
        raise RuntimeError("a level failed")

    async def endless():
        while True:
            yield "more "
            await asyncio.sleep(0.01)

    server = SimpleNamespace(model_name="m", tokenizer=None)
    server._choice_chunks = functools.partial(HierspecServer._choice_chunks, server)
    body = SimpleNamespace(include_usage=False)

    async def collect():
        choices = [StreamedChoice(index, pieces, SimpleNamespace(finish_reason=None, logprobs=None),
                                  SimpleNamespace(tokens_used=1))
                   for index, pieces in enumerate([failing(), endless()])]
        stream = HierspecServer._stream(server, body, "id", 0, choices, 1, True)
        events = [event async for event in stream]
        await asyncio.sleep(0.05)
        return events, choices[1].pieces

    events, endless_pieces = asyncio.run(collect())
    assert any("partial " in event for event in events) and events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "internal_error" and "a level failed" not in error["message"]
    assert endless_pieces.ag_frame is None  # the other choice was stopped (its generator closed)


def test_serve_model_and_draft_build_a_config_that_print_config_writes_out(tmp_path, capsys):
    from deploy.cli import main

    assert main(["serve", "--model", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--print-config"]) == 0
    written = tmp_path / "written.yaml"
    written.write_text(capsys.readouterr().out)
    config = load_config(written)
    assert config.name == "qwen2.5-coder-1.5b" and config.default_method == "hd+hsd"
    assert config.models.drafts == ["qwen2.5-coder-0.5b"]
    assert [(level.model, level.draft_tokens, level.min_confidence) for level in config.hierarchy] == \
        [("qwen2.5-coder-0.5b", 32, 0.4)]  # the shipped Qwen pair's bottom level
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--print-config"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["serve", "--draft", "qwen2.5-coder-0.5b", "--print-config"]) == 2
    assert "--draft goes with --model" in capsys.readouterr().err
    assert main(["serve", "--device", "cuda", "--print-config"]) == 2
    assert "--device goes with --model" in capsys.readouterr().err
    assert main(["serve", "--method", "ar", "--dtype", "float32", "--print-config"]) == 0  # the default file
    written.write_text(capsys.readouterr().out)
    printed = load_config(written)
    assert printed.name == "smollm2-cpu" and (printed.method, printed.dtype) == ("ar", "float32")


def test_a_levels_largest_reply_fits_in_one_grpc_message():
    """Throughput mode sends level replies over gRPC (4 MiB by default): a full forward's float32 logits of the
    largest packaged vocabulary, as the rejection sampler asks for them, must fit."""
    from deploy.app.cluster_env import MAX_REPLY_BYTES, THROUGHPUT_MODE
    from services.engine.kernels import MAX_ROWS

    qwen_vocab = 151_936
    assert int(THROUGHPUT_MODE["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) == MAX_REPLY_BYTES
    assert MAX_REPLY_BYTES > 2 * MAX_ROWS * qwen_vocab * 4

"""The Serve config files and the app builder, without starting a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.app.app import build_app, level_options
from deploy.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SERVE_FILES = sorted((ROOT / "deploy/serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_files_are_valid_and_build(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in schema.applications:
        assert application.import_path == "deploy.app:build_app"
        config = load_config(application.args["config"])
        assert application.name == config.name
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

# Every target sets up what it needs (idempotently): a new user types `make run` or `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HIERSPEC := $(VENV)/bin/hierspec
STAMP := $(VENV)/.installed
CONFIG ?= deploy/configs/qwen-coder-cpu.yaml
WORKLOAD ?= ../shared/bench/workload.jsonl
BENCH_OUT ?= results/bench-qwen-coder.json

.PHONY: setup redis models run test bench lint clean

setup: $(STAMP) redis

# torch first, pinned to the CPU build this machine carries: a looser requirement pulls a CUDA build of several GB
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq redis-server >/dev/null; }

models: $(STAMP)
	$(HIERSPEC) models fetch

# The main job: generate with the default hierarchy and compare with plain decoding.
run: setup models
	$(HIERSPEC) demo --config $(CONFIG)

test: setup models
	$(PY) -m pytest

bench: setup models
	$(HIERSPEC) bench --config $(CONFIG) --workload $(WORKLOAD) --categories coding_humaneval \
	  --per-category 4 --max-tokens 128 --methods ar,hf-ar,hf-assisted,hsd --out $(BENCH_OUT)

lint: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check ruff
	$(VENV)/bin/ruff check services drafter_db deploy tests

clean:
	rm -rf $(VENV) results .pytest_cache

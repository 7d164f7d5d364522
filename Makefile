# Every target sets up what it needs (idempotently): a new user types `make run` or `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HIERSPEC := $(VENV)/bin/hierspec
STAMP := $(VENV)/.installed
CONFIG ?= deploy/configs/qwen-coder-cpu.yaml
WORKLOAD ?= ../shared/bench/workload.jsonl

STATS_DIR := $(or $(HIERSPEC_MODEL_DIR),$(HOME)/.cache/hierspec/models)/stats
# A corpus every machine has: the Python standard library (code and docstrings), capped at 1M tokens.
STATS_CORPUS ?= $(shell python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

.PHONY: setup redis models stats chat-stats run demo test reliability bench bench-full bench-llama-cpp plan bench-serve image lint clean

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

# The embedded statistics DB of each tokenizer (SmolLM2's and the Qwen pair's), built once.
stats: $(STATS_DIR)/.ngrams-smollm2 $(STATS_DIR)/.ngrams-qwen

$(STATS_DIR)/.ngrams-%: | models
	$(HIERSPEC) db build --model $(if $(filter qwen,$*),qwen2.5-coder-1.5b,smollm2-135m) \
	  --corpus $(STATS_CORPUS) --max-corpus-tokens 1000000
	mkdir -p $(STATS_DIR) && touch $@

# Optional, for chat: SmolLM2's own answers to deploy/chat_prompts.jsonl (125 prompts disjoint from the benchmark,
# resumable), read before the standard library when its statistics DB is rebuilt.
CHAT_ANSWERS := $(STATS_DIR)/smollm2-chat-answers.jsonl
chat-stats: setup models
	$(HIERSPEC) db answers --config deploy/configs/smollm2-cpu.yaml --out $(CHAT_ANSWERS)
	$(HIERSPEC) db build --model smollm2-135m --corpus $(CHAT_ANSWERS) $(STATS_CORPUS) --max-corpus-tokens 1000000
	mkdir -p $(STATS_DIR) && touch $(STATS_DIR)/.ngrams-smollm2

# The main job: the Serve app (SmolLM2, database drafter, embedded statistics store) on a local Ray cluster.
SERVE_CONFIG ?= deploy/configs/smollm2-cpu.yaml
run: setup models $(STATS_DIR)/.ngrams-smollm2
	$(HIERSPEC) serve --config $(SERVE_CONFIG)

# One prompt with and without speculation, in this process, with both speeds.
demo: setup models stats
	$(HIERSPEC) demo --config $(CONFIG)

test: setup models
	$(PY) -m pytest

# The Serve app under bad input, load and faults (about 30 minutes): a table of figures against their targets
# (results/reliability.json); `make test` runs its --quick version.
reliability: setup models
	$(HIERSPEC) reliability --out results/reliability.json

# The default CPU suite (under 20 minutes; the first run also profiles for `auto`, about 4 of them):
# every method on the Qwen pair, code and chat. Prints the table, the JSON and the chart's paths.
bench: setup models stats
	$(HIERSPEC) bench --config deploy/configs/qwen-coder-cpu.yaml --workload $(WORKLOAD) \
	  --categories coding_humaneval,mt_bench --per-category 1 --max-tokens 128 \
	  --methods ar,hf-ar,hf-pld,hf-assisted,hsd,hd,hd+hsd,auto --out results/bench.json

# The longer suites of the acceptance notes (about an hour).
bench-full: setup models stats
	$(HIERSPEC) bench --config deploy/configs/qwen-coder-cpu.yaml --workload $(WORKLOAD) \
	  --categories coding_humaneval,mt_bench --per-category 4 --max-tokens 256 \
	  --methods ar,hf-ar,hf-pld,hf-assisted,hsd,hd,hd+hsd,auto --out results/bench-qwen-coder.json
	$(HIERSPEC) bench --config deploy/configs/smollm2-cpu.yaml --workload $(WORKLOAD) \
	  --categories mt_bench,translation,summarization,coding_humaneval --per-category 5 --max-tokens 256 \
	  --methods ar,hf-ar,hf-pld,hd --out results/bench-smollm2.json

# The planner on the Qwen pair: profile, choose, and measure the choice and two runners-up.
plan: setup models stats
	$(HIERSPEC) plan --config deploy/configs/qwen-coder-cpu.yaml --workload $(WORKLOAD) \
	  --categories coding_humaneval,mt_bench --per-category 4 --measure-per-category 4 --max-tokens 128 \
	  --out results/plan-qwen-coder.json

# Our quantised models beside llama.cpp's plain decoding of the GGUF files they come from (code, summaries and
# translations), both configs, int8 and int4. Builds llama-cpp-python from source once (a few minutes on 2 cores);
# not part of `make test`.
LLAMA_CPP_VERSION := 0.3.36
bench-llama-cpp: setup models stats
	$(PY) -c 'import llama_cpp' 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PY) -m pip install --disable-pip-version-check llama-cpp-python==$(LLAMA_CPP_VERSION)
	for dtype in int8 int4; do \
	  $(HIERSPEC) bench --config deploy/configs/smollm2-cpu.yaml --workload $(WORKLOAD) --dtype $$dtype \
	    --categories coding_humaneval,summarization,translation --per-category 3 --max-tokens 128 \
	    --methods ar,hd,llama.cpp --out results/llama-cpp-smollm2-$$dtype.json || exit 1; \
	  $(HIERSPEC) bench --config deploy/configs/qwen-coder-cpu.yaml --workload $(WORKLOAD) --dtype $$dtype \
	    --categories coding_humaneval,summarization,translation --per-category 2 --max-tokens 128 \
	    --methods ar,hsd,hd,hd+hsd,llama.cpp --out results/llama-cpp-qwen-coder-$$dtype.json || exit 1; \
	done

# The Serve app under streaming clients: one client, a sweep of 1-16 clients (tokens/s and latency, PNG), a long
# prompt among 4 streams, pipelined vs sequential router, HTTP vs in-process. SmolLM2's one stream, sweep and
# in-process run are measured 3 times on fresh clusters (ratios: the medians); the Qwen pair's once (a run is long).
bench-serve: setup models stats
	$(HIERSPEC) bench-serve --config $(SERVE_CONFIG) --workload $(WORKLOAD) --clients 8 --requests 16 \
	  --max-tokens 64 --repeats 3 --out results/bench-serve-smollm2.json
	$(HIERSPEC) bench-serve --config deploy/configs/qwen-coder-cpu.yaml --workload $(WORKLOAD) \
	  --categories coding_humaneval --clients 8 --requests 8 --max-tokens 64 --sweep 1,2,4,8 \
	  --long-prompt-tokens 0 --out results/bench-serve-qwen-coder.json

# The image for KubeRay (k8s/README.md); needs docker, which these CI machines lack (tests lint the Dockerfile).
IMAGE ?= hierspec:0.1.0
image:
	docker build -f k8s/Dockerfile -t $(IMAGE) .

lint: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check ruff
	$(VENV)/bin/ruff check services drafter_db deploy tests

clean:
	rm -rf $(VENV) results .pytest_cache

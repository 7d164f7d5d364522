"""The Serve application end to end: a real local Ray cluster, SmolLM2, the official openai client.

One app for the module: SmolLM2 in float32 with the database drafter (`hd`), two
replicas of its level (for the fault test), an API key, and a small in-flight
bound (for load shedding).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import yaml

from deploy.reliability.redis_server import free_port
from services.serve.level_service import FAULT_TOKEN_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-test"
KEY = "test-key-123"
KEY_ENV = "HIERSPEC_TEST_API_KEY"
PROMPT = "List three uses of a hash map, one per line."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from deploy.app.app import build_from_config, level_deployment_names
    from deploy.config import load_config

    config_path = tmp_path_factory.mktemp("serve") / "config.yaml"
    raw = yaml.safe_load((ROOT / "deploy/configs/smollm2-cpu.yaml").read_text())
    raw.update(name=MODEL, dtype="float32", threads=2,
               serving={"replicas_per_level": 2, "cpus_per_level": 1, "max_in_flight": 3, "api_key_env": KEY_ENV,
                        "max_cached_requests": 8})
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    port, metrics_port = free_port(), free_port()
    os.environ[KEY_ENV] = KEY  # inherited by the workers of the cluster started below
    os.environ[FAULT_TOKEN_ENV] = str(_fault_token())  # a level call holding it ends its replica (fault test)
    ray.init(num_cpus=6, _metrics_export_port=metrics_port, log_to_driver=False, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_from_config(config), name=MODEL, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
           "config": config_path, "level": level_deployment_names(config, config.default_method)[0]}
    serve.shutdown()
    ray.shutdown()
    os.environ.pop(KEY_ENV, None)
    os.environ.pop(FAULT_TOKEN_ENV, None)


POISON = "Spell xylophone backwards."  # its prompt holds the fault token


def _fault_token() -> int:
    """A token of POISON's prompt that no other prompt of this module holds."""
    from services.engine.model_store import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    token = tokenizer.encode(" xylophone")[-1]
    assert token not in tokenizer.encode(PROMPT) and token in tokenizer.encode(POISON)
    return token


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _chat(client, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 48, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **kwargs)


def test_chat_equals_hierspec_generate(server, client):
    reply = _chat(client)
    proc = subprocess.run([str(Path(sys.executable).with_name("hierspec")), "generate", "--config",
                           str(server["config"]), "--prompt", PROMPT, "--max-tokens", "48", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    local = json.loads(proc.stdout)
    assert reply.choices[0].message.content == local["text"]
    assert reply.usage.completion_tokens == len(local["token_ids"])
    assert reply.choices[0].finish_reason == ("length" if len(local["token_ids"]) == 48 else "stop")


def test_logprobs_are_the_targets_own(server, client):
    """Through the official client, `hd` reports exactly what plain decoding (`hierspec generate --method ar`)
    computes: every token's log-probability and its top alternatives."""
    reply = _chat(client, logprobs=True, top_logprobs=2, max_tokens=24)
    proc = subprocess.run([str(Path(sys.executable).with_name("hierspec")), "generate", "--config",
                           str(server["config"]), "--method", "ar", "--prompt", PROMPT, "--max-tokens", "24",
                           "--logprobs", "2", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    local = json.loads(proc.stdout)
    content = reply.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == [entry["logprob"] for entry in local["logprobs"]]
    assert [[top.logprob for top in entry.top_logprobs] for entry in content] == \
        [[value for _, value in entry["top"]] for entry in local["logprobs"]]
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    # streamed, the chunks' entries together are the whole response's
    streamed = [entry for chunk in _chat(client, logprobs=True, top_logprobs=2, max_tokens=24, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in content]


def test_streamed_chat_matches_plain_chat(client):
    plain = _chat(client).choices[0].message.content
    stream = _chat(client, stream=True, stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == plain
    assert reasons[-1] in ("stop", "length") and usage.completion_tokens > 0


def test_completions_and_models(client):
    out = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens <= 24
    streamed = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    whole = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                      logprobs=2).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0, logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [value for chunk in chunks for value in getattr(chunk, field)] == getattr(whole, field), field
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_stop_strings_end_the_text(client):
    full = _chat(client).choices[0].message.content
    cut = full.split("\n")[0]
    reply = _chat(client, stop=["\n"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    # log-probabilities up to the token that completed the stop string, whole or streamed (text held back)
    whole = _chat(client, stop=["\n"], logprobs=True).choices[0].logprobs.content
    streamed = [entry for chunk in _chat(client, stop=["\n"], logprobs=True, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert "".join(entry.token for entry in whole).startswith(cut + "\n")
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in whole]


def test_several_choices_are_the_samples_of_seed_plus_i(client):
    """n = 3 with seed 11: choice i is exactly the one-choice answer for seed 11 + i (each an exact sample)."""
    many = _chat(client, n=3, seed=11, temperature=0.8, max_tokens=16)
    alone = [_chat(client, seed=11 + i, temperature=0.8, max_tokens=16) for i in range(3)]
    assert [choice.index for choice in many.choices] == [0, 1, 2]
    texts = [reply.choices[0].message.content for reply in alone]
    assert [choice.message.content for choice in many.choices] == texts
    assert len(set(texts)) > 1  # the seeds differ, so should the samples
    assert many.usage.completion_tokens == sum(reply.usage.completion_tokens for reply in alone)



def test_several_choices_stream_each_under_its_index(client):
    """n = 3 streamed: the chunks under index i make up the whole response's choice i (text, log-probabilities,
    finish reason), and the choices generate at once (their chunks interleave); the completions API alike."""
    kwargs = {"n": 3, "seed": 11, "temperature": 0.8, "max_tokens": 16, "logprobs": True}
    whole = _chat(client, **kwargs)
    texts, entries, reasons, order, usage = defaultdict(str), defaultdict(list), {}, [], None
    for chunk in _chat(client, **kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.logprobs:
                entries[choice.index] += [entry.model_dump() for entry in choice.logprobs.content]
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
            order += [choice.index] if choice.delta.content else []
    assert [texts[i] for i in range(3)] == [choice.message.content for choice in whole.choices]
    assert [entries[i] for i in range(3)] == [[entry.model_dump() for entry in choice.logprobs.content]
                                              for choice in whole.choices]
    assert [reasons[i] for i in range(3)] == [choice.finish_reason for choice in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # choice 1's text began before choice 0's ended
    text = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0.8, "seed": 5, "n": 2}
    streamed = defaultdict(str)
    for chunk in client.completions.create(**text, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(2)] == [choice.text for choice in client.completions.create(**text).choices]

BAD_REQUESTS = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 4}, 400, "n"),  # > max_in_flight
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 32_000] * 4}, 400, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-45, "max_tokens": 2}, 200,
     None),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_4xx_in_openai_shape(server, client, body, status, param):
    reply = requests.post(server["url"] + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == status, reply.text
    if status == 200:
        return
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_an_empty_completion_prompt_is_a_400_naming_it(server):
    reply = requests.post(server["url"] + "/v1/completions", json={"model": MODEL, "prompt": ""}, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"


def test_malformed_json_auth_and_health(server, client):
    url = server["url"]
    reply = requests.post(url + "/v1/chat/completions", data=b"{not json", timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    assert requests.get(url + "/v1/models", timeout=30).status_code == 401
    assert requests.get(url + "/v1/models", timeout=30, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(url + "/health", timeout=30).status_code == 200
    assert requests.get(url + "/v2/nothing", timeout=30, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert _chat(client).choices[0].message.content  # still serving


def test_every_route_but_health_needs_the_key_docs_and_schema_included(server):
    for route in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        assert requests.get(server["url"] + route, timeout=30).status_code == 401, route
    schema = requests.get(server["url"] + "/openapi.json", timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    paths = schema.json()["paths"]
    for route in ("/v1/chat/completions", "/v1/completions"):  # the bodies the routes parse themselves, for fuzzers
        assert paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """413 from the declared length, before the replica reads the body, and from the bytes counted when a
    chunked body declares none."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    huge = b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}'
    reply = requests.post(server["url"] + "/v1/completions", data=huge, headers=headers, timeout=60)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    chunked = requests.post(server["url"] + "/v1/completions", data=iter([huge[i : i + 65536] for i in
                                                                         range(0, len(huge), 65536)]),
                            headers=headers, timeout=60)
    assert chunked.status_code == 413


def test_streams_count_against_the_in_flight_bound(server):
    """3x max_in_flight streaming requests at once: exactly max_in_flight streams, the rest 503 with
    Retry-After (a stream used to take its place only once its body began)."""
    def one(_):
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40,
                "temperature": 0, "stream": True}
        with requests.post(server["url"] + "/v1/chat/completions", json=body, timeout=300, stream=True,
                           headers={"Authorization": f"Bearer {KEY}"}) as reply:
            text = reply.text
            return reply.status_code, reply.headers.get("retry-after"), text

    with ThreadPoolExecutor(9) as pool:
        replies = list(pool.map(one, range(9)))
    codes = sorted(code for code, _, _ in replies)
    assert codes == [200] * 3 + [503] * 6, codes
    assert all(retry for code, retry, _ in replies if code == 503)
    assert all(text.rstrip().endswith("data: [DONE]") for code, _, text in replies if code == 200)


def test_a_client_leaving_a_several_choice_stream_frees_every_choice(server):
    """n = 3 holds all three places of max_in_flight. The client reads the first chunk and leaves: every choice
    stops, not only the one being sent, so the places are free again within seconds. Choice 0 (seed 5) would
    otherwise run to its 400 tokens, about 20 s on the 2-core dev host."""
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server["url"] + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write the numbers from 1 to 300, one per line."}],
            "max_tokens": 400, "temperature": 0.8, "seed": 5, "n": 3, "stream": True}
    with requests.post(url, json=body, stream=True, headers=headers, timeout=300) as reply:
        assert reply.status_code == 200
        assert next(line for line in reply.iter_lines() if line).startswith(b"data: {")
    left = time.monotonic()
    probe = {**body, "max_tokens": 1, "stream": False}
    while (status := requests.post(url, json=probe, headers=headers, timeout=300).status_code) == 503:
        assert time.monotonic() - left < 6, "the choices of a stream its client left still hold their places"
        time.sleep(0.25)
    assert status == 200


def test_load_is_shed_with_503_and_retry_after(server):
    def one(_):
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40,
                "temperature": 0}
        return requests.post(server["url"] + "/v1/chat/completions", json=body, timeout=300,
                             headers={"Authorization": f"Bearer {KEY}"})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and 503 in codes, codes
    shed = next(r for r in replies if r.status_code == 503)
    assert shed.headers["retry-after"] and shed.json()["error"]["code"] == "overloaded"


def test_killing_a_level_replica_mid_request_keeps_the_output(server, client):
    from ray import serve

    kwargs = {"max_tokens": 120, "temperature": 0}
    reference = _chat(client, **kwargs).choices[0].message.content
    stream = _chat(client, stream=True, **kwargs)
    pieces, killed = [], False
    level = serve.get_deployment_handle(server["level"], app_name=MODEL)
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
        if not killed and len(pieces) >= 3:
            pid = level.options(multiplexed_model_id=chunk.id).process_id.remote().result()
            os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed and "".join(pieces) == reference


def test_a_request_that_kills_its_replica_twice_fails_alone(server, client):
    """A request whose level calls end the replica computing them (as an out-of-memory kill would) is retried once,
    in a forward of its own, then fails with an error; a stream running meanwhile keeps its exact text."""
    kwargs = {"max_tokens": 80, "temperature": 0}
    reference = _chat(client, **kwargs).choices[0].message.content

    def stream() -> str:
        return "".join(choice.delta.content or "" for chunk in _chat(client, stream=True, **kwargs)
                       for choice in chunk.choices)

    def poison() -> requests.Response:
        time.sleep(1.0)  # the stream is under way
        return requests.post(server["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": POISON}],
                                   "max_tokens": 8}, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        streamed, failed = pool.submit(stream), pool.submit(poison)
        assert streamed.result() == reference
        reply = failed.result()
    assert reply.status_code == 500 and reply.json()["error"]["code"] == "replica_crashed", reply.text
    assert _chat(client, **kwargs).choices[0].message.content == reference  # and the app serves on


def test_metrics_reach_the_node_metrics_endpoint(server, client):
    _chat(client)
    wanted = ("ray_hierspec_tokens_generated", "ray_hierspec_tokens_accepted", "ray_hierspec_time_to_first_token",
              "ray_hierspec_round_latency_seconds", "ray_hierspec_requests_in_flight")
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        try:
            text = requests.get(server["metrics"], timeout=10).text
        except requests.RequestException:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing


def test_a_model_the_fast_decoder_lacks_serves_through_transformers(server, tmp_path):
    """A tiny random Phi-3 with SmolLM2's tokenizer, saved as a Hugging Face directory and served from the config
    `hierspec serve --model DIR` builds: through the official client, its greedy `hd` text is plain decoding's."""
    import torch
    from ray import serve
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from deploy.app.app import build_from_config
    from deploy.cli import _generate_once
    from deploy.config import config_for_models
    from services.engine.model_store import convert

    tokenizer = AutoTokenizer.from_pretrained(convert("smollm2-135m"))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id or 0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    directory = tmp_path / "tiny-phi3"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = config_for_models(str(directory), [])
    config = config.model_copy(update={"dtype": "float32",
                                       "serving": config.serving.model_copy(update={"api_key_env": KEY_ENV})})
    serve.run(build_from_config(config), name="tiny-phi3", route_prefix="/phi3")
    try:
        client = openai.OpenAI(base_url=server["url"] + "/phi3/v1", api_key=KEY, max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="tiny-phi3", messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_tokens=24)
        assert reply.model == "tiny-phi3"
        _, plain = _generate_once(config, "ar", "float32", PROMPT, 24, 0.0, None, True)
        assert reply.choices[0].message.content == plain
        assert reply.usage.completion_tokens == 24  # a random model: no end of sequence this early
    finally:
        serve.delete("tiny-phi3")


@pytest.mark.parametrize("method", ["hsd", "hd"])
def test_logprobs_are_plain_decodings_in_the_default_dtype(server, method):
    """In bfloat16, the default dtype (row-invariant kernels): through the official client, `hsd` (SmolLM2
    drafting for itself, so whole drafts are accepted and a round commits tokens from many rows of the target's
    verification) and `hd` report every token's log-probability and top alternatives exactly as in-process plain
    decoding (`ar`) computes them."""
    from ray import serve

    from deploy.app.app import build_from_config
    from deploy.cli import _generate_once
    from deploy.config import config_for_models
    from services.engine.model_store import convert

    config = config_for_models("smollm2-135m", [str(convert("smollm2-135m"))])  # its converted directory
    name = f"smollm2-{method}"
    config = config.model_copy(update={"method": method, "name": name,
                                       "serving": config.serving.model_copy(update={"api_key_env": KEY_ENV})})
    assert config.dtype == "bfloat16"
    serve.run(build_from_config(config), name=name, route_prefix=f"/{method}")
    try:
        client = openai.OpenAI(base_url=f"{server['url']}/{method}/v1", api_key=KEY, max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_tokens=24, logprobs=True, top_logprobs=2)
        plain, text = _generate_once(config, "ar", None, PROMPT, 24, 0.0, None, True, logprobs=2)
        assert reply.choices[0].message.content == text
        content = reply.choices[0].logprobs.content
        assert [entry.logprob for entry in content] == [value for value, _ in plain.logprobs]
        assert [[top.logprob for top in entry.top_logprobs] for entry in content] == \
            [[value for _, value in top] for _, top in plain.logprobs]
    finally:
        serve.delete(name)


def test_rounds_in_the_target_replica_are_plain_decoding(server):
    """`serving.rounds_in: target` (SmolLM2 `hd`, bfloat16): the target's replica runs the rounds and streams
    them (its `generate`, called directly here, gives plain decoding's tokens). Three concurrent requests (one
    streamed), with log-probabilities, each equal to in-process plain decoding of its prompt alone, finish reasons
    included; a client leaving a long stream, and a stop string ending a response, stop the replica's generation
    (its forwards stop); a request that ends the replica fails with `replica_crashed`."""
    from ray import serve

    from deploy.app.app import build_from_config, level_deployment_names
    from deploy.cli import _generate_once
    from deploy.config import config_for_models
    from services.engine.model_store import load_tokenizer
    from services.engine.prompts import chat_prompt_ids, stop_token_ids
    from services.engine.sampling import SamplingParams

    config = config_for_models("smollm2-135m", [])
    name = "smollm2-in-target"
    config = config.model_copy(update={"method": "hd", "name": name, "serving": config.serving.model_copy(
        update={"api_key_env": KEY_ENV, "rounds_in": "target"})})
    assert config.dtype == "bfloat16" and config.rounds_in_target("hd")
    serve.run(build_from_config(config), name=name, route_prefix="/in-target")
    url, headers = f"{server['url']}/in-target/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    try:
        client = openai.OpenAI(base_url=f"{server['url']}/in-target/v1", api_key=KEY, max_retries=0, timeout=300)
        prompts = [PROMPT, "Write a haiku about caches.", "What is 2 + 2? Reply with the number only."]

        def ask(index: int):
            kwargs = {"model": name, "messages": [{"role": "user", "content": prompts[index]}], "temperature": 0,
                      "max_tokens": 32, "logprobs": True, "top_logprobs": 2}
            if index == 1:
                chunks = list(client.chat.completions.create(stream=True, **kwargs))
                choices = [choice for chunk in chunks for choice in chunk.choices]
                return "".join(choice.delta.content or "" for choice in choices), \
                    [entry for choice in choices if choice.logprobs for entry in choice.logprobs.content], \
                    choices[-1].finish_reason
            choice = client.chat.completions.create(**kwargs).choices[0]
            return choice.message.content, choice.logprobs.content, choice.finish_reason

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, range(3)))
        reasons = []
        for prompt, (text, entries, reason) in zip(prompts, replies):
            plain, plain_text = _generate_once(config, "ar", None, prompt, 32, 0.0, None, True, logprobs=2)
            assert (text, reason) == (plain_text, plain.finish_reason)
            assert [entry.logprob for entry in entries] == [value for value, _ in plain.logprobs]
            assert [[top.logprob for top in entry.top_logprobs] for entry in entries] == \
                [[value for _, value in top] for _, top in plain.logprobs]
            reasons.append(reason)
        assert "stop" in reasons and "length" in reasons

        level = serve.get_deployment_handle(level_deployment_names(config, "hd")[0], name)
        generation, _ = _generate_once(config, "ar", None, PROMPT, 16, 0.0, None, True)
        tokenizer = load_tokenizer("smollm2-135m")
        prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])
        outputs = list(level.options(stream=True).generate.remote("direct", prompt_ids, SamplingParams(), 16,
                                                                  stop_token_ids(tokenizer)))
        assert [token for output in outputs for token in output.tokens] == generation.token_ids
        assert outputs[-1].finish_reason == generation.finish_reason
        assert outputs[-1].stats.tokens == len(generation.token_ids)
        # the requests above shared the chat template's system prompt: later ones copied it (the same outputs)
        assert level.batching.remote().result()["prefix_tokens_reused"] > 0

        def stops_generating(leave) -> None:
            """`leave` starts a long generation and ends it early: the replica computed for it, then stops."""
            before = level.batching.remote().result()["forwards"]
            seen = leave()
            time.sleep(1.5)
            after = level.batching.remote().result()["forwards"]
            assert after >= before + 2, seen  # its prompt and a round at least
            time.sleep(2.0)
            state = level.batching.remote().result()
            assert state["forwards"] == after, "the replica generates for nobody"
            assert state["cached_requests"] == 0, "the generation holds its cache"

        # 400 tokens alone (about 15 s), its dragon named in the first sentence
        story = {"model": name, "messages": [{"role": "user", "content": "Write a long story about a dragon who "
                                                                          "learns to code."}],
                 "max_tokens": 400, "temperature": 0}

        def client_leaves() -> None:
            with requests.post(url, json={**story, "stream": True}, stream=True, timeout=300,
                               headers=headers) as reply:
                assert reply.status_code == 200
                chunks = (json.loads(line[len(b"data: "):]) for line in reply.iter_lines()
                          if line.startswith(b"data: {"))
                assert next(chunk for chunk in chunks if chunk["choices"][0]["delta"].get("content"))  # a token

        def stop_string_ends_it() -> None:
            reply = requests.post(url, json={**story, "stop": ["Zorvax"]}, timeout=300, headers=headers)
            assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "stop", reply.text
            assert reply.json()["hierspec_stats"]["tokens"] > 0  # statistics of a response ended early
            return reply.text

        stops_generating(client_leaves)
        stops_generating(stop_string_ends_it)

        # a request that ends its replica fails with an error naming it (last: the replica restarts meanwhile)
        crashed = requests.post(url, timeout=300, headers=headers,
                                json={"model": name, "messages": [{"role": "user", "content": POISON}],
                                      "max_tokens": 8})
        assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "replica_crashed", crashed.text
    finally:
        serve.delete(name)

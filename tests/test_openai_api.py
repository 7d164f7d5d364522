"""The request contract: every field of OpenAI's request schemas is honoured or refused with a 400 naming it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.serve.openai_api import ChatCompletionRequest, CompletionRequest, validation_error

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "m", "prompt": "hi"}

# OpenAI's chat-completions request fields (the API reference, 2025), each with a value a client might send
# that is not the field's neutral one, and what the server does with it.
CHAT_FIELDS = {
    "audio": ({"voice": "alloy", "format": "mp3"}, "refused"),
    "frequency_penalty": (0.5, "refused"),
    "function_call": ("auto", "refused"),
    "functions": ([{"name": "f"}], "refused"),
    "logit_bias": ({"50256": -100}, "refused"),
    "logprobs": (True, "honoured"),
    "max_completion_tokens": (12, "honoured"),
    "max_tokens": (12, "honoured"),
    "metadata": ({"team": "a"}, "honoured"),
    "modalities": (["text", "audio"], "refused"),
    "moderation": ({"model": "omni"}, "refused"),
    "n": (2, "honoured"),
    "parallel_tool_calls": (False, "honoured"),
    "prediction": ({"type": "content", "content": "x"}, "refused"),
    "presence_penalty": (0.5, "refused"),
    "prompt_cache_key": ("k", "honoured"),
    "prompt_cache_options": ({"mode": "x"}, "refused"),
    "prompt_cache_retention": ("24h", "honoured"),
    "reasoning_effort": ("low", "refused"),
    "response_format": ({"type": "json_object"}, "refused"),
    "safety_identifier": ("u1", "honoured"),
    "seed": (7, "honoured"),
    "service_tier": ("flex", "refused"),
    "stop": (["\n"], "honoured"),
    "store": (True, "refused"),
    "stream": (True, "honoured"),
    "stream_options": ({"include_usage": True}, "honoured"),
    "temperature": (0.5, "honoured"),
    "tool_choice": ("auto", "refused"),
    "tools": ([{"type": "function", "function": {"name": "f"}}], "refused"),
    "top_logprobs": (3, "refused"),  # alone: OpenAI wants logprobs: true with it (honoured then, see below)
    "top_p": (0.9, "honoured"),
    "user": ("u1", "honoured"),
    "verbosity": ("low", "refused"),
    "web_search_options": ({}, "refused"),
}

TEXT_FIELDS = {
    "best_of": (2, "refused"),
    "echo": (True, "refused"),
    "frequency_penalty": (0.5, "refused"),
    "logit_bias": ({"50256": -100}, "refused"),
    "logprobs": (2, "honoured"),
    "max_tokens": (12, "honoured"),
    "n": (2, "honoured"),
    "presence_penalty": (0.5, "refused"),
    "seed": (7, "honoured"),
    "stop": (["\n"], "honoured"),
    "stream": (True, "honoured"),
    "stream_options": ({"include_usage": True}, "honoured"),
    "suffix": ("}", "refused"),
    "temperature": (0.5, "honoured"),
    "top_p": (0.9, "honoured"),
    "user": ("u1", "honoured"),
}


def _openai_fields(params) -> set[str]:
    import typing

    return set(typing.get_type_hints(params, include_extras=False)) | {"stream"}


def test_the_tables_cover_every_field_the_openai_client_defines():
    """A field the official client adds later fails here until it is classified above."""
    from openai.types import completion_create_params as text
    from openai.types.chat import completion_create_params as chat

    assert _openai_fields(chat.CompletionCreateParamsBase) - {"messages", "model"} == set(CHAT_FIELDS)
    assert _openai_fields(text.CompletionCreateParamsBase) - {"prompt", "model"} == set(TEXT_FIELDS)


def _outcome(model, body: dict):
    try:
        return model.model_validate_json(json.dumps(body))
    except ValidationError as error:
        return validation_error(list(error.errors()))


@pytest.mark.parametrize("model,base,fields", [(ChatCompletionRequest, CHAT, CHAT_FIELDS),
                                               (CompletionRequest, TEXT, TEXT_FIELDS)], ids=["chat", "completions"])
def test_every_openai_field_is_honoured_or_refused_by_name(model, base, fields):
    for field, (value, fate) in fields.items():
        outcome = _outcome(model, {**base, field: value})
        if fate == "honoured":
            assert isinstance(outcome, model), (field, outcome.message)
            assert getattr(outcome, field) is not None, field
        else:
            assert not isinstance(outcome, model), f"{field}={value!r} was accepted"
            assert outcome.status == 400 and outcome.param == field, (field, outcome.param, outcome.message)


@pytest.mark.parametrize("field,value", [("min_p", 0.1), ("repetition_penalty", 1.1), ("ignore_eos", True)])
def test_fields_openai_does_not_define_are_refused_not_ignored(field, value):
    error = _outcome(ChatCompletionRequest, {**CHAT, field: value})
    assert error.status == 400 and error.param == field and "refused rather than ignored" in error.message


def test_logprobs_are_honoured_within_openais_bounds_whole_or_streamed():
    chat = _outcome(ChatCompletionRequest, {**CHAT, "logprobs": True, "top_logprobs": 20})
    assert chat.sampling().logprobs == 20
    assert _outcome(ChatCompletionRequest, {**CHAT, "logprobs": True}).sampling().logprobs == 0
    assert _outcome(ChatCompletionRequest, CHAT).sampling().logprobs is None
    assert _outcome(CompletionRequest, {**TEXT, "logprobs": 5}).sampling().logprobs == 5
    assert _outcome(ChatCompletionRequest, {**CHAT, "logprobs": True, "stream": True}).sampling().logprobs == 0
    assert _outcome(CompletionRequest, {**TEXT, "logprobs": 2, "stream": True}).sampling().logprobs == 2
    refused = [(ChatCompletionRequest, CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
               (CompletionRequest, TEXT, {"logprobs": 6}, "logprobs")]
    for model, base, body, param in refused:
        error = _outcome(model, {**base, **body})
        assert not isinstance(error, model) and error.status == 400 and error.param == param, (body, error)


def test_neutral_values_of_refused_fields_pass():
    neutral = {"n": 1, "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
               "response_format": {"type": "text"}, "store": False, "modalities": ["text"], "service_tier": "auto",
               "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "stream_options": {"include_usage": False, "include_obfuscation": False}}
    assert isinstance(_outcome(ChatCompletionRequest, {**CHAT, **neutral}), ChatCompletionRequest)


def test_null_means_absent_and_a_received_message_can_be_sent_back():
    """Clients send null for fields they leave unset, and resend the assistant message they received
    (`message.model_dump()`, with its empty refusal, audio, tool calls and annotations)."""
    nulls = {field: None for field in ("n", "presence_penalty", "frequency_penalty", "stream", "logprobs", "tools",
                                       "response_format", "stop", "seed", "user", "stream_options")}
    assert isinstance(_outcome(ChatCompletionRequest, {**CHAT, **nulls}), ChatCompletionRequest)
    received = {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": None}
    body = {**CHAT, "messages": [*CHAT["messages"], received, {"role": "user", "content": "Again"}]}
    assert isinstance(_outcome(ChatCompletionRequest, body), ChatCompletionRequest)
    assert isinstance(_outcome(CompletionRequest, {**TEXT, "echo": None, "n": None}), CompletionRequest)


def test_message_fields_are_checked_too():
    error = _outcome(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "hi", "name": "x"}]})
    assert error.param == "messages.0.name"
    error = _outcome(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert error.status == 400 and error.param.startswith("messages.0.content")


def test_several_choices_sample_seed_plus_i_whole_or_streamed():
    chat = _outcome(ChatCompletionRequest, {**CHAT, "n": 3, "seed": 7, "temperature": 0.8})
    assert chat.choices == 3 and [chat.sampling(i).seed for i in range(3)] == [7, 8, 9]
    top = _outcome(CompletionRequest, {**TEXT, "n": 2, "seed": 2**64 - 1})
    assert [top.sampling(i).seed for i in range(2)] == [2**64 - 1, 0]  # wrapped into the seed range
    assert _outcome(CompletionRequest, {**TEXT, "n": 2}).sampling(1).seed is None  # each draws its own
    assert _outcome(ChatCompletionRequest, {**CHAT, "n": 2, "stream": True}).choices == 2
    assert _outcome(CompletionRequest, {**TEXT, "n": 2, "stream": True}).choices == 2
    for model, base, body in [(ChatCompletionRequest, CHAT, {"n": 9}), (ChatCompletionRequest, CHAT, {"n": 0})]:
        error = _outcome(model, {**base, **body})
        assert not isinstance(error, model) and error.status == 400 and error.param == "n", (body, error)

"""The OpenAI-compatible protocol: request models, response chunks and errors.

Validation lives here so that every user mistake becomes a 4xx with OpenAI's
error shape, `{"error": {"message", "type", "param", "code"}}`, before any work
starts. Options we cannot honour exactly (penalties, tools, JSON output) are
refused, never silently ignored: a client that asked for them would get a
different distribution than it expects. Fields OpenAI does not define are
refused too, with a 400 naming the field.
"""

from __future__ import annotations

import json
import reprlib
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.engine.sampling import MAX_TOP_LOGPROBS, SEED_RANGE, SamplingParams, TokenLogprob

MAX_STOPS = 4
# Longest stop string: the text held back for a partial stop is rescanned every token (four 32k-character
# stops cost 132 ms a round), and no tokenizer's output needs a longer one.
MAX_STOP_CHARS = 512
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the completions API's logprobs
MAX_CHOICES = 8  # n: each choice is a generation holding one of the router's max_in_flight places


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _refused_unless_neutral(neutral: dict[str, tuple]):
    """A validator for OpenAI's fields we cannot honour exactly: each accepted only at a neutral value (what
    OpenAI does when the field is absent), else a 400 naming it."""
    def check(cls, value, info):
        if value not in neutral[info.field_name]:
            raise ValueError(f"{reprlib.repr(value)} is not supported by this server (only "
                             f"{' or '.join(json.dumps(v) for v in neutral[info.field_name])})")
        return value
    return field_validator(*neutral)(check)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="accepted when false: chunks are not padded")

    _neutral = _refused_unless_neutral({"include_obfuscation": (None, False)})


class _GenerationRequest(BaseModel):
    """What chat and text completions share. Every field OpenAI defines is either honoured or, where we cannot
    honour it exactly, refused unless neutral; fields OpenAI does not define are refused too (`extra="forbid"`):
    a client that asked for something gets it or an error naming the field, never silently something else."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="with a seed, the text is reproducible and the same from every method")
    stop: str | list[str] | None = None
    stream: bool | None = False  # null, as clients send for "absent", means the default wherever it is accepted
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; nothing to honour in generation
    n: int | None = Field(1, ge=1, le=MAX_CHOICES,
                          description="independent samples; with a seed, choice i is the sample of seed + i")
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None

    _shared_neutral = _refused_unless_neutral({"presence_penalty": (None, 0.0),
                                               "frequency_penalty": (None, 0.0), "logit_bias": (None, {})})

    @property
    def choices(self) -> int:
        return self.n or 1

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
        return None

    def sampling(self, choice: int = 0) -> SamplingParams:
        """Choice i samples with seed + i (wrapped into the seed range): each choice is an exact sample, choice 0
        is the one-choice answer for that seed, and the choices differ. Without a seed each draws its own."""
        seed = self.seed
        if seed is not None and choice:
            seed += choice
            if seed > SEED_RANGE[1]:
                seed -= SEED_RANGE[1] + 1
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
                              logprobs=self.top_logprobs_wanted)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; an assistant message as the client received it (`message.model_dump()`) comes back with its
    empty fields, which pass."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None  # chat templates have no place for it: refused rather than dropped
    refusal: str | None = None
    audio: dict | None = None
    function_call: dict | None = None
    tool_calls: list | None = None
    annotations: list | None = None

    _neutral = _refused_unless_neutral({"name": (None,), "refusal": (None,), "audio": (None,),
                                        "function_call": (None,), "tool_calls": (None, []), "annotations": (None, [])})

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # informational: nothing in generation to honour
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None  # tools are refused, so there are no tool calls to parallelise
    service_tier: str | None = None
    logprobs: bool | None = None  # the target's own, the same from every method (`services.engine.sampling`)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # refused unless neutral (a later issue may honour some)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    store: bool | None = None
    moderation: dict | str | None = None
    prompt_cache_options: dict | None = None

    _neutral = _refused_unless_neutral({
        "tools": (None, []), "tool_choice": (None, "none"),
        "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
        "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
        "verbosity": (None,), "web_search_options": (None,), "store": (None, False),
        "service_tier": (None, "auto", "default"), "moderation": (None,), "prompt_cache_options": (None,),
    })

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    _neutral = _refused_unless_neutral({"echo": (None, False), "suffix": (None,), "best_of": (None, 1)})

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported (send several requests)")
        return value

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI/pydantic errors -> one 400 naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "not a field this server knows (refused rather than ignored)"
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if not loc:  # the body as a whole: absent, not JSON, or not an object
        return APIError(400, "the request body must be a JSON object (send Content-Type: application/json)",
                        code="invalid_body")
    param = ".".join(loc) or None
    return APIError(400, f"{param}: {message}" if param else message, param=param)


class TextAssembler:
    """Turns committed token ids into text deltas: holds back an incomplete UTF-8 sequence and
    anything that might be the start of a stop string, and ends the text at a stop string.

    Tokens are taken one at a time, as plain decoding commits them, so a stop string ends the text
    where plain decoding would end it however many tokens a round commits (with overlapping stop
    strings, the first token that completes any of them decides, and the earliest match it completes
    cuts). `tokens_used` counts the tokens up to the one that completed a stop string: what plain
    decoding generated, which `usage.completion_tokens` reports."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stops = stop_strings
        self.token_ids: list[int] = []
        self.sent = 0
        self.stopped = False

    @property
    def tokens_used(self) -> int:
        return len(self.token_ids)

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """The new text that can be sent now."""
        deltas = []
        for token in token_ids:
            deltas.append(self._add_one(token))
            if self.stopped:
                break
        return "".join(deltas)

    def _add_one(self, token: int) -> str:
        self.token_ids.append(token)
        text = self._text()
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text)
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for stop in self.stops:  # keep back unsent text that could grow into a stop string
                for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
                    if text.endswith(stop[:k], 0, end):
                        end -= k
                        break
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """What was held back, once generation ended without a stop string."""
        if self.stopped:
            return ""
        text = self._text()
        delta = text[self.sent:]
        self.sent = len(text)
        return delta


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme, which SmolLM2, Llama 3 and Qwen use):
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


_BYTE_OF = _byte_level_alphabet()


def _piece(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its bytes: a token holding part of a UTF-8 character decodes to U+FFFD, and its bytes
    are then the raw ones its byte-level name spells."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        name = tokenizer.convert_ids_to_tokens(token)
        if isinstance(name, str) and name and all(c in _BYTE_OF for c in name):
            return text, [_BYTE_OF[c] for c in name]
    return text, list(text.encode())


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: each generated token with its log-probability and top alternatives."""
    def entry(token: int, value: float) -> dict:
        text, raw = _piece(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": raw}
    return {"content": [{**entry(token, value), "top_logprobs": [entry(t, v) for t, v in top]}
                        for token, (value, top) in zip(token_ids, logprobs)], "refusal": None}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    """A text completion choice's `logprobs` (the legacy shape: parallel lists, offsets into the text; a stream's
    chunk passes where its first token's text begins)."""
    tokens, offsets = [], []
    for token in token_ids:
        text = _piece(tokenizer, token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    def alternatives(token: int, value: float, top: list[tuple[int, float]]) -> dict[str, float]:
        # up to logprobs + 1 entries, the generated token's among them (as OpenAI's); texts that two tokens share
        # keep the likelier one's value
        entries = {}
        for t, v in [*top, (token, value)]:
            entries.setdefault(_piece(tokenizer, t)[0], v)
        return entries
    return {"tokens": tokens, "token_logprobs": [value for value, _ in logprobs],
            "top_logprobs": [alternatives(token, value, top) for token, (value, top) in zip(token_ids, logprobs)],
            "text_offset": offsets}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None, index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, index: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def now() -> int:
    return int(time.time())

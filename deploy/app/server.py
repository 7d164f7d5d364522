"""The HTTP ingress of the Serve application: OpenAI routes over one router.

A replica loads the tokenizer and the database drafter (its model DB is shared
by the replica's requests), connects to the level deployments (it is ready once
they are) and runs a `Router`. Prompts are tokenized here, so what reaches the
levels is token ids. With `serving.rounds_in: target` (a one-level hierarchy)
the target's replicas hold the drafter and run the rounds, and the router reads
their streams (`services.serve.remote_rounds`).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations of the Serve class-based view.

import asyncio
import contextlib
import copy
import dataclasses
import functools
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.builder import chain_decoder, serving_drafter
from deploy.config import HierspecConfig
from services.engine.model_store import load_tokenizer
from services.engine.prompts import chat_prompt_ids, stop_token_ids, text_prompt_ids
from services.serve.level_service import LevelCrashed, RemoteLevel
from services.serve.metrics import ServingMetrics
from services.serve.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TextAssembler,
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_id,
    completion_logprobs,
    now,
    sse,
    usage,
    validation_error,
)
from services.serve.remote_rounds import RemoteRounds
from services.serve.router import Overloaded, RequestTimeout, Router

log = logging.getLogger("hierspec.server")

# The schema and its pages are routes of the class below, behind the API key like every route but /health.
app = FastAPI(title="hierspec", description="Lossless speculative decoding, OpenAI-compatible", docs_url=None,
              redoc_url=None, openapi_url=None)

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


@functools.cache
def api_schema(model: str) -> dict:
    """FastAPI's schema plus the request bodies, which the routes parse themselves (to answer bad input in
    OpenAI's error shape and to bound the body before reading it), their `model` the one this app serves: client
    generators and the fuzzer of `make reliability` see what each route takes."""
    schema = copy.deepcopy(app.openapi())
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, body_model in BODIES.items():
        body = body_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"] = {**body["properties"]["model"], "enum": [model]}
        components[body_model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                  f"{body_model.__name__}"}}}}
    return schema


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return _error_response(exc)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return _error_response(APIError(500, "internal error; the server logged it", type="internal_error"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))


@contextlib.contextmanager
def _overloaded_is_503():
    try:
        yield
    except Overloaded as exc:
        raise APIError(503, str(exc), type="overloaded_error", code="overloaded",
                       headers={"Retry-After": str(exc.retry_after)}) from None


def _failure(exc: RequestTimeout | LevelCrashed) -> APIError:
    """The error a client gets for a request the server ended: past its timeout, or one whose computation kept
    ending level replicas (it fails alone; the others go on)."""
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="timeout_error", code="timeout")
    return APIError(500, str(exc), type="server_error", code="replica_crashed")


def _completion_tokens(generation, assembler: TextAssembler) -> int:
    """Tokens plain decoding would have generated: up to the one that completed a stop string, if one did
    (a round may have committed more)."""
    return assembler.tokens_used if assembler.stopped else len(generation.token_ids)


def _log_other_failures(rid: str, reported: BaseException, outcomes: list) -> None:
    """A request answers with its first choice's failure; the other choices' failures go to the log, so that
    none is lost (a choice's exception that is not `reported`, among `outcomes`)."""
    for outcome in outcomes:
        if isinstance(outcome, Exception) and outcome is not reported:
            log.warning("request %s: another of its choices failed too", rid, exc_info=outcome)


@dataclasses.dataclass(eq=False)
class StreamedChoice:
    """One choice of a streamed response: its text deltas, and how far its log-probabilities went out."""

    index: int
    pieces: AsyncIterator[str]
    generation: object  # services.engine.hsd.Generation
    assembler: TextAssembler
    sent: int = 0  # tokens whose log-probabilities went out
    offset: int = 0  # where the next token's text begins (the completions API's text offsets)


@serve.ingress(app)  # at import: every replica process re-imports this module and needs the class-based view
class HierspecServer:
    async def __init__(self, config: dict, method: str, level_handles: list, require_key: bool = True):
        self.config = HierspecConfig.model_validate(config)
        self.model_name = self.config.name
        self.tokenizer = load_tokenizer(self.config.models.target)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.metrics = ServingMetrics(self.model_name)
        serving = self.config.serving
        self._api_key = os.environ.get(serving.api_key_env) or None
        if self._api_key is None:
            if require_key and not serving.allow_unauthenticated:
                raise RuntimeError(f"no API key in ${serving.api_key_env} in this replica's environment; set it on "
                                   "every node, or serving.allow_unauthenticated: true to serve without one")
            log.warning("no API key in $%s: every client that reaches this server may use it", serving.api_key_env)
        self._created = now()
        # Prompts are tokenized off the event loop (a long one takes seconds) on one thread: a tokenizer is not
        # safe to share between threads.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        # On CPU the levels share the machine's cores: a level's forward gets them all while no other level computes
        # (RemoteLevel.alone), and a request running alone no lookahead, which would take them from the
        # verification the request waits for.
        shared_cores = self.config.device == "cpu"
        levels = [await RemoteLevel.connect(handle) for handle in level_handles]  # waits for the levels
        if shared_cores:
            for level in levels:
                level.peers = levels
        self._saver = None
        if self.config.rounds_in_target(method):  # the target's replicas run the rounds and the drafter
            decoder = RemoteRounds(levels[-1])
        else:
            lookahead = (lambda: self.router.in_flight > 1) if shared_cores else True
            drafter, self._saver = serving_drafter(self.config.drafter, method, self.tokenizer)
            decoder = chain_decoder(self.config, method, levels, lambda: drafter, on_forward=self.metrics.on_forward,
                                    lookahead=serving.pipelined and lookahead)
        self.router = Router(decoder, serving.max_in_flight, serving.request_timeout_s, pipelined=serving.pipelined,
                             metrics=self.metrics)

    def __del__(self):
        """Serve's shutdown of the replica: what the model DB learned goes to its file."""
        if getattr(self, "_saver", None) is not None:
            self._saver.close()

    # --- helpers -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """Every route but /health needs the API key when one is configured, checked before the body."""
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self._api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed `max_body_bytes`: from its declared length
        before reading any of it, else while it streams in."""
        limit = self.config.serving.max_body_bytes
        too_large = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request, model: type[BaseModel]):
        self._authorize(request)
        body = await self._body(request)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(list(exc.errors())) from None

    async def _tokenize(self, function, *args) -> list[int]:
        """A request the router has no room for is refused before its prompt costs a tokenization."""
        with _overloaded_is_503():
            self.router.check_room()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, function, self.tokenizer, *args)

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    async def _start(self, body, prompt_ids: list[int], request_id: str) -> list:
        """One generation per choice (request ids: the response's id, then id-1, id-2, ...); 503 before any
        starts if the router has no room for them all."""
        self._check_model(body.model)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        window = self.router.decoder.target.context_window
        room = window - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context window is "
                                f"{window} tokens", param="messages", code="context_length_exceeded")
        limit = body.limit
        if limit is not None and limit > room:
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({limit}) exceeds this "
                                f"model's context window of {window} tokens", param="max_tokens",
                           code="context_length_exceeded")
        limit = limit or min(self.config.max_tokens, room)
        if body.choices > self.router.max_in_flight:
            raise APIError(400, f"n is {body.choices}; this server runs at most {self.router.max_in_flight} "
                                "generations at once", param="n", code="too_many_choices")
        with _overloaded_is_503():
            self.router.check_room(body.choices)
            return [self.router.start(prompt_ids, body.sampling(choice), limit, self.stop_ids,
                                      f"{request_id}-{choice}" if choice else request_id)
                    for choice in range(body.choices)]

    async def _pieces(self, generation, assembler: TextAssembler, arrival: float) -> AsyncIterator[str]:
        """Text deltas until the generation ends or a stop string appears."""
        rounds = self.router.rounds(generation, arrival)
        try:
            async for tokens in rounds:
                delta = assembler.add(tokens)
                if delta:
                    yield delta
                if assembler.stopped:
                    generation.finish_reason = "stop"
                    return
            tail = assembler.flush()
            if tail:
                yield tail
        finally:
            await rounds.aclose()

    async def _run(self, body, prompt_ids: list[int], chat: bool):
        arrival = time.perf_counter()
        rid, created = completion_id("chatcmpl" if chat else "cmpl"), now()
        generations = await self._start(body, prompt_ids, rid)
        if body.stream:
            choices = []
            for index, generation in enumerate(generations):
                assembler = TextAssembler(self.tokenizer, body.stop_strings)
                choices.append(StreamedChoice(index, self._pieces(generation, assembler, arrival), generation,
                                              assembler))
            return StreamingResponse(self._stream(body, rid, created, choices, len(prompt_ids), chat),
                                     media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._answer(body, generation, index, arrival, chat))
                 for index, generation in enumerate(generations)]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException as exc:
            for task in tasks:  # one choice failed (or the client left): the others stop too
                task.cancel()
            _log_other_failures(rid, exc, [task.exception() for task in tasks if task.done() and not task.cancelled()])
            if isinstance(exc, (RequestTimeout, LevelCrashed)):
                raise _failure(exc) from None
            raise
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": [choice for choice, _ in answers],
                "usage": usage(len(prompt_ids), sum(tokens for _, tokens in answers)),
                "hierspec_stats": generations[0].stats.as_dict()}

    async def _answer(self, body, generation, index: int, arrival: float, chat: bool) -> tuple[dict, int]:
        """One choice of a whole response, and the completion tokens it counts."""
        assembler = TextAssembler(self.tokenizer, body.stop_strings)
        text = "".join([piece async for piece in self._pieces(generation, assembler, arrival)])
        logprobs = None if generation.logprobs is None else await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, self._logprobs, generation, assembler, chat)  # a decode per token: off the loop
        choice = {"index": index, "logprobs": logprobs, "finish_reason": generation.finish_reason or "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return choice, _completion_tokens(generation, assembler)

    def _logprobs(self, generation, assembler: TextAssembler, chat: bool) -> dict:
        """The target's log-probabilities of the tokens the response holds (on the tokenizer's thread)."""
        used = _completion_tokens(generation, assembler)
        shape = chat_logprobs if chat else completion_logprobs
        return shape(self.tokenizer, generation.token_ids[:used], generation.logprobs[:used])

    async def _stream(self, body, rid: str, created: int, choices: list[StreamedChoice], prompt_tokens: int,
                      chat: bool) -> AsyncIterator[str]:
        """Server-sent chunks of every choice, each chunk one choice's (its `index`), in the order they are
        produced: the choices generate at once, as they do for a whole response. A choice that fails ends the
        stream (an error event, then [DONE]) and the others with it; a client that goes away ends them all."""
        events: asyncio.Queue = asyncio.Queue()  # chunks; a choice's end (None) or its failure (the exception)

        async def produce(choice: StreamedChoice) -> None:
            # whatever ends the choice is told, so the stream never waits on a choice that is gone (once it is
            # cancelled here, nobody reads its end any more)
            end: BaseException | None = RuntimeError(f"choice {choice.index} of request {rid} was interrupted")
            try:
                async for chunk in self._choice_chunks(rid, created, choice, chat):
                    events.put_nowait(chunk)
                end = None
            except Exception as exc:
                end = exc
            finally:
                events.put_nowait(end)

        tasks = [asyncio.ensure_future(produce(choice)) for choice in choices]
        event = None
        try:
            running = len(tasks)
            while running:
                event = await events.get()
                if event is None:
                    running -= 1
                elif isinstance(event, Exception):  # the 200 is sent: the client learns of it from an error event
                    if isinstance(event, (RequestTimeout, LevelCrashed)):
                        yield sse(_failure(event).body())
                    else:
                        log.error("request %s failed mid-stream", rid, exc_info=event)
                        yield sse(APIError(500, "internal error; the server logged it", type="internal_error").body())
                    yield sse("[DONE]")
                    return
                else:
                    yield sse(event)
        finally:
            for task in tasks:  # the stream ended early (a failure, a client gone): the other choices stop too
                task.cancel()
            if isinstance(event, Exception):
                unread = []
                while not events.empty():
                    unread.append(events.get_nowait())
                _log_other_failures(rid, event, unread)
        if body.include_usage:
            final = chat_chunk(rid, self.model_name, created, {}, None) if chat else \
                completion_chunk(rid, self.model_name, created, "", None)
            final["choices"] = []
            final["usage"] = usage(prompt_tokens, sum(_completion_tokens(choice.generation, choice.assembler)
                                                      for choice in choices))
            yield sse(final)
        yield sse("[DONE]")

    async def _choice_chunks(self, rid: str, created: int, choice: StreamedChoice, chat: bool) -> AsyncIterator[dict]:
        """One choice's chunks. With `logprobs`, each carries the entries of the tokens taken since the choice's
        previous chunk, so its chunks' entries together are the whole response's. Held-back text's tokens (a
        possible stop string's start) included: an entry can come before its token's text. A few tokens' decodes
        per chunk run on the event loop, as the text's do: the tokenizer's thread may be busy with a long prompt
        for seconds."""
        generation, assembler = choice.generation, choice.assembler

        def logprobs_upto(used: int) -> dict | None:
            if generation.logprobs is None or used <= choice.sent:
                return None
            token_ids, values = generation.token_ids[choice.sent:used], generation.logprobs[choice.sent:used]
            choice.sent = used
            if chat:
                return chat_logprobs(self.tokenizer, token_ids, values)
            shaped = completion_logprobs(self.tokenizer, token_ids, values, choice.offset)
            choice.offset = shaped["text_offset"][-1] + len(shaped["tokens"][-1])
            return shaped

        def chunk(text: str | None, reason: str | None, used: int = 0, first: bool = False) -> dict:
            logprobs = logprobs_upto(used)
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return chat_chunk(rid, self.model_name, created, delta, reason, logprobs, choice.index)
            return completion_chunk(rid, self.model_name, created, text or "", reason, logprobs, choice.index)

        if chat:
            yield chunk(None, None, first=True)
        async for piece in choice.pieces:
            yield chunk(piece, None, assembler.tokens_used)
        yield chunk(None, generation.finish_reason or "length", _completion_tokens(generation, assembler))

    # --- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._authorize(request)
        return api_schema(self.model_name)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self._authorize(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="hierspec")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request):
        self._authorize(request)
        return get_redoc_html(openapi_url="/openapi.json", title="hierspec")

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self._created,
                                            "owned_by": "hierspec"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._parse(request, ChatCompletionRequest)
        return await self._run(body, await self._tokenize(chat_prompt_ids, body.chat()), chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        return await self._run(body, await self._tokenize(text_prompt_ids, body.text()), chat=False)

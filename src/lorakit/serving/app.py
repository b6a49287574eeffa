"""The HTTP face of the engine: OpenAI's API as vLLM serves LoRA adapters, on FastAPI.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, and ``GET /health``. A request's ``model`` is the base model's
served name or an adapter's name.

Every failure is an OpenAI-style JSON error (``{"error": {"message", "type", "param", "code"}}``):
400 for a bad request (malformed JSON, a missing field, a prompt too long for the context), 404
for an unknown model, 500 if a step of the engine failed. None of them stops the server. A client
that goes away (mid-stream or while waiting) has its request aborted, which frees its slot.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.errors import LorakitError, ModelNotFoundError, ServingError
from lorakit.serving.engine import Engine, Event
from lorakit.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    error_body,
    now,
    sampling_params,
    sse,
)

__all__ = ["create_app"]

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine`` (which the caller starts and stops)."""
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None)
    served = engine.served
    tokenizer = served.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ModelNotFoundError)
    async def not_found(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return _error(404, str(exc), "model")

    @app.exception_handler(LorakitError)
    async def bad_request(_: Request, exc: LorakitError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(_EngineFailure)
    async def engine_failure(_: Request, exc: _EngineFailure) -> JSONResponse:
        return _error(500, f"generation failed: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [_model_card(served.name, served.created, served.name, None)]
        data += [_model_card(a.name, a.created, a.path, served.name) for a in engine.adapters()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = _completion_prompts(body.prompt, tokenizer)
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = sampling_params(body, max_tokens)
        run = _Run(engine, body.model, prompts, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, event: Event) -> dict[str, Any]:
            choice = {
                "index": index,
                "text": event.text,
                "logprobs": None,
                "finish_reason": event.finish_reason,
            }
            return run.envelope("text_completion", [choice])

        if body.stream:
            return _stream(request, run, chunk, include_usage, "text_completion")
        results = await run.collect(request)
        if results is None:
            return _error(499, "client closed the request")
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(results)
        ]
        return {**run.envelope("text_completion", choices), "usage": run.usage()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prompt = _chat_prompt(body, tokenizer)
        limit = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        max_tokens = max(1, served.context_length - len(prompt)) if limit is None else limit
        params = sampling_params(body, max_tokens)
        run = _Run(engine, body.model, [prompt], params, prefix="chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        started: set[int] = set()

        def chunk(index: int, event: Event) -> dict[str, Any]:
            delta: dict[str, Any] = (
                {"content": event.text} if event.text or event.finish_reason is None else {}
            )
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
            return run.envelope("chat.completion.chunk", [choice])

        if body.stream:
            return _stream(request, run, chunk, include_usage, "chat.completion.chunk")
        results = await run.collect(request)
        if results is None:
            return _error(499, "client closed the request")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(results)
        ]
        return {**run.envelope("chat.completion", choices), "usage": run.usage()}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


class _Run:
    """One HTTP request's engine requests (one per prompt), their events, and the response envelope."""

    def __init__(
        self, engine: Engine, model: str, prompts: list[list[int]], params: Any, prefix: str = "cmpl"
    ):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = now()
        self.model = model
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.request_ids: list[str] = []
        loop = asyncio.get_running_loop()
        try:  # submit every prompt now, so that a bad one is an error response, not a broken stream
            for index, prompt in enumerate(prompts):
                sink = self._sink(loop, index)
                self.request_ids.append(engine.submit(prompt, model, params, sink))
        except BaseException:
            self.abort()
            raise

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return sink

    def abort(self) -> None:
        for request_id in self.request_ids:
            self.engine.abort(request_id)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event of every prompt, as they come; on exit (done, failed or cancelled because the
        client left) anything unfinished is aborted."""
        remaining = len(self.request_ids)
        try:
            while remaining:
                index, event = await self.queue.get()
                if event.finish_reason is not None:
                    remaining -= 1
                    self.completion_tokens += event.completion_tokens
                yield index, event
        finally:
            self.abort()

    async def collect(self, request: Request) -> list[tuple[str, str]] | None:
        """Each prompt's (text, finish_reason); ``None`` if the client disconnected first."""

        async def gather() -> list[tuple[str, str]]:
            texts: dict[int, list[str]] = {i: [] for i in range(len(self.request_ids))}
            reasons: dict[int, str] = {}
            async for index, event in self.events():
                texts[index].append(event.text)
                if event.finish_reason is not None:
                    if event.finish_reason == "error":
                        raise _EngineFailure(str(event.error))
                    reasons[index] = event.finish_reason
            return [("".join(texts[i]), reasons[i]) for i in sorted(texts)]

        result = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self.abort()
        return result.result() if result.done() and not result.cancelled() else None

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


class _EngineFailure(Exception):
    """A step of the engine failed while running this request (HTTP 500)."""


def _stream(
    request: Request,
    run: _Run,
    chunk: Callable[[int, Event], dict[str, Any]],
    include_usage: bool,
    kind: str,
) -> StreamingResponse:
    """Server-sent events: a chunk per event, a usage chunk if asked, then ``data: [DONE]``. When the
    client disconnects, Starlette cancels this generator and :meth:`_Run.events` aborts the run."""

    async def body() -> AsyncIterator[str]:
        async for index, event in run.events():
            if event.finish_reason == "error":
                yield sse(error_body(f"generation failed: {event.error}", 500))
                continue
            if event.text or event.finish_reason is not None:
                yield sse(chunk(index, event))
        if include_usage:
            yield sse({**run.envelope(kind, []), "usage": run.usage()})
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _completion_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer(prompt).input_ids]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer(p).input_ids for p in prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise ServingError("prompt must be a non-empty string, list of strings, or list of token ids")


def _chat_prompt(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ServingError(
            f"model {body.model!r} has no chat template; use /v1/completions with a plain prompt"
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception
        raise ServingError(f"the chat template refused these messages: {exc}") from exc
    return list(tokenizer(str(text), add_special_tokens=False).input_ids)


def _model_card(name: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "lorakit",
        "root": root,
        "parent": parent,
    }


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: ``body.prompt: Field required; ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"

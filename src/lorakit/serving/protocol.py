"""The OpenAI API's request bodies, as vLLM and SGLang accept them for LoRA serving, and response pieces.

Fields lorakit does not implement and that would change the answer (``n > 1``, ``logprobs``,
``echo``, penalties, tools) are refused with a 400 that names them rather than silently ignored;
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import ServingError
from lorakit.serving.sampling import SamplingParams

__all__ = [
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "LoadLoraAdapterRequest",
    "UnloadLoraAdapterRequest",
    "error_body",
    "sampling_params",
    "sse",
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's extension

    def unsupported(self) -> list[str]:
        out = []
        if self.n != 1:
            out.append("n (only n=1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                out.append(name)
        return out


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings (one choice each), a list of
    token ids or a list of such lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo")
        if self.logprobs is not None:
            out.append("logprobs")
        if self.best_of not in (None, 1):
            out.append("best_of")
        if self.suffix:
            out.append("suffix")
        return out


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        other = sorted({p.type for p in self.content if p.type != "text"})
        if other:
            raise ServingError(f"only text content is supported; got content parts of type {other}")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``: the prompt is the tokenizer's chat template over ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    tools: list[Any] | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.logprobs:
            out.append("logprobs")
        if self.tools:
            out.append("tools")
        return out


class LoadLoraAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's endpoint): a name and an adapter folder or hub id."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def sampling_params(request: _Generation, max_tokens: int) -> SamplingParams:
    """The request's sampling fields, with OpenAI's defaults (temperature 1, top_p 1); raises
    :class:`ServingError` naming every unsupported field."""
    unsupported = request.unsupported()
    if unsupported:
        raise ServingError(f"unsupported request field(s): {', '.join(unsupported)}")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else float(request.temperature),
        top_p=1.0 if request.top_p is None else float(request.top_p),
        stop=tuple(stop),
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (what the ``openai`` client turns into ``BadRequestError`` & co.)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())

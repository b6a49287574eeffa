"""Continuous batching across adapters: one decoding loop, requests joining and leaving between steps.

One thread owns the model. Each turn of its loop:

1. runs pending adapter loads and unloads (between steps, so no step sees a half-changed model);
2. admits waiting requests into free slots (at most ``max_batch_size`` run at once) and *prefills*
   them together: one forward over their left-padded prompts, each row with its own adapter
   (lorakit's ``adapter_names``), which gives each its first token and its KV cache rows;
3. joins those rows to the running batch's cache (:class:`~lorakit.serving.batch_cache.BatchCache`);
4. *decodes* one token for every running request in one forward, again each row with its adapter;
5. drops finished, stopped and abandoned requests from the batch at once: no request waits for
   the longest one in its batch, and a freed slot is taken on the next turn.

A row's computation is the same as ``generate`` for that request alone with its adapter, up to the
rounding of batched products: greedy outputs agree (tests/serving/test_engine.py checks it token
for token). Callers on other threads talk to the loop through :meth:`Engine.submit` (tokens come
back through a callback, on the engine's thread) and :meth:`Engine.abort`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorakit.errors import ModelNotFoundError, ServingError
from lorakit.serving.batch_cache import BatchCache, check_cache
from lorakit.serving.models import AdapterInfo, ServedModel
from lorakit.serving.sampling import SamplingParams, StopText, next_tokens

__all__ = ["Engine", "Event", "Completion"]


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step produced for one request: new text (possibly empty while a multi-byte character
    or a possible stop string is pending), and at the end a ``finish_reason`` (``"stop"``,
    ``"length"``, ``"abort"`` or ``"error"``, with ``error`` saying why)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request: its text, its token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None


Sink = Callable[[Event], None]


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    row: str  # the adapter_names entry
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    generator: torch.Generator | None
    stop: StopText
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    aborted: bool = False


class Engine:
    """The continuous-batching loop over a :class:`ServedModel` (see the module docstring).

    ``max_batch_size``: requests decoded together at most (the slots); ``max_prefill_tokens``: the
    prompt tokens admitted per turn at most (a longer single prompt is admitted alone), so that new
    arrivals cannot stall the running batch for long. Use as a context manager, or
    :meth:`start` / :meth:`stop`.
    """

    def __init__(self, served: ServedModel, max_batch_size: int = 32, max_prefill_tokens: int = 2048) -> None:
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ServingError("max_batch_size and max_prefill_tokens must be at least 1")
        self.served = served
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # row i of self._batch is self._running[i]
        self._batch: BatchCache | None = None
        self._by_id: dict[str, _Request] = {}
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._retiring: dict[str, concurrent.futures.Future[None]] = {}
        self._accepting = set(served.served_names())  # names new requests may use
        self._eos = served.eos_ids()
        self._pad = _pad_id(served)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cache_checked = False
        self.decode_steps = 0  # forwards that decoded one token for every running request
        self.largest_batch = 0  # the most requests one such forward served

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish with ``"abort"`` every request still waiting or running, then end the loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], model: str, params: SamplingParams, sink: Sink) -> str:
        """Queue a request for ``model`` (the base's name or an adapter's); returns its id. Raises
        :class:`ServingError` (or :class:`ModelNotFoundError`) at once if it cannot be served."""
        ids = [int(t) for t in prompt]
        self._check_lengths(ids, params)
        with self._wake:
            if self._stopping or self._thread is None:
                raise ServingError("the engine is not running")
            if model not in self._accepting:
                raise ModelNotFoundError(
                    f"The model `{model}` does not exist. Served models: {sorted(self._accepting)}"
                )
            request = _Request(
                id=f"cmpl-{uuid.uuid4().hex}",
                row=self.served.row_name(model),
                prompt=ids,
                params=params,
                sink=sink,
                generator=params.generator(),
                stop=StopText(params.stop),
            )
            self._waiting.append(request)
            self._by_id[request.id] = request
            self._wake.notify()
        return request.id

    def _check_lengths(self, ids: list[int], params: SamplingParams) -> None:
        context = self.served.context_length
        vocab = int(getattr(self.served.base.config, "vocab_size", 0) or 0)
        if not ids:
            raise ServingError("the prompt is empty: give at least one token")
        if vocab and any(t < 0 or t >= vocab for t in ids):
            raise ServingError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if len(ids) >= context:
            raise ServingError(
                f"This model's maximum context length is {context} tokens. However, your prompt has "
                f"{len(ids)} tokens, which leaves no room for a completion. Please reduce the prompt."
            )
        if len(ids) + params.max_tokens > context:
            raise ServingError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} "
                f"in the completion). Please reduce the prompt or max_tokens."
            )

    def abort(self, request_id: str) -> None:
        """Give up a request (its client went away): its slot is free from the next step on."""
        with self._wake:
            request = self._by_id.get(request_id)
            if request is not None:
                request.aborted = True
                self._wake.notify()

    def generate(self, prompt: Sequence[int], model: str, params: SamplingParams) -> Completion:
        """Submit one request and wait for it (for scripts, tests and benchmarks)."""
        done = threading.Event()
        events: list[Event] = []

        def sink(event: Event) -> None:
            events.append(event)
            if event.finish_reason is not None:
                done.set()

        self.submit(prompt, model, params, sink)
        done.wait()
        last = events[-1]
        return Completion(
            text="".join(e.text for e in events),
            token_ids=[t for e in events for t in e.token_ids],
            finish_reason=str(last.finish_reason),
            prompt_tokens=last.prompt_tokens,
            error=last.error,
        )

    def load(self) -> dict[str, int]:
        """How many requests run and wait now."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load an adapter between two steps; blocks until it is served."""
        info: AdapterInfo = self._call(lambda: self.served.load_adapter(name, path)).result()
        with self._lock:
            self._accepting.add(name)
        return info

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for ``name`` at once; unload it when its last request is done
        (blocks until then)."""
        with self._wake:
            if name not in self.served.adapters or name not in self._accepting:
                raise ModelNotFoundError(f"The lora adapter '{name}' cannot be found.")
            self._accepting.discard(name)
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._retiring[name] = future
            self._wake.notify()
        future.result()

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [info for name, info in self.served.adapters.items() if name in self._accepting]

    def _call(self, function: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._wake:
            if self._thread is None:
                raise ServingError("the engine is not running")
            self._commands.append((function, future))
            self._wake.notify()
        return future

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._run_commands()  # outside inference mode: loaded weights must stay normal tensors
            with self._wake:
                if self._stopping:
                    break
                admitted = self._admit()
                if not admitted and not self._running and not self._commands and not self._retiring:
                    self._wake.wait()
                    continue
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    self._evict()
                    if self._running:
                        self._decode()
                    self._evict()
            except Exception as exc:  # a failed step fails its requests, never the server
                self._fail_all(admitted, f"{type(exc).__name__}: {exc}")
            self._retire_adapters()
        self._shutdown()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                function, future = self._commands.popleft()
            try:
                future.set_result(function())
            except Exception as exc:
                future.set_exception(exc)

    def _admit(self) -> list[_Request]:
        """Waiting requests for the free slots, within the prefill budget (called under the lock)."""
        admitted: list[_Request] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            if request.aborted:
                self._waiting.popleft()
                self._finish_silently(request, "abort")
                continue
            if admitted and len(request.prompt) > budget:
                break
            budget -= len(request.prompt)
            admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, group: list[_Request]) -> None:
        """One forward over the group's left-padded prompts; their first tokens and cache rows."""
        longest = max(len(r.prompt) for r in group)
        ids = torch.full((len(group), longest), self._pad, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, longest - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, longest - len(r.prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (G, L): 0.. per row, pads at 0
        cache = self.served.new_cache()
        logits = self.served.forward(ids, mask, positions, cache, [r.row for r in group])
        if not self._cache_checked:
            check_cache(cache)
            self._cache_checked = True
        part = BatchCache(cache, mask)
        if self._batch is None:
            self._batch = part
        else:
            self._batch.join(part)
        self._running.extend(group)
        self._emit(group, logits)

    def _decode(self) -> None:
        """One token for every running request, in one forward."""
        assert self._batch is not None
        rows = self._running
        positions = torch.tensor(self._batch.lengths(), dtype=torch.long).unsqueeze(1)  # (B, 1)
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long)  # (B, 1)
        mask = self._batch.grow()
        logits = self.served.forward(ids, mask, positions, self._batch.cache, [r.row for r in rows])
        self.decode_steps += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        self._emit(rows, logits)

    def _emit(self, rows: list[_Request], logits: torch.Tensor) -> None:
        tokens = next_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        decode = self.served.tokenizer.decode
        for request, token in zip(rows, tokens, strict=True):
            if request.finish_reason is not None:
                continue
            request.generated.append(token)
            ended = token in self._eos and not request.params.ignore_eos
            text_ids = request.generated[:-1] if ended else request.generated
            request.stop.update(decode(text_ids, skip_special_tokens=True))
            if ended or request.stop.stopped:
                request.finish_reason = "stop"
            elif len(request.generated) >= request.params.max_tokens:
                request.finish_reason = "length"
            final = request.finish_reason is not None
            self._send(request, request.stop.delta(final), (token,), request.finish_reason)

    def _evict(self) -> None:
        """Drop finished and abandoned rows from the batch; their slots are free."""
        with self._lock:
            keep = [i for i, r in enumerate(self._running) if r.finish_reason is None and not r.aborted]
            if len(keep) == len(self._running):
                return
            for r in self._running:
                if r.aborted and r.finish_reason is None:
                    self._finish_silently(r, "abort")
                elif r.finish_reason is not None:
                    self._by_id.pop(r.id, None)
            self._running = [self._running[i] for i in keep]
        if self._batch is not None:
            if keep:
                self._batch.keep(keep)
            else:
                self._batch = None

    def _send(
        self,
        request: _Request,
        text: str,
        tokens: tuple[int, ...],
        finish: str | None,
        error: str | None = None,
    ) -> None:
        event = Event(request.id, text, tokens, len(request.prompt), len(request.generated), finish, error)
        try:
            request.sink(event)
        except Exception:  # a client's callback must not stop the loop
            request.aborted = True

    def _finish_silently(self, request: _Request, reason: str, error: str | None = None) -> None:
        request.finish_reason, request.error = reason, error
        self._by_id.pop(request.id, None)
        self._send(request, "", (), reason, error)

    def _fail_all(self, admitted: list[_Request], error: str) -> None:
        with self._lock:
            for request in {*admitted, *self._running}:
                if request.finish_reason is None:
                    self._finish_silently(request, "error", error)
            self._running, self._batch = [], None

    def _retire_adapters(self) -> None:
        with self._lock:
            busy = {r.row for r in (*self._waiting, *self._running)}
            ready = [name for name in self._retiring if name not in busy]
        for name in ready:
            future = self._retiring.pop(name)
            try:
                self.served.unload_adapter(name)
                future.set_result(None)
            except Exception as exc:
                future.set_exception(exc)

    def _shutdown(self) -> None:
        with self._lock:
            for request in [*self._waiting, *self._running]:
                if request.finish_reason is None:
                    self._finish_silently(request, "abort")
            self._waiting.clear()
            self._running, self._batch = [], None
            for _function, future in self._commands:
                future.set_exception(ServingError("the engine stopped"))
            self._commands.clear()
            for future in self._retiring.values():
                future.set_exception(ServingError("the engine stopped"))
            self._retiring.clear()


def _pad_id(served: ServedModel) -> int:
    """A token id for padding positions (masked out; any valid id would do)."""
    for value in (getattr(served.tokenizer, "pad_token_id", None), *sorted(served.eos_ids())):
        if isinstance(value, int):
            return value
    return 0

"""The OpenAI-compatible server, driven by the real ``openai`` client over HTTP (uvicorn on a
background thread): completions, chat, streaming, mixed adapters at once, runtime load/unload,
every bad request, and clients that leave early."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
import pytest

from lorakit.serving import Engine, ServedModel, load_base
from lorakit.serving.server import background

pytestmark = pytest.mark.slow  # a server per module: seconds, not milliseconds

ADAPTERS = ("alpha", "beta", "gamma")
SLOTS = 4


@pytest.fixture(scope="module")
def server(served_files: Path) -> Iterator[tuple[str, Engine]]:
    model, tokenizer = load_base(str(served_files / "base"))
    engine = Engine(ServedModel(model, tokenizer, "tiny"), max_batch_size=SLOTS)
    with background(engine) as url:
        for name in ADAPTERS:
            engine.load_adapter(name, str(served_files / name))
        yield url, engine


@pytest.fixture(scope="module")
def client(server: tuple[str, Engine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _tokens(served_files: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(served_files / "base")(text).input_ids)


def _post_raw(url: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def _wait_idle(engine: Engine, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, engine.load()
        time.sleep(0.01)


def test_models_lists_the_base_and_each_adapter_with_its_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *ADAPTERS}
    assert models["tiny"].parent is None
    assert all(models[a].parent == "tiny" and models[a].root.endswith(a) for a in ADAPTERS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["tiny", *ADAPTERS])
def test_greedy_completion_is_generate_alone(
    client: openai.OpenAI, served_files: Path, alone: Any, model: str
) -> None:
    prompt = "hello world w1 w2 w3"
    result = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    expected = alone(_tokens(served_files, prompt), None if model == "tiny" else model, 12)
    from transformers import AutoTokenizer

    decoded = AutoTokenizer.from_pretrained(served_files / "base").decode(expected, skip_special_tokens=True)
    choice = result.choices[0]
    assert choice.text == decoded
    assert choice.finish_reason == ("stop" if expected[-1] == 3 else "length")
    assert result.model == model and result.object == "text_completion"
    assert result.usage is not None and result.usage.completion_tokens == len(expected)


def test_chat_uses_the_tokenizers_chat_template(
    client: openai.OpenAI, served_files: Path, alone: Any
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_files / "base")
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "hello w4"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    result = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    expected = alone(prompt, "beta", 10)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage is not None and result.usage.prompt_tokens == len(prompt)


def test_streamed_text_is_the_whole_text_and_ends_with_usage(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model="gamma", prompt="w5 w6", max_tokens=9, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_streamed_chat_sends_the_role_then_the_content(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="alpha", prompt="w5 w6", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    words = whole.choices[0].text.split()
    stop = words[3]
    cut = client.completions.create(model="alpha", prompt="w5 w6", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole.choices[0].text[: whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_reproduces(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="beta", prompt="w7", max_tokens=10, temperature=1.0, top_p=0.95, seed=11
    )
    assert (
        client.completions.create(**kwargs).choices[0].text
        == client.completions.create(**kwargs).choices[0].text
    )


def test_concurrent_requests_for_different_adapters_share_batches(
    client: openai.OpenAI, server: tuple[str, Engine], served_files: Path, alone: Any
) -> None:
    """Twelve clients at once over the base and three adapters (4 slots): each answer is generate()'s
    for that request alone, and the engine decoded several requests per forward."""
    engine = server[1]
    jobs = [(f"w{10 + i} hello w{i}", ["tiny", *ADAPTERS][i % 4], 6 + 2 * i) for i in range(12)]
    answers: dict[int, Any] = {}

    def ask(i: int) -> None:
        prompt, model, max_tokens = jobs[i]
        answers[i] = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert engine.largest_batch > 1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_files / "base")
    for i, (prompt, model, max_tokens) in enumerate(jobs):
        expected = alone(_tokens(served_files, prompt), None if model == "tiny" else model, max_tokens)
        assert answers[i].choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), jobs[i]


def test_several_prompts_in_one_request_get_one_choice_each(client: openai.OpenAI) -> None:
    single = [
        client.completions.create(model="alpha", prompt=p, max_tokens=5, temperature=0) for p in ("w1", "w2")
    ]
    both = client.completions.create(model="alpha", prompt=["w1", "w2"], max_tokens=5, temperature=0)
    assert [c.text for c in both.choices] == [s.choices[0].text for s in single]
    assert [c.index for c in both.choices] == [0, 1]


def test_adapters_load_and_unload_at_run_time(
    client: openai.OpenAI, server: tuple[str, Engine], served_files: Path
) -> None:
    url = server[0]
    loaded = client.post(
        "/load_lora_adapter",
        body={"lora_name": "late", "lora_path": str(served_files / "alpha")},
        cast_to=str,
    )
    assert "added successfully" in loaded
    assert "late" in {m.id for m in client.models.list().data}
    late = client.completions.create(model="late", prompt="w3 w4", max_tokens=6, temperature=0)
    same = client.completions.create(model="alpha", prompt="w3 w4", max_tokens=6, temperature=0)
    assert late.choices[0].text == same.choices[0].text  # the same adapter files under a second name
    status, body = _post_raw(
        url, "/v1/load_lora_adapter", json.dumps({"lora_name": "late", "lora_path": "x"}).encode()
    )
    assert status == 400 and "already been loaded" in body["error"]["message"]
    client.post("/unload_lora_adapter", body={"lora_name": "late"}, cast_to=str)
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="w3", max_tokens=2)
    status, body = _post_raw(url, "/v1/unload_lora_adapter", json.dumps({"lora_name": "late"}).encode())
    assert status == 404 and "cannot be found" in body["error"]["message"]
    status, body = _post_raw(
        url, "/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/nonexistent"}).encode()
    )
    assert status == 400 and "/nonexistent" in body["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(model="nope", prompt="w1"), openai.NotFoundError, "does not exist"),
        (
            dict(model="alpha", prompt="w1", max_tokens=100),
            openai.BadRequestError,
            "maximum context length is 64",
        ),
        (dict(model="alpha", prompt="w1 " * 64), openai.BadRequestError, "maximum context length is 64"),
        (dict(model="alpha", prompt="w1", temperature=5), openai.BadRequestError, "temperature"),
        (dict(model="alpha", prompt="w1", n=2), openai.BadRequestError, "only n=1"),
        (dict(model="alpha", prompt="w1", logprobs=2), openai.BadRequestError, "logprobs"),
        (dict(model="alpha", prompt=[]), openai.BadRequestError, "prompt"),
        (dict(model="alpha", prompt=[100_000]), openai.BadRequestError, "vocabulary"),
    ],
)
def test_bad_completions_get_openai_errors(
    client: openai.OpenAI, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        client.completions.create(**kwargs)
    body = info.value.body  # type: ignore[attr-defined]
    assert set(body) >= {"message", "type", "param", "code"}


def test_bad_chat_requests_get_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError, match="only text content"):
        client.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "w1 " * 70}])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "JSON"),
        (b'{"model": "alpha"}', "prompt: Field required"),
        (b'{"model": "alpha", "prompt": "w1", "max_tokens": "many"}', "max_tokens"),
        (b"[1, 2]", "body"),
    ],
)
def test_malformed_bodies_get_a_400_json_error(server: tuple[str, Engine], body: bytes, message: str) -> None:
    status, data = _post_raw(server[0], "/v1/completions", body)
    assert status == 400
    assert data["error"]["type"] == "invalid_request_error" and message in data["error"]["message"]


def test_the_server_still_serves_after_every_bad_request(
    client: openai.OpenAI, server: tuple[str, Engine]
) -> None:
    assert client.completions.create(model="alpha", prompt="w1", max_tokens=2, temperature=0).choices[0].text
    _wait_idle(server[1])


def _open_stream(
    url: str, body: dict[str, Any]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    return conn, conn.getresponse()


def test_a_client_that_leaves_mid_stream_frees_its_slot(server: tuple[str, Engine]) -> None:
    url, engine = server
    _wait_idle(engine)
    steps = engine.decode_steps
    body = {
        "model": "alpha",
        "prompt": "w1",
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    conn, response = _open_stream(url, body)
    assert response.readline().startswith(b"data: ")  # the first token arrived: the request runs
    conn.sock.close()  # type: ignore[union-attr]  # the client goes away without reading the rest
    conn.close()
    _wait_idle(engine)
    assert engine.decode_steps - steps < 55  # stopped well before its 60 tokens


def test_a_client_that_leaves_before_the_answer_frees_its_slot(server: tuple[str, Engine]) -> None:
    url, engine = server
    _wait_idle(engine)
    steps = engine.decode_steps
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {"model": "beta", "prompt": "w1", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 30
    while engine.load()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    _wait_idle(engine)
    assert engine.decode_steps - steps < 55

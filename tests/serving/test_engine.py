"""The continuous-batching engine: every greedy request equals ``generate`` alone with its adapter,
whatever joins or leaves the batch around it; seeds reproduce sampling; adapters load and unload
between steps; a failing request never stops the loop."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import ModelNotFoundError, ServingError
from lorakit.serving import Engine, SamplingParams, ServedModel, load_base

ADAPTERS = ("alpha", "beta", "gamma")


def _engine(files: Path, max_batch_size: int, adapters: tuple[str, ...] = ADAPTERS) -> Engine:
    model, tokenizer = load_base(str(files / "base"))
    engine = Engine(ServedModel(model, tokenizer, "tiny"), max_batch_size=max_batch_size).start()
    for name in adapters:
        engine.load_adapter(name, str(files / name))
    return engine


def _run_concurrently(engine: Engine, jobs: list[tuple[list[int], str, SamplingParams]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        results[i] = engine.generate(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.slow
def test_greedy_requests_equal_generate_alone_while_the_batch_changes(served_files: Path, alone: Any) -> None:
    """12 requests over the base and 3 adapters, prompts of 1–20 tokens, 1–30 new tokens, 4 slots:
    requests join as others finish; each one's tokens are generate()'s for it alone."""
    rng = random.Random(0)
    jobs = []
    for _ in range(12):
        prompt = [rng.randrange(4, 64) for _ in range(rng.randint(1, 20))]
        model = rng.choice(["tiny", *ADAPTERS])
        jobs.append((prompt, model, SamplingParams(max_tokens=rng.randint(1, 30), temperature=0)))
    engine = _engine(served_files, max_batch_size=4)
    try:
        results = _run_concurrently(engine, jobs)
    finally:
        engine.stop()
    assert engine.largest_batch == 4  # requests were decoded together, up to the slot count
    for (prompt, model, params), result in zip(jobs, results, strict=True):
        adapter = None if model == "tiny" else model
        assert result.error is None
        assert result.token_ids == alone(prompt, adapter, params.max_tokens), (model, prompt)
        assert result.finish_reason == ("stop" if result.token_ids[-1] == 3 else "length")


@pytest.mark.slow
def test_sampling_with_a_seed_does_not_depend_on_the_batch(served_files: Path) -> None:
    engine = _engine(served_files, max_batch_size=8)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    try:
        single = engine.generate([5, 6, 7], "alpha", params)
        crowd = _run_concurrently(engine, [([5, 6, 7], "alpha", params)] + [([9, 10], "beta", params)] * 5)
        other_seed = engine.generate([5, 6, 7], "alpha", SamplingParams(**{**params.__dict__, "seed": 8}))
    finally:
        engine.stop()
    assert crowd[0].token_ids == single.token_ids
    assert other_seed.token_ids != single.token_ids


@pytest.mark.slow
def test_unload_waits_for_the_adapters_requests_and_refuses_new_ones(served_files: Path) -> None:
    engine = _engine(served_files, max_batch_size=2, adapters=("alpha",))
    try:
        events: list[Any] = []
        long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        engine.submit([5, 6], "alpha", long, events.append)  # the sink runs on the engine's thread
        while engine.load()["running"] == 0:
            pass
        engine.unload_adapter("alpha")  # returns once the running request is done
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 40
        with pytest.raises(ModelNotFoundError):
            engine.submit([5], "alpha", long, lambda e: None)
        assert engine.served.peft is None  # the last adapter gone: the plain base model again
        assert engine.generate([5, 6], "tiny", SamplingParams(max_tokens=2, temperature=0)).token_ids
    finally:
        engine.stop()


@pytest.mark.slow
def test_bad_requests_are_refused_before_they_queue(served_files: Path) -> None:
    engine = _engine(served_files, max_batch_size=2, adapters=())
    try:
        for prompt, params, message in [
            ([], SamplingParams(), "empty"),
            ([5] * 64, SamplingParams(), "maximum context length is 64"),
            ([5] * 60, SamplingParams(max_tokens=5), "65 tokens"),
            ([10_000], SamplingParams(), "outside the vocabulary"),
        ]:
            with pytest.raises(ServingError, match=message):
                engine.submit(prompt, "tiny", params, lambda e: None)
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            engine.submit([5], "nope", SamplingParams(), lambda e: None)
        assert engine.load() == {"running": 0, "waiting": 0}
    finally:
        engine.stop()


@pytest.mark.slow
def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    served_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(served_files, max_batch_size=2, adapters=())
    try:
        real = engine.served.forward
        calls = {"n": 0}

        def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.served, "forward", flaky)
        failed = engine.generate([5, 6], "tiny", SamplingParams(max_tokens=3, temperature=0))
        assert failed.finish_reason == "error" and "simulated failure" in str(failed.error)
        ok = engine.generate([5, 6], "tiny", SamplingParams(max_tokens=3, temperature=0))
        assert ok.finish_reason == "length" and len(ok.token_ids) == 3
    finally:
        engine.stop()


def test_sampling_params_name_every_problem() -> None:
    with pytest.raises(ServingError) as info:
        SamplingParams(max_tokens=0, temperature=3.0, top_p=0.0, stop=("",))
    message = str(info.value)
    for field in ("max_tokens", "temperature", "top_p", "stop"):
        assert field in message

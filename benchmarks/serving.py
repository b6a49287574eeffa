"""Throughput of ``lorakit serve`` with many adapters, against what a PEFT user does without a server.

    python -m benchmarks.serving        # writes benchmarks/serving_results.{json,md,png}

32 concurrent requests spread over 4 adapters (r=8, α=16 on q_proj/v_proj: the smollm2-trec
preset's shape, random B so that each adapter changes the text) on SmolLM2-135M-Instruct, TREC
questions as prompts, greedy, 16/24/32/48 new tokens (cycling; the end-of-sequence token is
ignored so that every run does the same work). Four ways to serve the same requests:

- **serve, 4 adapters mixed**: ``lorakit serve`` in its own process, the 32 requests sent at once
  by the ``openai`` client (streaming, to time the first token);
- **serve, all on one adapter**: the same, every request naming adapter 0 (the goal: mixing
  adapters costs under 10% of this throughput);
- **set_adapter, one adapter at a time**: in one process, ``set_adapter(name)`` then one
  left-padded ``generate`` batch per adapter (each batch runs as long as its longest request);
- **one request at a time**: ``set_adapter`` and ``generate`` per request.

Tokens/s counts the tokens the requests asked for, over the wall time from the first request to the
last answer. One run, ratios to the mixed server; these machines are shared, so absolute times
say little. The mixed and one-adapter server runs alternate (twice each) and their medians are used.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REQUESTS = 32
ADAPTERS = 4
LENGTHS = (16, 24, 32, 48)
THREADS = 1  # on a shared machine one thread per process beats two that wait on each other


def requests_for(prompts: list[str], adapters: list[str], mixed: bool) -> list[tuple[str, str, int]]:
    """(prompt, adapter, max_tokens) for every request: adapters round-robin (or all the first)."""
    return [
        (
            prompts[i % len(prompts)],
            adapters[i % len(adapters)] if mixed else adapters[0],
            LENGTHS[i % len(LENGTHS)],
        )
        for i in range(REQUESTS)
    ]


def make_adapters(model_dir: str, folder: Path, count: int = ADAPTERS) -> list[str]:
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, TaskType, get_peft_model

    names = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(i)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type=TaskType.CAUSAL_LM,
        )
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, 0.02)
        model.save_pretrained(folder / f"a{i}")
        names.append(f"a{i}")
    return names


# -- the server ------------------------------------------------------------------------------------
def start_server(model_dir: str, folder: Path, adapters: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "lorakit.cli",
        "serve",
        "--model",
        model_dir,
        "--served-model-name",
        "base",
    ]
    command += ["--port", str(port), "--max-num-seqs", str(REQUESTS), "--threads", str(THREADS)]
    for name in adapters:
        command += ["--adapter", f"{name}={folder / name}"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError as exc:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log = server.stderr.read().decode()[-2000:] if server.stderr else ""
                raise RuntimeError(f"lorakit serve did not start: {log}") from exc
            time.sleep(0.5)


async def _client_run(url: str, jobs: list[tuple[str, str, int]]) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=1200)
    start = time.perf_counter()

    async def one(prompt: str, model: str, max_tokens: int) -> tuple[float, float, str, int]:
        first, text, tokens = None, [], 0
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].text)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        done = time.perf_counter()
        return (first or done) - start, done - start, "".join(text), tokens

    answers = await asyncio.gather(*(one(*job) for job in jobs))
    wall = time.perf_counter() - start
    await client.close()
    return _summary(
        wall,
        [a[3] for a in answers],
        [a[1] for a in answers],
        [a[0] for a in answers],
        [a[2] for a in answers],
    )


def _summary(
    wall: float, tokens: list[int], latency: list[float], ttft: list[float] | None, texts: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "wall_s": wall,
        "tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "latency_mean_s": statistics.mean(latency),
        "texts": texts,
    }
    if ttft is not None:
        q = statistics.quantiles(ttft, n=10)
        out.update(ttft_p50_s=statistics.median(ttft), ttft_p90_s=q[-1], ttft_max_s=max(ttft))
    return out


def serve_runs(
    model_dir: str, folder: Path, adapters: list[str], prompts: list[str], port: int
) -> dict[str, Any]:
    server = start_server(model_dir, folder, adapters, port)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(_client_run(url, requests_for(prompts, adapters, True)[:4]))  # warm-up
        runs: dict[str, list[dict[str, Any]]] = {"mixed": [], "single": []}
        for kind in ("mixed", "single", "mixed", "single"):
            print(f"  serve: {kind}", flush=True)
            runs[kind].append(asyncio.run(_client_run(url, requests_for(prompts, adapters, kind == "mixed"))))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {kind: _median_run(r) for kind, r in runs.items()}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]  # the median (upper) run
    return {**best, "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


# -- without a server: what a PEFT user does -----------------------------------------------------
def _peft_model(model_dir: str, folder: Path, adapters: list[str]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, folder / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval(), tokenizer


def _generate(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> list[list[int]]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    return out[:, batch.input_ids.shape[1] :].tolist()


def set_adapter_run(model: Any, tokenizer: Any, jobs: list[tuple[str, str, int]]) -> dict[str, Any]:
    """One adapter at a time: one padded generate() batch per adapter, as long as its longest request."""
    start, latency, texts = time.perf_counter(), [0.0] * len(jobs), [""] * len(jobs)
    for name in dict.fromkeys(a for _, a, _ in jobs):
        rows = [i for i, job in enumerate(jobs) if job[1] == name]
        model.set_adapter(name)
        outputs = _generate(model, tokenizer, [jobs[i][0] for i in rows], max(jobs[i][2] for i in rows))
        done = time.perf_counter() - start
        for i, tokens in zip(rows, outputs, strict=True):
            latency[i], texts[i] = done, tokenizer.decode(tokens[: jobs[i][2]], skip_special_tokens=True)
    return _summary(time.perf_counter() - start, [j[2] for j in jobs], latency, None, texts)


def one_at_a_time_run(model: Any, tokenizer: Any, jobs: list[tuple[str, str, int]]) -> dict[str, Any]:
    start, latency, texts = time.perf_counter(), [], []
    for prompt, name, max_tokens in jobs:
        model.set_adapter(name)
        texts.append(
            tokenizer.decode(_generate(model, tokenizer, [prompt], max_tokens)[0], skip_special_tokens=True)
        )
        latency.append(time.perf_counter() - start)
    return _summary(time.perf_counter() - start, [j[2] for j in jobs], latency, None, texts)


def measure(model_dir: str, prompts: list[str], workdir: Path, port: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    adapters = make_adapters(model_dir, workdir)
    served = serve_runs(model_dir, workdir, adapters, prompts, port)
    model, tokenizer = _peft_model(model_dir, workdir, adapters)
    jobs = requests_for(prompts, adapters, True)
    _generate(model, tokenizer, prompts[:2], 2)  # warm-up
    print("  set_adapter, one adapter at a time", flush=True)
    grouped = set_adapter_run(model, tokenizer, jobs)
    print("  one request at a time", flush=True)
    single = one_at_a_time_run(model, tokenizer, jobs)
    same = sum(a == b for a, b in zip(served["mixed"]["texts"], single["texts"], strict=True))
    return {
        "machine": {
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "threads": THREADS,
        },
        "requests": REQUESTS,
        "adapters": ADAPTERS,
        "lengths": list(LENGTHS),
        "runs": {
            "serve_mixed": served["mixed"],
            "serve_one_adapter": served["single"],
            "set_adapter_batches": grouped,
            "one_request_at_a_time": single,
        },
        "greedy_texts_equal_generate_alone": same,
    }


ROWS = [
    ("serve_mixed", "**lorakit serve**, 4 adapters mixed"),
    ("serve_one_adapter", "lorakit serve, all on one adapter"),
    ("set_adapter_batches", "`set_adapter`, one adapter at a time (a generate batch each)"),
    ("one_request_at_a_time", "one request at a time (`set_adapter` + generate)"),
]


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    mixed = runs["serve_mixed"]["tokens_per_s"]
    lines = [
        f"{results['requests']} concurrent requests over {results['adapters']} adapters, "
        f"SmolLM2-135M-Instruct, greedy, {'/'.join(map(str, results['lengths']))} new tokens; "
        f"{results['machine']['cores']} cores, "
        f"{results['machine']['threads']} torch threads. Ratios from one run.",
        "",
        "| how the requests are served | tokens/s vs serve mixed | mean latency vs serve mixed "
        "| time to first token p50 / p90 |",
        "|---|---|---|---|",
    ]
    for key, label in ROWS:
        r = runs[key]
        ttft = f"{r['ttft_p50_s']:.2f} s / {r['ttft_p90_s']:.2f} s" if "ttft_p50_s" in r else "—"
        lines.append(
            f"| {label} | {r['tokens_per_s'] / mixed:.2f} | "
            f"{r['latency_mean_s'] / runs['serve_mixed']['latency_mean_s']:.2f} | {ttft} |"
        )
    one = runs["serve_one_adapter"]["tokens_per_s"]
    lines += [
        "",
        f"Mixed adapters / one adapter: **{mixed / one:.2f}** of the throughput (goal ≥ 0.90). "
        f"Serve mixed: {mixed:.0f} tokens/s. Greedy texts equal to `generate` alone: "
        f"{results['greedy_texts_equal_generate_alone']}/{results['requests']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = ["serve\nmixed", "serve\none adapter", "set_adapter\nbatches", "one request\nat a time"]
    values = [runs[k]["tokens_per_s"] for k, _ in ROWS]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, values, color=["#2a7", "#7c9", "#888", "#bbb"])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value / values[0]:.2f}×", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom"
        )
    ax.set_ylabel("tokens/s (one run)")
    ax.set_title(f"{results['requests']} requests over {results['adapters']} adapters, SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trec_prompts() -> list[str]:
    from lorakit.cli.presets import trec_rows

    return [row["text"] for row in trec_rows()[:REQUESTS]]


def main() -> None:
    from lorakit.cli.presets import smollm_path

    with tempfile.TemporaryDirectory() as tmp:
        results = measure(smollm_path(), trec_prompts(), Path(tmp), port=18765)
    slim = {
        **results,
        "runs": {k: {kk: v for kk, v in r.items() if kk != "texts"} for k, r in results["runs"].items()},
    }
    (HERE / "serving_results.json").write_text(json.dumps(slim, indent=2) + "\n", encoding="utf-8")
    (HERE / "serving_results.md").write_text(table(results), encoding="utf-8")
    plot(results, HERE / "serving_results.png")
    print(table(results))


if __name__ == "__main__":
    main()

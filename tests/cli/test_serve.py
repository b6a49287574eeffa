"""``lorakit serve``: what it serves by default, its flags, and a real run of the command."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorakit.cli.errors import CliError
from lorakit.cli.main import build_parser
from lorakit.cli.serve import PRESET, PRESET_NAME, plan


def _args(*argv: str) -> Any:
    return build_parser().parse_args(["serve", *argv]).serve


def test_no_model_flag_serves_the_presets_base_with_the_adapter_train_wrote(tmp_path: Path) -> None:
    assert plan(_args(), cwd=tmp_path) == (None, PRESET_NAME, [])
    trained = tmp_path / "runs" / PRESET
    trained.mkdir(parents=True)
    (trained / "adapter_config.json").write_text("{}")
    assert plan(_args(), cwd=tmp_path) == (None, PRESET_NAME, [(PRESET, str(trained))])


def test_adapters_are_named_or_take_their_folders_name() -> None:
    model, name, adapters = plan(_args("--model", "m", "--adapter", "a=x/one", "--adapter", "x/two/"))
    assert (model, name) == ("m", "m")
    assert adapters == [("a", "x/one"), ("two", "x/two/")]
    assert plan(_args("--model", "m", "--served-model-name", "base"))[1] == "base"


def test_repeated_adapter_names_are_refused() -> None:
    with pytest.raises(CliError, match="repeated: a"):
        plan(_args("--model", "m", "--adapter", "a=x", "--adapter", "a=y"))


@pytest.mark.slow
def test_the_command_serves_until_interrupted(
    cli_files: Path, tmp_path: Path, free_port: Callable[[], int], subprocess_env: dict[str, str]
) -> None:
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(cli_files / "llama")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    port = free_port()
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--model", str(cli_files / "llama")]
    command += [
        "--served-model-name",
        "tiny",
        "--adapter",
        f"mine={tmp_path / 'adapter'}",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "lorakit serve did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "mine"]
        answer = client.completions.create(model="mine", prompt="the film was", max_tokens=3, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
    assert server.returncode in (0, 130)  # uvicorn shuts down, then re-raises Ctrl-C: the CLI's 130
    assert "serving 'tiny'" in out and "with adapters: mine" in out

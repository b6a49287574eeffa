"""QLoRA under DDP on gloo (2 processes): an NF4 base trains, both ranks hold the same adapter, it
equals a single-process run on the whole batch, and rank 0's saved file reloads to the same tensors.

Tolerance of the single-process comparison: DDP averages the two ranks' gradients (one float32
rounding per element) before each of 3 SGD steps at lr 0.5, so the adapters may differ by a few
float32 ulps of the updates: 1e-5 absolute on O(0.1) weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from zoo import quantized as Q

pytest.importorskip("bitsandbytes")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, subprocess_env, free_port) -> dict:
    from zoo import llama

    out = tmp_path_factory.mktemp("qlora-ddp")
    folder = Q.saved("llama", llama(vocab=96))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(Path(__file__).parent / "quantized_worker.py"),
        str(folder),
        str(out),
    ]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=170)
    if done.returncode != 0 or not (out / "ddp.json").exists():
        pytest.fail(f"QLoRA DDP launch failed (exit {done.returncode}):\n{done.stderr[-5000:]}")
    return json.loads((out / "ddp.json").read_text())


def test_ranks_hold_the_same_adapter(ddp_results: dict) -> None:
    assert ddp_results["identical_on_ranks"] is True


def test_ddp_equals_one_process_on_the_whole_batch(ddp_results: dict) -> None:
    assert ddp_results["moved"] > 1e-3
    assert ddp_results["max_diff_single_process"] <= 1e-5


def test_rank_zero_saved_the_trained_adapter(ddp_results: dict) -> None:
    assert ddp_results["saved_equals_trained"] is True


def test_fsdp2_on_a_quantized_base_is_refused_at_the_first_forward(free_port) -> None:
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import lorakit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    try:
        model = lorakit.get_peft_model(
            Q.quantized("llama", "nf4"), lorakit.LoraConfig(target_modules=["q_proj"])
        )
        fully_shard(model)
        with pytest.raises(lorakit.AdapterError, match="was replaced by a plain"):
            model(input_ids=torch.tensor([[3, 4, 5]]))
    finally:
        dist.destroy_process_group()

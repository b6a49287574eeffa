"""lorakit under real torch.distributed (gloo on 127.0.0.1, 2 processes): DDP, FSDP2, FSDP1 and
DeepSpeed ZeRO-2/3, unmodified.

One ``torchrun`` launch per engine runs all of that engine's scenarios (``distributed/worker.py``);
the tests here read its results, one test per check (parametrized by scenario):

1. the gathered adapter is bit-identical on every rank;
2. it equals a single-process run on the concatenated batch (1e-5), moved (> 1e-3), and the frozen
   base weights changed by exactly 0;
3. loading into the wrapped model (rank 0 reads, broadcasts) arrives whole on every rank;
   rank 0's saved adapter holds exactly the expected tensors and shapes, reloads into a plain model
   with the same weights and logits (1e-6), and its merge gives the unmerged logits (1e-5);
4. negative controls fail as they must (no gradient sync, rank-dependent init, injection after
   wrapping, naive sharded saves and merges, a save called on rank 0 alone).

A hanging rank dumps its stacks and exits (faulthandler in the worker); each test has a 120 s limit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# slow too: whichever test asks an engine first waits for its launch (10-25 s)
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(120)]

WORKER = Path(__file__).parent / "worker.py"
SCENARIOS = {
    "ddp": ["ddp", "ddp_accum", "ddp_reentrant_ckpt"],
    "fsdp2": ["fsdp2", "fsdp2_accum", "fsdp2_ckpt"],
    "fsdp1": ["fsdp1"],
    "zero": ["zero2", "zero3"],
}
CONTROLS = {
    "ddp": (
        "controls",
        [
            "no_sync_detected",
            "rank_init_detected",
            "rank_init_fixed_by_broadcast",
            "inject_after_ddp_refused",
            "reentrant_find_unused_refused",
        ],
    ),
    "fsdp2": (
        "controls",
        [
            "inject_after_shard_refused",
            "naive_save_refused",
            "naive_merge_refused",
            "distributed_merge_refused",
        ],
    ),
    "fsdp1": ("controls", ["naive_save_refused", "inject_after_wrap_refused", "flat_params_refused"]),
    "zero": ("zero3", ["naive_save_refused", "naive_merge_refused", "inject_after_wrap_refused"]),
}

Launch = Callable[[str], dict[str, Any]]  # engine -> its results (the launch fixture)


def _launch(engine: str, out: Path, env: dict[str, str], port: int) -> dict[str, Any]:
    """Run the engine's worker under torchrun (2 processes); its JSON results."""
    if engine == "zero" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[dev]')")
    env = {
        **env,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "LORAKIT_TEST_HANG_LIMIT": "100",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(WORKER),
        engine,
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=115)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        _, stderr = proc.communicate()
        pytest.fail(f"{engine} launch did not finish in 115 s; rank stacks (faulthandler):\n{stderr[-6000:]}")
    result_file = out / f"{engine}.json"
    if proc.returncode != 0 or not result_file.exists():
        pytest.fail(f"{engine} launch failed (exit {proc.returncode}):\n{stderr[-6000:]}")
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def launch(
    tmp_path_factory: pytest.TempPathFactory, subprocess_env: dict[str, str], free_port: Callable[[], int]
) -> Launch:
    """``launch(engine)``: the engine's results, from one torchrun launch per engine and module."""
    out = tmp_path_factory.mktemp("distributed")
    cache: dict[str, dict[str, Any]] = {}

    def results(engine: str) -> dict[str, Any]:
        if engine not in cache:
            cache[engine] = _launch(engine, out, subprocess_env, free_port())
        return cache[engine]

    return results


# -- checks 1-3 on every trained scenario ---------------------------------------------------------------
TRAINED = pytest.mark.parametrize(
    ("engine", "scenario"), [(e, s) for e, names in SCENARIOS.items() for s in names]
)


def _trained(launch: Launch, engine: str, scenario: str) -> dict[str, Any]:
    """The scenario's results, which must hold no error."""
    results = launch(engine)[scenario]
    assert "error" not in results, results.get("error")
    return results


@TRAINED
def test_gathered_adapter_is_identical_on_every_rank(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["identical_on_ranks"]
    assert value is True, "gathered adapters differ across ranks"


@TRAINED
def test_adapter_matches_the_single_process_reference(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["matches_reference"]
    assert value <= 1e-5, f"adapter differs from the single-process run by {value}"


@TRAINED
def test_adapter_moved(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["adapter_moved"]
    assert value > 1e-3, f"adapter moved only {value}"


@TRAINED
def test_frozen_base_is_unchanged(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["base_unchanged"]
    assert value == 0.0, f"frozen base weights changed by {value}"


@TRAINED
def test_broadcast_load_arrives_whole_on_every_rank(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["load_broadcast"]
    assert value is True, "a broadcast load into the wrapped model did not arrive whole on every rank"


@TRAINED
def test_wrapped_names_map_back_to_the_injection_record(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["names_map_back"]
    assert value is True, "wrapped parameter names do not map back to the names recorded at injection"


@TRAINED
def test_saved_adapter_holds_the_expected_keys_and_shapes(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["saved_keys_and_shapes"]
    assert value is True, "saved tensors/shapes differ from the expected adapter"


@TRAINED
def test_saved_adapter_reloads_the_same_weights(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["reload_weights"]
    assert value == 0.0, f"reloaded weights differ by {value}"


@TRAINED
def test_saved_adapter_reloads_to_the_same_logits(engine: str, scenario: str, launch: Launch) -> None:
    value = _trained(launch, engine, scenario)["reload_logits"]
    assert value <= 1e-6, f"reloaded logits differ from the engine's by {value}"


@TRAINED
def test_merged_reloaded_adapter_gives_the_unmerged_logits(
    engine: str, scenario: str, launch: Launch
) -> None:
    value = _trained(launch, engine, scenario)["merge_logits"]
    assert value <= 1e-5, f"merged logits differ from unmerged by {value}"


# -- check 4: negative controls, and single checks ------------------------------------------------------
@pytest.mark.parametrize(("engine", "check"), [(e, c) for e, (_, checks) in CONTROLS.items() for c in checks])
def test_negative_control(engine: str, check: str, launch: Launch) -> None:
    """Each control is a misuse (or PEFT's failure mode) that lorakit must detect or refuse."""
    scenario, _ = CONTROLS[engine]
    results = launch(engine)[scenario]
    assert "error" not in results, results.get("error")
    assert str(results[check]).startswith("ok"), results[check]


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_uneven_shards_roundtrip(engine: str, launch: Launch) -> None:
    """r=3 splits rows unevenly over 2 ranks: gathering and broadcast loading stay exact."""
    result = launch(engine)["controls"]["uneven_shards_roundtrip"]
    assert result == "ok", result


def test_no_gradient_sync_really_diverges(launch: Launch) -> None:
    """The no-sync control is meaningful: without DDP each rank's adapter is far from the reference."""
    off = launch("ddp")["controls"]["no_sync_off_reference"]
    assert min(off) > 1e-3


def test_zero3_merge_gathers(launch: Launch) -> None:
    """Under ZeRO-3 lorakit.distributed.merge_adapter really merges (the LoRA branch is skipped and
    logits still match) and unmerges bit for bit."""
    results = launch("zero")["zero3"]
    assert results["zero3_merged_layers"] == 4
    assert results["zero3_merge_logits"] <= 1e-5
    assert results["zero3_unmerge_logits"] == 0.0


def test_eva_gathers_every_ranks_layer_inputs(launch: Launch) -> None:
    """EVA in a process group: each rank sees half of every batch, every rank gets the components
    and ranks of one process that sees all of it (same rows, same order: equal bits)."""
    results = launch("ddp")["eva_gather"]
    assert "error" not in results, results.get("error")
    assert results["eva_identical_on_ranks"] is True
    assert results["eva_matches_reference"] == 0.0


def test_rank0_only_save_fails_instead_of_hanging(launch: Launch) -> None:
    results = launch("fsdp2")["rank0_only_save"]
    assert str(results["rank0_only_save_fails"]).startswith("ok"), results
    assert results["seconds"] < 30


def test_ddp_trains_and_saves_lora_on_experts(launch: Launch) -> None:
    """target_parameters under DDP: the experts' factors (PEFT's stacked layout) synchronise like any
    parameter, match one process on the whole batch, and the file rank 0 saves loads in lorakit and
    in PEFT to the same logits (1e-6: the same weights, the same float32 sums up to association)."""
    results = launch("ddp")["moe_experts"]
    assert "error" not in results, results.get("error")
    assert results["identical_on_ranks"] is True
    assert results["matches_reference"] <= 1e-5
    assert results["adapter_moved"] > 1e-3
    assert results["expert_keys_saved"] == 2 * 2 * 2  # 2 layers × (gate_up, down) × (A, B)
    assert results["ranks_that_wrote"] == ["rank0"]
    assert results["reload_logits"] <= 1e-6
    assert results["peft_reload_logits"] <= 1e-5

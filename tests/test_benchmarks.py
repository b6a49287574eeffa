"""Smoke test of the benchmark suite on a toy model: every method trains and the report renders.
(The numbers themselves come from ``make bench``; tests check behaviour, not speed.)"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common, report  # the repository's benchmarks/ (pythonpath in pyproject)
from benchmarks.run import PAIRS, TRAIN_METHODS


def _two_steps(method: str):
    """(model, optimizer, trainable tensors before) after two training steps of ``method``."""
    model, optimizer = common.make(method, common.QUICK, torch.float32)
    ids = common.batch(common.QUICK)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    common.train_step(model, optimizer, ids)
    common.train_step(model, optimizer, ids)
    return model, optimizer, before


def test_floor_has_nothing_to_train():
    """The floor (every weight frozen, gradients still flowing) has no optimizer and nothing to train."""
    _, optimizer, before = _two_steps("floor")
    assert optimizer is None and not before


@pytest.mark.parametrize("method", [m for m in TRAIN_METHODS if m != "floor"])
def test_every_method_takes_a_training_step(method):
    model, _, before = _two_steps(method)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_report_renders_every_row(tmp_path):
    train = {
        m: {
            "time_vs_floor": 1.0 + i / 10,
            "time_spread": [1.0, 1.1],
            "peak_mib": 10.0 * i,
            "saved_mib": 5.0 * i,
        }
        for i, m in enumerate(TRAIN_METHODS)
    }
    inproc = {"ratio_to_floor": {m: 1.0 for m in TRAIN_METHODS}, "median_s": {}}
    infer = {"ratios": {k: 1.01 for _, k in report.INFERENCE_ROWS}}
    ops = {"lorakit_over_peft": {k: 0.9 for _, k in report.OPS_ROWS}}
    results = {
        "machine": {"cores": 2, "cpu": "test", "python": "3"},
        "command": "x",
        "shape": common.QUICK.__dict__,
        "train": {"float32": train},
        "train_inprocess": {"float32": inproc},
        "inference": {"lorakit": infer, "peft": infer},
        "ops": ops,
        "compile": {
            "compiled_over_eager": {"lorakit": 0.8, "peft": 0.85},
            "graph_breaks": {"lorakit": 0, "peft": 0},
        },
        "moe": {
            "shape": {
                "hidden": 4,
                "layers": 1,
                "experts": 2,
                "expert_width": 4,
                "top_k": 1,
                "batch": 1,
                "seq": 2,
            },
            "implementations": {
                impl: {
                    "ratio_to_floor": {"floor": 1.0, "lorakit": 1.5, "peft": 2.0},
                    "lorakit_over_peft": 0.75,
                    "saved_mib": {"floor": 1.0, "lorakit": 2.0, "peft": 5.0},
                }
                for impl in ("grouped_mm", "eager")
            },
        },
    }
    report.write_outputs(results, tmp_path, PAIRS, update_readme=False)
    table = (tmp_path / "results.md").read_text()
    assert table.count("**lorakit**") == len(PAIRS) + 2  # + the two MoE rows
    assert table.count("| 0.90 |") == len(report.OPS_ROWS)
    assert "| compiled / eager step time | 0.80 | 0.85 |" in table
    assert table.count("| 0.75 · 0.25 |") == 2  # the MoE rows: time and saved memory, lorakit / PEFT
    assert json.loads((tmp_path / "results.json").read_text())["command"] == "x"
    assert (tmp_path / "results.png").stat().st_size > 1000


@pytest.mark.parity
def test_moe_methods_train_lora_on_the_experts():
    from benchmarks import moe_worker

    for method in ("lorakit", "peft"):
        model, optimizer = moe_worker.make(method, moe_worker.QUICK, "grouped_mm")
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any(".experts." in n for n in before)
        common.train_step(model, optimizer, moe_worker.batch(moe_worker.QUICK))
        common.train_step(model, optimizer, moe_worker.batch(moe_worker.QUICK))
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parity
def test_adapter_operations_run_for_both_libraries_and_merge_alike(tmp_path):
    import copy

    import peft

    import lorakit
    from benchmarks import ops_worker

    template = common.build_base(common.QUICK).eval()
    ops_worker._save_adapter(template, common.QKVO, tmp_path / "a")
    for lib in ops_worker.LIBS:
        times = ops_worker._one_round(lib, template, tmp_path / "a")
        assert set(times) == {"load", "load_second", "merge_and_unload"} and min(times.values()) > 0
    merged = [
        lib.PeftModel.from_pretrained(copy.deepcopy(template), tmp_path / "a").merge_and_unload()
        for lib in (lorakit, peft)
    ]
    ours, theirs = (m.state_dict() for m in merged)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"],
        template.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )

"""Smoke test of the QLoRA benchmark (``benchmarks/quantized.py``) on a toy model: its methods take
a training step and its table renders. (The numbers come from ``make bench-quantized``.)"""

from __future__ import annotations

import pytest

from benchmarks import common
from benchmarks import quantized as QB

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qbench") / "llama"
    common.build_base(common.QUICK).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["floor_nf4", "lorakit_nf4", "peft_int8", "lorakit_int8-ao"])
def test_methods_take_a_step(folder, method) -> None:
    model, optimizer = QB.make(method, folder)
    QB.step(model, optimizer, common.batch(common.QUICK))
    assert (optimizer is None) == method.startswith("floor")


def test_table_renders_every_row() -> None:
    keys = [k for _, k in QB.PAIRS]
    timing = {
        "lorakit_over_peft": dict.fromkeys(keys, 0.9),
        "qlora_over_bf16_lora": 1.5,
        "saved_over_floor_mib": {f"{lib}_{k}": 1.0 for k in keys for lib in ("lorakit", "peft")},
    }
    base = {"model_mib": 2.0, "linear_mib": 1.0}
    memory = {"toy": {b: base for b in ("fp32", "bf16", "nf4", "int8", "int8-ao")}}
    text = QB.table({"timing": timing, "memory": memory})
    assert all(label in text for label, _ in QB.PAIRS) and "toy, linear weights" in text

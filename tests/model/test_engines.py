"""Distributed engines seen from one process (lorakit.model.engines): wrapper names, the injection
record, and refusals of wrapped or sharded models and of shards in saves and merges. (Real
multi-process runs: distributed/test_torchrun_engines.py.)"""

from __future__ import annotations

import pytest
import torch
from zoo import fake_engine, llama

import lorakit
from lorakit import distributed as ld
from lorakit.errors import AdapterError, AdapterFileError, TargetingError
from lorakit.model import engines as sharding
from lorakit.model import state as adapters


def _peft(seed: int = 0) -> lorakit.PeftModel:
    return lorakit.get_peft_model(llama(seed), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(
    ("name", "outer", "expected"),
    [
        ("module.base_model.model.x.lora_A.default.weight", True, "base_model.model.x.lora_A.default.weight"),
        ("module.module.a.b", True, "a.b"),
        ("module.a", False, "module.a"),
        ("layers.0._fsdp_wrapped_module.self_attn.q_proj.weight", False, "layers.0.self_attn.q_proj.weight"),
        (
            "_fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.q.weight",
            False,
            "layers.0.q.weight",
        ),
        (
            "_orig_mod.model.layers.0.q_proj.lora_B.default.weight",
            False,
            "model.layers.0.q_proj.lora_B.default.weight",
        ),
        ("module", True, "module"),
    ],
)
def test_canonical_name(name: str, outer: bool, expected: str) -> None:
    assert sharding.canonical_name(name, outer=outer) == expected


def test_injection_records_adapter_names_and_shapes() -> None:
    model = _peft()
    record = sharding.recorded(model.get_base_model())
    names = record["adapters"]["default"]
    assert len(names) == 8 and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert record["shapes"]["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (8, 16)
    model.add_adapter("other", lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    record = sharding.recorded(model.get_base_model())
    assert set(record["adapters"]) == {"default", "other"} and len(record["adapters"]["other"]) == 4


@pytest.mark.parametrize(
    "engine", ["DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"]
)
def test_injection_refuses_wrapped_models_and_changes_nothing(engine: str) -> None:
    wrapped = fake_engine(engine)(llama())
    before = [(n, type(m).__name__) for n, m in wrapped.named_modules()]
    with pytest.raises(TargetingError, match="Inject first") as err:
        lorakit.get_peft_model(wrapped, lorakit.LoraConfig(target_modules=["q_proj"]))
    assert engine in str(err.value)
    assert [(n, type(m).__name__) for n, m in wrapped.named_modules()] == before


def test_injection_refuses_zero3_partitioned_parameters() -> None:
    model = llama()
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.ds_id, weight.ds_tensor = 0, torch.empty(0)  # what deepspeed.zero.Init leaves on a parameter
    with pytest.raises(TargetingError, match="ZeRO-3"):
        lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["q_proj"]), model)


def test_save_refuses_shards_and_writes_nothing(tmp_path) -> None:
    model = _peft()
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    lora_a.data = torch.empty(0)  # a ZeRO-3 partitioned parameter holds no elements
    with pytest.raises(AdapterFileError, match=r"not whole tensors[\s\S]*lora_A.weight: has 0 elements"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_flat_view(tmp_path) -> None:
    model = _peft()
    lora_b = model.get_base_model().model.layers[1].self_attn.v_proj.lora_B["default"].weight
    lora_b.data = lora_b.data.reshape(-1)[:5].clone()  # FSDP1: this rank's piece, 1-D
    with pytest.raises(AdapterFileError, match=r"shape \(5,\), but the adapter was created with \(8, 8\)"):
        model.save_pretrained(tmp_path / "out")


def test_merge_refuses_a_sharded_base_weight() -> None:
    model = _peft()
    other = model.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight.detach().clone()
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    base.weight.data = torch.empty(0)  # ZeRO-3: merging here would silently do nothing
    with pytest.raises(AdapterError, match="sharded by a distributed engine"):
        model.merge_adapter()
    assert adapters.merged_adapters(model.get_base_model()) == []
    assert torch.equal(model.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight, other)
    with pytest.raises(AdapterError, match="sharded"):
        ld.merge_adapter(model)


def test_get_peft_model_state_dict_refuses_shards() -> None:
    model = _peft()
    model.get_base_model().model.layers[0].self_attn.v_proj.lora_B["default"].weight.data = torch.empty(0)
    with pytest.raises(AdapterError, match="gather_adapter_state_dict"):
        lorakit.get_peft_model_state_dict(model)

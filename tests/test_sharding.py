"""Single-process tests of the distributed plumbing: wrapper names, the injection record, refusals
of wrapped/sharded models and of shards in saves and merges, and the collectives without a group.
(Real multi-process runs: test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import llama

import lorakit
from lorakit import distributed as ld
from lorakit.errors import AdapterError, AdapterFileError, DistributedError, TargetingError
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


def _fake_engine(class_name: str) -> type[nn.Module]:
    """A module class whose name is an engine's (engines are recognised by class name)."""

    def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)

    def init(self: nn.Module, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.module = module

    return type(class_name, (nn.Module,), {"__init__": init, "forward": forward})


@pytest.mark.parametrize(
    "engine", ["DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"]
)
def test_injection_refuses_wrapped_models_and_changes_nothing(engine: str) -> None:
    wrapped = _fake_engine(engine)(llama())
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


def test_collectives_without_a_process_group() -> None:
    model = _peft()
    gathered = ld.gather_adapter_state_dict(model)
    plain = lorakit.get_peft_model_state_dict(model)
    assert gathered.keys() == plain.keys()
    assert all(torch.equal(gathered[k], plain[k]) for k in plain)
    ld.check_adapters_in_sync(model)
    ld.broadcast_adapters(model)
    zeros = {k: torch.zeros_like(v) for k, v in gathered.items()}
    ld.load_adapter_state_dict(model, zeros)
    assert all(float(v.abs().max()) == 0 for v in lorakit.get_peft_model_state_dict(model).values())
    with pytest.raises(AdapterError, match="missing"):
        ld.load_adapter_state_dict(model, {k: v for k, v in list(zeros.items())[1:]})


def test_gather_finds_the_adapter_inside_wrappers() -> None:
    model = _peft()
    wrapped = _fake_engine("Wrapper")(model)  # a plain outer module adds ``module.`` like DDP
    assert ld.adapter_root(wrapped) is model.get_base_model()
    assert ld.gather_adapter_state_dict(wrapped).keys() == lorakit.get_peft_model_state_dict(model).keys()


def test_check_ddp_refuses_reentrant_checkpointing_with_find_unused_parameters() -> None:
    model = _peft()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    fake = _fake_engine("DistributedDataParallel")(model)
    fake.find_unused_parameters = True
    with pytest.raises(DistributedError, match="use_reentrant': False"):
        ld.check_ddp(fake)
    fake.find_unused_parameters = False
    ld.check_ddp(fake)


def test_default_checkpointing_is_non_reentrant() -> None:
    model = _peft()
    model.gradient_checkpointing_enable()
    assert ld.reentrant_checkpointed_modules(model) == []


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_collective_timeout_setting_is_validated(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LORAKIT_COLLECTIVE_TIMEOUT", value)
    with pytest.raises(DistributedError, match="LORAKIT_COLLECTIVE_TIMEOUT"):
        ld.default_timeout()


def test_wrapped_parameter_names_map_back_to_the_record() -> None:
    model = _peft()
    wrapped = _fake_engine("Wrapper")(model)  # names gain a leading ``module.``
    names = ld.adapter_parameter_names(wrapped)
    assert len(names) == 8
    assert all(k.startswith("module.base_model.model.") and k.endswith(v) for k, v in names.items())
    assert set(names.values()) == set(sharding.recorded(model.get_base_model())["adapters"]["default"])


def test_get_peft_model_state_dict_refuses_shards() -> None:
    model = _peft()
    model.get_base_model().model.layers[0].self_attn.v_proj.lora_B["default"].weight.data = torch.empty(0)
    with pytest.raises(AdapterError, match="gather_adapter_state_dict"):
        lorakit.get_peft_model_state_dict(model)

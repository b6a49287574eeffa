"""from_pretrained / load_adapter with PEFT's keywords: a given config object, key_mapping,
low_cpu_mem_usage, autocast_adapter_dtype, ignore_mismatched_sizes, torch_device, the load
result, and keywords that are refused with the valid ones listed."""

from __future__ import annotations

import pytest
import torch
from zoo import tiny, tiny_inputs

import lorakit
from lorakit import AdapterError, LoraConfig, PeftModel, get_peft_model

CONFIG = {"target_modules": ["emb", "fc1"], "r": 4, "init_lora_weights": False}


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_a_given_config_object_is_used_and_kept(saved):
    model, path = saved
    config = LoraConfig(**CONFIG)
    loaded = PeftModel.from_pretrained(tiny(), path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))


def test_load_adapter_returns_peft_load_result_and_keeps_flags(saved):
    model, path = saved
    loaded = PeftModel.from_pretrained(tiny(), path, is_trainable=True)
    result = loaded.load_adapter(path, "other")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    trainable = {n.split(".")[-2] for n, p in loaded.named_parameters() if p.requires_grad and "lora_A" in n}
    assert trainable == {"default"}


def test_key_mapping_renames_file_keys(saved, tmp_path):
    """A model whose modules were renamed since the adapter was saved (transformers'
    _checkpoint_conversion_mapping does the same): the first matching pattern rewrites a key."""
    model, path = saved

    class Renamed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny()

        def forward(self, ids):
            return self.inner(ids)

    loaded = PeftModel.from_pretrained(
        Renamed(),
        path,
        config=LoraConfig(target_modules=["inner.emb", "inner.fc1"], r=4),
        key_mapping={r"^emb": "inner.emb", r"^fc1": "inner.fc1"},
    )
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))


def test_low_cpu_mem_usage_and_dtype_keywords(saved):
    model, path = saved
    loaded = PeftModel.from_pretrained(tiny(), path, low_cpu_mem_usage=True, torch_device="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))
    half = PeftModel.from_pretrained(tiny().to(torch.bfloat16), path, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in half.named_parameters() if "lora_" in n} == {torch.bfloat16}
    half.load_adapter(path, "f32")
    assert half.get_base_model().fc1.lora_A["f32"].weight.dtype == torch.float32


def test_ignore_mismatched_sizes_loads_the_rest(saved):
    _, path = saved
    bigger = tiny()
    bigger.emb = torch.nn.Embedding(25, 8)  # a resized vocabulary
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(bigger, path)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        loaded = PeftModel.from_pretrained(bigger, path, ignore_mismatched_sizes=True)
    reference = get_peft_model(tiny(), LoraConfig(**CONFIG))
    reference.load_adapter(path, "x")
    assert torch.equal(loaded.get_base_model().fc1.lora_A["default"].weight, reference.fc1.lora_A["x"].weight)


def test_bad_keywords_are_refused_before_anything_changes(saved):
    _, path = saved
    base = tiny()
    with pytest.raises(
        AdapterError, match=r"unknown keyword argument\(s\) \['tokn'\]; valid: .*torch_device"
    ):
        PeftModel.from_pretrained(base, path, tokn="x")
    with pytest.raises(AdapterError, match="torch_device='nowhere'"):
        PeftModel.from_pretrained(base, path, torch_device="nowhere")
    with pytest.raises(lorakit.ConfigError, match="config must be a lorakit.LoraConfig"):
        PeftModel.from_pretrained(base, path, config={"r": 4})
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())


def test_offload_keywords_are_accepted_and_runtime_flag_recorded(saved):
    model, path = saved
    loaded = PeftModel.from_pretrained(tiny(), path, device_map={"": "cpu"}, ephemeral_gpu_offload=True)
    assert loaded.peft_config["default"].runtime_config.ephemeral_gpu_offload
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))


@pytest.mark.parametrize("autocast", [True, False])
def test_low_cpu_mem_usage_keeps_each_layers_own_factors(saved, autocast):
    """Meta tensors have no storage: layers of different kinds must not be taken for a tied pair
    (an embedding sharing its factors with its head) when the dtype is re-placed."""
    model, path = saved
    loaded = PeftModel.from_pretrained(tiny(), path, low_cpu_mem_usage=True, autocast_adapter_dtype=autocast)
    emb, fc1 = loaded.base_model.model.emb, loaded.base_model.model.fc1
    assert (
        emb.lora_embedding_A["default"].shape == model.base_model.model.emb.lora_embedding_A["default"].shape
    )
    assert fc1.lora_A["default"].weight.shape == model.base_model.model.fc1.lora_A["default"].weight.shape
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))

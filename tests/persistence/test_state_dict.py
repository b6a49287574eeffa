"""PEFT's state-dict functions: results as PEFT returns them, keys free of distributed wrapper
names, meta-device adapters filled by a load, size mismatches (RuntimeError too, or skipped),
the base model's own state dict, and embedding base weights saved unmerged."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn
from zoo import ZOO, ids, llama, logits, tiny, tiny_inputs, toy

import lorakit
from lorakit import (
    AdapterError,
    AdapterShapeError,
    AdapterStateDictError,
    LoraConfig,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)


class _FsdpLike(nn.Module):
    """Puts ``_fsdp_wrapped_module.`` before every name, as FSDP1 does (no process group needed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner
        self.peft_config = inner.peft_config

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def _trained(**kw):
    config = {"target_modules": ["emb", "fc1"], "init_lora_weights": False, **kw}
    return lorakit.get_peft_model(tiny(), LoraConfig(**config))


def test_set_returns_peft_incompatible_keys():
    source = _trained()
    target = lorakit.get_peft_model(tiny(), LoraConfig(target_modules=["emb", "fc1"]))
    result = set_peft_model_state_dict(target, get_peft_model_state_dict(source))
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert torch.equal(target(tiny_inputs()), source(tiny_inputs()))


def test_state_dict_of_a_wrapped_model_has_plain_keys_and_loads_into_a_plain_one():
    source = _trained(bias="all")
    wrapped = _FsdpLike(source)
    state = get_peft_model_state_dict(wrapped)
    assert state.keys() == get_peft_model_state_dict(source).keys()
    assert not any("_fsdp_wrapped_module" in k for k in state)
    target = lorakit.get_peft_model(tiny(), LoraConfig(target_modules=["emb", "fc1"]))
    set_peft_model_state_dict(target, {"_fsdp_wrapped_module." + k: v for k, v in state.items()})
    assert torch.equal(target(tiny_inputs()), source(tiny_inputs()))


def test_size_mismatch_is_a_runtime_error_or_skipped_with_a_warning():
    source = _trained(r=4)
    target = lorakit.get_peft_model(tiny(), LoraConfig(target_modules=["emb", "fc1"], r=2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch") as info:
        set_peft_model_state_dict(target, get_peft_model_state_dict(source))
    assert isinstance(info.value, AdapterShapeError)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        result = set_peft_model_state_dict(
            target, get_peft_model_state_dict(source), ignore_mismatched_sizes=True
        )
    assert result.missing_keys == []
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # all four skipped


def test_meta_adapter_is_filled_on_its_base_layer_device_and_dtype():
    source = _trained()
    base = tiny().to(torch.bfloat16)
    target = lorakit.inject_adapter_in_model(
        LoraConfig(target_modules=["emb", "fc1"]), base, low_cpu_mem_usage=True
    )
    assert {p.device.type for n, p in target.named_parameters() if "lora_" in n} == {"meta"}
    state = get_peft_model_state_dict(source.get_base_model())  # keys without base_model.model.
    set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
    lora = {p.device.type: p.dtype for n, p in target.named_parameters() if "lora_" in n}
    assert lora == {"cpu": torch.float32}  # the autocast rule: float32 factors on a bf16 base


def test_inject_from_a_state_dict_targets_exactly_its_modules():
    source = _trained()
    state = get_peft_model_state_dict(source)
    model = lorakit.inject_adapter_in_model(LoraConfig(target_modules=["fc2"]), tiny(), state_dict=state)
    assert {n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)} == {"emb", "fc1"}


@pytest.mark.parity
def test_base_model_state_dict_matches_peft_and_round_trips():
    kw = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    build = ZOO["llama"].build
    ours = lorakit.get_peft_model(build(), LoraConfig(**kw))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    mine, ref = get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert mine.keys() == ref.keys() == build().state_dict().keys()
    assert all(torch.equal(mine[k], ref[k]) for k in mine)
    fresh = {k: torch.zeros_like(v) for k, v in mine.items()}
    assert set_base_model_state_dict(ours, fresh) == ([], [])
    assert all(not v.any() for v in get_base_model_state_dict(ours).values())


def test_base_model_state_dict_is_unmerged_and_strict_loading_names_the_keys():
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], init_lora_weights=False))
    before = {k: v.clone() for k, v in get_base_model_state_dict(model).items()}
    model.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in get_base_model_state_dict(model).items())
    with pytest.raises(AdapterError, match="merged"):
        set_base_model_state_dict(model, before)
    model.unmerge_adapter()
    broken = {**before, "extra.weight": torch.zeros(1)}
    del broken["lin.weight"]
    with pytest.raises(AdapterStateDictError, match=r"Missing key.*lin\.weight") as info:
        set_base_model_state_dict(model, broken)
    assert isinstance(info.value, RuntimeError) and "extra.weight" in str(info.value)
    result = set_base_model_state_dict(model, broken, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["lin.weight"], ["extra.weight"])


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_saving_with_a_merged_embedding_adapter_stores_the_unmerged_base(target, tmp_path):
    """A merged adapter on an embedding must not leak into the base weight the file carries:
    loading it into a fresh model would apply the update twice (issue 14)."""
    model = lorakit.get_peft_model(llama(), LoraConfig(target_modules=[target], init_lora_weights=False))
    x = ids()
    want = logits(model, x)
    model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "save_embedding_layers" notice
        model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, x), want, atol=1e-5, rtol=1e-5)


def test_each_adapter_file_carries_only_its_own_embeddings_and_loads_back(tmp_path):
    """default on embed_tokens, a on lm_head: each file holds its own embedding's base weight, and
    the folder loads back (issue 14: the root file carried lm_head's too and could not load)."""
    model = lorakit.get_peft_model(
        llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False)
    )
    model.add_adapter("a", LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    x = ids()
    want = {}
    for name in ("default", "a"):
        model.set_adapter(name)
        want[name] = logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert not any("lm_head" in k for k in keys)
    loaded = lorakit.PeftModel.from_pretrained(llama(), tmp_path)
    loaded.load_adapter(tmp_path / "a", "a")
    for name in ("default", "a"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, x), want[name], atol=1e-5, rtol=1e-5)

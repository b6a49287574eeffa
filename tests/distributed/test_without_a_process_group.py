"""lorakit.distributed in one process, without a process group: the collectives fall back to local
operations, the adapter is found inside wrappers, DDP checks, the timeout setting, and wrapped names
map back to the injection record. (Real multi-process runs: test_torchrun_engines.py.)"""

from __future__ import annotations

import pytest
import torch
from zoo import fake_engine, llama

import lorakit
from lorakit import distributed as ld
from lorakit.errors import AdapterError, DistributedError
from lorakit.model import engines as sharding


def _peft(seed: int = 0) -> lorakit.PeftModel:
    return lorakit.get_peft_model(llama(seed), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))


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
    wrapped = fake_engine("Wrapper")(model)  # a plain outer module adds ``module.`` like DDP
    assert ld.adapter_root(wrapped) is model.get_base_model()
    assert ld.gather_adapter_state_dict(wrapped).keys() == lorakit.get_peft_model_state_dict(model).keys()


def test_check_ddp_refuses_reentrant_checkpointing_with_find_unused_parameters() -> None:
    model = _peft()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    fake = fake_engine("DistributedDataParallel")(model)
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
    wrapped = fake_engine("Wrapper")(model)  # names gain a leading ``module.``
    names = ld.adapter_parameter_names(wrapped)
    assert len(names) == 8
    assert all(k.startswith("module.base_model.model.") and k.endswith(v) for k, v in names.items())
    assert set(names.values()) == set(sharding.recorded(model.get_base_model())["adapters"]["default"])

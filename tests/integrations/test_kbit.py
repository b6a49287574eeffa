"""``prepare_model_for_kbit_training`` (``integrations/kbit.py``) does what PEFT's does to the same
quantized model, and the prepared model trains its adapters through checkpointed blocks."""

from __future__ import annotations

import peft
import pytest
import torch
from zoo import quantized as Q

import lorakit

pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _summary(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parity
@pytest.mark.parametrize("scheme", ["nf4-bf16", "int8", "int8-ao"])
def test_prepares_the_model_as_peft_does(scheme: str) -> None:
    ours = lorakit.prepare_model_for_kbit_training(Q.quantized("llama", scheme))
    theirs = peft.prepare_model_for_kbit_training(Q.quantized("llama", scheme))
    assert _summary(ours) == _summary(theirs)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing is True
    if scheme == "nf4-bf16":  # norms, embeddings and head in float32
        assert ours.model.norm.weight.dtype == ours.lm_head.weight.dtype == torch.float32
    assert ours.get_input_embeddings()(IDS).requires_grad  # checkpointed blocks get a backward


def test_the_prepared_model_trains_every_adapter_through_checkpointed_blocks() -> None:
    model = lorakit.prepare_model_for_kbit_training(
        Q.quantized("llama", "nf4-bf16"), gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    model = lorakit.get_peft_model(
        model, lorakit.LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 28 and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.any() for n, g in grads.items() if "lora_B" in n)  # (B starts at 0, so ∂A = 0)


def test_a_non_module_is_refused() -> None:
    with pytest.raises(lorakit.ConfigError, match="needs an nn.Module"):
        lorakit.prepare_model_for_kbit_training("llama")

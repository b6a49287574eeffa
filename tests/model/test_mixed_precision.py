"""Mixed precision (design §5): a bf16/fp16 base gets float32 adapters by default,
``autocast_adapter_dtype=False`` keeps them in the base dtype (as PEFT), and ``torch.autocast``
trains the adapters."""

from __future__ import annotations

import peft
import pytest
import torch
from zoo import labels_for, task_model, text_inputs

import lorakit
from lorakit.layers import LoraLayer


def _llama(dtype: torch.dtype, **kwargs) -> lorakit.PeftModel:
    config = lorakit.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, target_modules="all-linear")
    return lorakit.get_peft_model(task_model("llama", "ForCausalLM").to(dtype), config, **kwargs)


def _adapter_dtypes(model) -> set[torch.dtype]:
    return {
        p.dtype
        for m in model.modules()
        if isinstance(m, LoraLayer)
        for name in m.adapter_names
        for p in m.adapter_parameters(name)
    }


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_autocast_adapter_dtype_like_peft(dtype: torch.dtype, autocast: bool) -> None:
    ours = _llama(dtype, autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(
        task_model("llama", "ForCausalLM").to(dtype),
        peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"),
        autocast_adapter_dtype=autocast,
    )
    expected = {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert _adapter_dtypes(ours) == expected == {torch.float32 if autocast else dtype}
    assert ours.get_input_embeddings().weight.dtype == dtype
    assert all(
        p.requires_grad
        for m in ours.modules()
        if isinstance(m, LoraLayer)
        for p in m.adapter_parameters("default")
    )


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_trains(autocast: bool) -> None:
    model = _llama(torch.bfloat16, autocast_adapter_dtype=autocast)
    model.train()
    out = model(**text_inputs(), **labels_for("CAUSAL_LM"))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parity
def test_torch_autocast_trains_float32_adapters_and_matches_peft() -> None:
    ours = _llama(torch.float32)
    theirs = peft.get_peft_model(
        task_model("llama", "ForCausalLM"),
        peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", init_lora_weights=False),
    )
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    inputs = {**text_inputs(), **labels_for("CAUSAL_LM")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(**inputs), theirs(**inputs)
    with torch.no_grad():
        truth = ours(**inputs).logits  # float32, no autocast
    assert out.logits.dtype == torch.bfloat16
    # lorakit adds the low-rank product inside the GEMM (one bfloat16 rounding where PEFT makes two),
    # so the logits agree with PEFT's to bfloat16 rounding; both errors from float32 are set by the
    # bfloat16 base products and are of one size
    torch.testing.assert_close(out.logits, ref.logits, atol=8e-3, rtol=1.6e-2)
    ours_err, peft_err = ((t.logits.float() - truth).abs().mean().item() for t in (out, ref))
    assert ours_err <= peft_err * 1.25
    out.loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

"""LoRA on quantized bases against PEFT 0.21 on the same quantized base (issue 15).

Each case loads one tiny model quantized on CPU through transformers (``zoo.quantized``) twice, wraps
one copy with lorakit and one with PEFT using the same config, gives PEFT lorakit's adapter weights,
and checks the module layout, the state-dict keys, eval outputs, gradients and the files both ways.

Tolerances. Both sides run the same bitsandbytes / torchao base product (bit for bit: same kernel,
same input; PEFT's models get bitsandbytes' CPU repacking switched off as lorakit's do, see
``lorakit.layers.bnb``). They differ only in how the rank-r branch is added:

* float32 compute: lorakit accumulates ``s·h Bᵀ`` into the base output inside one GEMM, PEFT
  computes ``(h Bᵀ)·s`` and adds it; each is ≤ r + 2 roundings of float32 (u = 2⁻²⁴) per element of
  an adapted layer's output, so over ``n`` adapted layers on the path the output may differ by
  ``n (r + 2) u`` relative to its magnitude (amplification by these tiny networks is O(1)).
* bfloat16 compute: lorakit computes the branch in the activations' dtype (casting A and B, never
  x), PEFT casts x to float32; the branch then differs by ≤ 3 bfloat16 roundings (A, h, B:
  u = 2⁻⁸ each) and the sum by one more, so the bound is ``n · 4 · 2⁻⁸`` relative.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from zoo import quantized as Q

import lorakit
from lorakit.layers import LoraLayer

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

pytestmark = [pytest.mark.parity, pytest.mark.slow]

R = 4
CONFIG = {"r": R, "lora_alpha": 8, "init_lora_weights": False}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}

CASES = [
    ("llama", "nf4"),
    ("llama", "nf4-bf16"),
    ("llama", "fp4"),
    ("llama", "int8"),
    ("llama", "int8-ao"),
    ("gpt2", "nf4"),
    ("gpt2", "int8"),
    ("bert", "nf4"),
    ("bert", "fp4"),
    ("bert", "int8"),
    ("bert", "int8-ao"),
]


def _ids(arch: str) -> torch.Tensor:
    return torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _tolerance(scheme: str, n_adapted: int, scale: float) -> float:
    u, roundings = (2.0**-8, 4) if Q.scheme_dtype(scheme) == torch.bfloat16 else (2.0**-24, R + 2)
    return n_adapted * roundings * u * scale


def _config(arch: str, **kwargs):
    return {**CONFIG, "task_type": TASKS[arch], **kwargs}


def _pair(arch: str, scheme: str, **kwargs):
    """(lorakit model, PEFT model) on two loads of the same quantized base, with lorakit's random
    adapter weights copied into PEFT's."""
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(Q.quantized(arch, scheme), lorakit.LoraConfig(**_config(arch, **kwargs)))
    theirs = peft.get_peft_model(
        Q.no_cpu_repacking(Q.quantized(arch, scheme)), peft.LoraConfig(**_config(arch, **kwargs))
    )
    peft.set_peft_model_state_dict(theirs, lorakit.get_peft_model_state_dict(ours))
    return ours, theirs


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(("arch", "scheme"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_same_layers_keys_outputs_and_gradients_as_peft(arch: str, scheme: str) -> None:
    ours, theirs = _pair(arch, scheme)
    wrapped = {n: type(m).__name__ for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {n: type(m).__name__ for n, m in theirs.named_modules() if isinstance(m, PeftLoraLayer)}
    assert set(lorakit.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))

    ids = _ids(arch)
    ours.eval(), theirs.eval()
    got, want = _logits(ours, ids), _logits(theirs, ids)
    with ours.disable_adapter():
        base = _logits(ours, ids)
    tol = _tolerance(scheme, len(wrapped), want.abs().max().item())
    assert (got - want).abs().max().item() <= tol
    assert (want - base).abs().max().item() > 10 * tol  # the adapter matters at this tolerance

    ours.train(), theirs.train()
    for model in (ours, theirs):
        out = model(input_ids=ids, labels=ids if TASKS[arch] == "CAUSAL_LM" else torch.tensor([0, 2]))
        out.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(grads) == set(theirs_grads)
    for name, grad in grads.items():
        ref = theirs_grads[name]
        assert grad is not None and ref is not None
        assert (grad - ref).abs().max().item() <= _tolerance(scheme, len(wrapped), ref.abs().max().item())


@pytest.mark.parametrize(("arch", "scheme"), [("llama", "nf4"), ("gpt2", "int8"), ("bert", "int8-ao")])
def test_files_load_both_ways_with_equal_outputs(arch: str, scheme: str, tmp_path) -> None:
    ours, theirs = _pair(arch, scheme)
    ids = _ids(arch)
    ours.eval()
    expected = _logits(ours, ids)
    n_adapted = sum(isinstance(m, LoraLayer) for m in ours.modules())
    tol = _tolerance(scheme, n_adapted, expected.abs().max().item())

    ours.save_pretrained(tmp_path / "lorakit")
    in_peft = peft.PeftModel.from_pretrained(
        Q.no_cpu_repacking(Q.quantized(arch, scheme)), tmp_path / "lorakit"
    )
    assert (_logits(in_peft, ids) - expected).abs().max().item() <= tol

    theirs.save_pretrained(tmp_path / "peft")
    in_lorakit = lorakit.PeftModel.from_pretrained(Q.quantized(arch, scheme), tmp_path / "peft")
    assert (_logits(in_lorakit, ids) - expected).abs().max().item() <= tol


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_dora_on_a_quantized_base_matches_peft(scheme: str) -> None:
    ours, theirs = _pair("llama", scheme, use_dora=True)
    ids = _ids("llama")
    got, want = _logits(ours, ids), _logits(theirs, ids)
    # DoRA adds the column norm of deq(Q) + ΔW (k = 16 terms per norm) to the float32 roundings
    tol = _tolerance(scheme, 4, want.abs().max().item()) * 16
    assert (got - want).abs().max().item() <= tol

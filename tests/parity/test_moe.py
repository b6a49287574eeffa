"""Mixture-of-experts models against real PEFT 0.21.2: LoRA on the experts (``target_parameters``),
alone and with ``target_modules``, on tiny Qwen3-MoE, Mixtral, OLMoE and GPT-OSS (``zoo.moe``).

For each: the same modules and parameters are wrapped with the same trainable tensors and the same
file keys; PEFT's weights loaded into lorakit give PEFT's logits and gradients; directories saved by
each library load in the other with the same outputs; merging is exact (merge_and_unload equals the
unmerged model, unmerging restores every weight bit for bit) and disable_adapter is the base model.

Tolerance: both libraries compute in float32 and differ only in association (PEFT adds ΔW to the
weight, lorakit adds s·B_e(A_e x) to each product). Each product of reduction length k ≤ H + r
differs by at most (k + r)·u·Σ|terms| (u = 2⁻²⁴, Higham §3.1); the logits pass through
``PRODUCTS`` = 2 layers × 7 products (q, k, v, scores, values, o, router, gate_up, down → ≤ 9,
counted 7 on any one path) + the head; gradients go back through the same chain once more.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from zoo import MOE_ARCHS, moe

import lorakit

pytestmark = pytest.mark.parity

H, R = 16, 4
U = 2**-24
PRODUCTS = 2 * 9 + 1
TOL = PRODUCTS * (H + R) * U  # relative to the reference's largest element
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CONFIGS = {
    "experts": {"target_modules": [], "target_parameters": EXPERTS},
    "experts+attention": {
        "target_modules": ["q_proj", "o_proj"],
        "target_parameters": EXPERTS,
        "rank_pattern": {"gate_up_proj": 2},
        "use_rslora": True,
    },
}
IDS = torch.tensor([[5, 17, 42, 3, 99, 8, 61], [11, 2, 73, 30, 64, 12, 7]])


def _build(
    arch: str, config: str, implementation: str = "grouped_mm"
) -> tuple[torch.nn.Module, object, object]:
    kwargs = {"r": R, "lora_alpha": 8, "init_lora_weights": False, **CONFIGS[config]}
    base = moe(arch, experts_implementation=implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return base, theirs, ours


def _scaled(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_outputs_gradients_and_keys_equal_peft(arch, config, parity_diffs):
    base, theirs, ours = _build(arch, config)
    assert set(lorakit.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))
    trainable = {
        n.replace("base_model.model.", ""): tuple(p.shape)
        for n, p in ours.named_parameters()
        if p.requires_grad
    }
    reference = {
        n.replace("base_model.model.", ""): tuple(p.shape)
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert trainable == reference
    out, ref = ours(IDS).logits, theirs(IDS).logits
    parity_diffs[f"moe-{arch}-{config}"] = float((out - ref).detach().abs().max())
    assert _scaled(out, ref) <= TOL
    assert _scaled(ref, base(IDS).logits) > 1e-3  # the adapter moves the output
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    grads = {
        n.replace("base_model.model.", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad
    }
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            assert _scaled(grads[name.replace("base_model.model.", "")], p.grad) <= 2 * TOL, name


def test_all_linear_adapts_experts_and_router_as_peft(tmp_path):
    """On a family transformers 5 fused, "all-linear" keeps its transformers-4 meaning (experts and
    router were linear then): PEFT's outputs, and files that load both ways."""
    kwargs = {"r": R, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear"}
    base = moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert _scaled(ours(IDS).logits, theirs(IDS).logits) <= TOL
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _scaled(reloaded(IDS).logits, theirs(IDS).logits) <= TOL


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_every_experts_implementation_equals_peft(implementation):
    base, theirs, ours = _build("qwen3_moe", "experts+attention", implementation)
    assert _scaled(ours(IDS).logits, theirs(IDS).logits) <= TOL


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_files_load_both_ways(arch, tmp_path):
    base, theirs, ours = _build(arch, "experts+attention")
    with torch.no_grad():  # the weights each library saves differ from the other's
        for p in ours.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "lorakit")
    saved = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(EXPERTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_reads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit")
    ours_reads_peft = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert _scaled(peft_reads_ours(IDS).logits, ours(IDS).logits) <= TOL
    assert _scaled(ours_reads_peft(IDS).logits, theirs(IDS).logits) <= TOL


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_merge_is_exact_and_disable_is_the_base(arch):
    base, _, ours = _build(arch, "experts+attention")
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    unmerged = ours(IDS).logits.detach()
    with ours.disable_adapter():
        assert torch.equal(ours(IDS).logits, base(IDS).logits)
    ours.merge_adapter()
    assert _scaled(ours(IDS).logits, unmerged) <= TOL
    with ours.disable_adapter():  # unmerges exactly, and merges again after
        assert torch.equal(ours(IDS).logits, base(IDS).logits)
    ours.unmerge_adapter()
    current = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in ours.named_parameters()
    }
    assert all(torch.equal(current[n], p) for n, p in originals.items())
    merged_model = ours.merge_and_unload()
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert type(merged_model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert _scaled(merged_model(IDS).logits, unmerged) <= TOL


def test_several_adapters_and_mixed_batches():
    """Two adapters on the experts: each row of a batch with its own (or none) equals that row run
    with that adapter active (PEFT refuses mixed batches on experts)."""
    base = moe("olmoe")
    kwargs = {
        "r": R,
        "lora_alpha": 8,
        "init_lora_weights": False,
        "target_modules": ["q_proj"],
        "target_parameters": EXPERTS,
    }
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**kwargs), adapter_name="one")
    torch.manual_seed(1)
    model.add_adapter("two", lorakit.LoraConfig(**kwargs))
    rows = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        rows[name] = model(IDS).logits.detach()
    with model.disable_adapter():
        rows["__base__"] = model(IDS).logits.detach()
    names = ["two", "__base__"]
    mixed = model(IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        assert _scaled(mixed[i], rows[name][i]) <= TOL, name
    assert _scaled(rows["one"], rows["two"]) > 1e-3


def test_training_with_dropout_updates_the_experts():
    model = lorakit.get_peft_model(
        moe("gpt_oss"),
        lorakit.LoraConfig(r=R, lora_alpha=8, lora_dropout=0.1, target_modules=[], target_parameters=EXPERTS),
    )
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)

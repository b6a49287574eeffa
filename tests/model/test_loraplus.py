"""LoRA+ optimizers: the parameter groups, learning rates and weight decays equal PEFT 0.21.2's on the
same models (every group's parameters by name and in order), and the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from zoo import bert_cls, gpt2, llama

import lorakit
from lorakit.model.loraplus import loraplus_param_groups

# (model builder, config keywords): the adapter kinds and trainable extras that land in each group
CASES = {
    "llama-embedding-dora": (llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)),
    "llama-norm-saved": (llama, dict(target_modules=["q_proj", "down_proj"], modules_to_save=["model.norm"])),
    "gpt2-conv1d-bias-all": (gpt2, dict(target_modules=["c_attn", "c_fc"], bias="all")),
    "bert-layernorm-lora-bias": (
        bert_cls,
        dict(target_modules=["query", "value"], lora_bias=True, modules_to_save=["classifier", "LayerNorm"]),
    ),
    "bert-lora-only": (bert_cls, dict(target_modules=["query", "dense"], bias="lora_only")),
}


def _groups(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_learning_rates_and_decays_equal_peft(case):
    build, kw = CASES[case]
    base = build()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, **kw))
    options = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=5e-5)
    theirs = peft_loraplus(pm, torch.optim.AdamW, betas=(0.8, 0.9), **options)
    ours = lorakit.create_loraplus_optimizer(lk, torch.optim.AdamW, betas=(0.8, 0.9), **options)
    assert _groups(lk, ours) == _groups(pm, theirs)
    assert [g["betas"] for g in ours.param_groups] == [(0.8, 0.9)] * 4
    assert sum(len(g) for _, _, g in _groups(lk, ours)) == sum(p.requires_grad for p in lk.parameters())


@pytest.mark.parity
def test_peft_defaults():
    base = llama()
    kw = dict(r=4, target_modules=["q_proj", "embed_tokens"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    theirs = peft_loraplus(pm, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    ours = lorakit.create_loraplus_optimizer(lk, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    assert _groups(lk, ours) == _groups(pm, theirs)
    assert [(g["lr"], g["weight_decay"]) for g in ours.param_groups] == [
        (0.1, 0.0),
        (1e-6, 0.0),
        (0.4, 0.0),
        (0.4, 0.0),
    ]


def test_b_learns_ratio_times_faster_with_sgd():
    """One SGD step moves each factor by lr·grad: B's step is the ratio times its plain-LoRA step."""
    model = lorakit.get_peft_model(
        llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    before_a, before_b, grad_a, grad_b = (
        a.detach().clone(),
        b.detach().clone(),
        a.grad.clone(),
        b.grad.clone(),
    )
    lorakit.create_loraplus_optimizer(model, torch.optim.SGD, lr=0.5, loraplus_lr_ratio=8).step()
    torch.testing.assert_close(before_a - a.detach(), 0.5 * grad_a)
    torch.testing.assert_close(before_b - b.detach(), 4.0 * grad_b)


def test_groups_for_any_optimizer_and_plain_modules():
    model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(r=2, target_modules=["q_proj"]), llama())
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=2)
    assert [len(g["params"]) for g in groups] == [2, 0, 2, 0]
    torch.optim.Adam(groups)  # usable as they are


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        (dict(lr=0.0, loraplus_lr_ratio=16), "lr=0.0"),
        (dict(lr=1e-3, loraplus_lr_ratio=-1), "loraplus_lr_ratio=-1"),
        (dict(lr=1e-3, loraplus_lr_ratio=float("nan")), "loraplus_lr_ratio=nan"),
        (dict(lr=1e-3, loraplus_lr_ratio=2, loraplus_weight_decay=-0.1), "loraplus_weight_decay=-0.1"),
    ],
)
def test_bad_values_are_refused_together(options, shown):
    model = lorakit.get_peft_model(llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="must be a finite number") as info:
        lorakit.create_loraplus_optimizer(model, torch.optim.AdamW, **options)
    assert shown in str(info.value)


def test_a_frozen_model_is_refused():
    model = lorakit.get_peft_model(
        llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], inference_mode=True)
    )
    with pytest.raises(lorakit.ConfigError, match="no trainable parameter"):
        lorakit.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)

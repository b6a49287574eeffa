"""Default ``target_modules`` for every architecture of the test models (the same modules PEFT picks),
and ``lorakit.inspect`` / the error explaining what could be targeted when there is no default."""

from __future__ import annotations

import peft
import pytest
from zoo import build, task_model

import lorakit
from lorakit.errors import TargetingError
from lorakit.layers import LoraLayer

DEFAULTS = {
    ("bert", "Model"): {"query", "value"},
    ("roberta", "Model"): {"query", "value"},
    ("gpt2", "LMHeadModel"): {"c_attn"},
    ("llama", "ForCausalLM"): {"q_proj", "v_proj"},
    ("mistral", "ForCausalLM"): {"q_proj", "v_proj"},
    ("t5", "ForConditionalGeneration"): {"q", "v"},
    ("bart", "ForConditionalGeneration"): {"q_proj", "v_proj"},
    ("whisper", "ForConditionalGeneration"): {"q_proj", "v_proj"},
    ("vit", "ForImageClassification"): {"q_proj", "v_proj"},  # `query`/`value` before transformers 5
}


def _wrapped(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch,head", list(DEFAULTS), ids=lambda v: str(v))
def test_default_targets_pick_the_attention_projections(arch: str, head: str) -> None:
    model = lorakit.get_peft_model(task_model(arch, head), lorakit.LoraConfig())
    wrapped = _wrapped(model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == DEFAULTS[arch, head]
    assert {"0", "1"} <= {part for name in wrapped for part in name.split(".")}  # both layers
    report = lorakit.inspect(task_model(arch, head))
    assert {row["name"] for row in report.modules if row["default"]} == {
        n.removeprefix("base_model.model.") for n in wrapped
    }


# PEFT 0.21 has no default for Whisper and still names ViT's projections `query` / `value`.
@pytest.mark.parity
@pytest.mark.parametrize(
    "arch,head", [k for k in DEFAULTS if k[0] not in ("vit", "whisper")], ids=lambda v: str(v)
)
def test_default_targets_equal_peft(arch: str, head: str) -> None:
    ours = _wrapped(lorakit.get_peft_model(task_model(arch, head), lorakit.LoraConfig()))
    theirs = {
        name
        for name, m in peft.get_peft_model(task_model(arch, head), peft.LoraConfig()).named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ours == theirs


def test_inspect_explains_a_model_without_default() -> None:
    report = lorakit.inspect(build("xlnet"))
    assert report.default_targets is None
    text = str(report)
    assert "no default" in text and "layer.0.ff.layer_1" in text and "all-linear" in text
    with pytest.raises(TargetingError, match=r"no default for model_type 'xlnet'.*layer_1, layer_2"):
        lorakit.get_peft_model(build("xlnet"), lorakit.LoraConfig())


@pytest.mark.parity
def test_lorakit_additions_are_what_peft_lacks() -> None:
    """With target_parameters only PEFT's entries apply: the additions must be exactly the others."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    from lorakit.integrations.default_targets import DEFAULT_TARGETS, LORAKIT_ADDITIONS

    assert set(DEFAULT_TARGETS) - set(PEFT_TABLE) == LORAKIT_ADDITIONS

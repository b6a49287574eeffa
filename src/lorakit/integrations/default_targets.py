"""Default ``target_modules`` per transformers ``model_type`` (used when a config gives ``None``).

Data only: it starts from PEFT's table (same choices, so a config saved by one library targets the
same modules in the other) and adds the architectures PEFT leaves out (:data:`LORAKIT_ADDITIONS`).
With ``target_parameters`` only the defaults PEFT applies are used, as PEFT otherwise adapts the
parameters alone. The attention query and value projections are the classic choice of the LoRA
paper (§7.1).
"""

from __future__ import annotations

from torch import nn

from lorakit.model.targeting import model_type_of, register_default_targets

_QV = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")
# ViT-family attention is `query`/`value` before transformers 5 and `q_proj`/`v_proj` from 5 on;
# a name that is absent simply matches nothing, so both spellings are listed.
_VIT_QV = ("query", "value", "q_proj", "v_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    # encoders
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "layoutlm": _QUERY_VALUE,
    "camembert": _QUERY_VALUE,
    "albert": _QUERY_VALUE,
    "vit": _VIT_QV,
    "deit": _VIT_QV,
    "dinov2": _VIT_QV,
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "mpnet": ("q", "v"),
    # encoder-decoders
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "umt5": ("q", "v"),
    "bart": _QV,
    "mbart": _QV,
    "marian": _QV,
    "pegasus": _QV,
    "m2m_100": _QV,
    "whisper": _QV,
    "blip-2": ("q", "v", *_QV),
    # decoders
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "btlm": ("c_proj", "c_attn"),
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "RefinedWebModel": ("query_key_value",),
    "chatglm": ("query_key_value",),
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
    "opt": _QV,
    "gptj": _QV,
    "gpt_neo": _QV,
    "llama": _QV,
    "llama4": _QV,
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "qwen2": _QV,
    "qwen2_moe": _QV,
    "qwen3": _QV,
    "qwen3_moe": _QV,
    "phi3": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "olmo": _QV,
    "olmo2": _QV,
    "granite": _QV,
    "starcoder2": _QV,
    "cohere": _QV,
    "smollm3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
}


# The entries PEFT 0.21's table does not have (tests/integrations/test_default_targets.py checks it).
LORAKIT_ADDITIONS = frozenset(
    {
        "albert",
        "camembert",
        "cohere",
        "deit",
        "dinov2",
        "distilbert",
        "granite",
        "m2m_100",
        "marian",
        "mbart",
        "mpnet",
        "olmo",
        "olmo2",
        "pegasus",
        "phi3",
        "qwen2_moe",
        "qwen3_moe",
        "smollm3",
        "starcoder2",
        "umt5",
        "vit",
        "whisper",
    }
)


# Where PEFT 0.21 applies no default: its table lacks the type, or (mixtral) its conversion of
# transformers-4 MoE configs replaces target_modules=None by an empty set before the table is read.
PEFT_WITHOUT_DEFAULT = LORAKIT_ADDITIONS | {"mixtral"}


def default_targets(model_type: str | None, *, peft_only: bool = False) -> list[str] | None:
    """The default module names for ``model_type``, or ``None`` when lorakit has no default (with
    ``peft_only``: when PEFT applies none, :data:`PEFT_WITHOUT_DEFAULT`)."""
    if model_type is None or (peft_only and model_type in PEFT_WITHOUT_DEFAULT):
        return None
    names = DEFAULT_TARGETS.get(model_type)
    return list(names) if names is not None else None


def _for_model(model: nn.Module, peft_only: bool) -> list[str] | None:
    return default_targets(model_type_of(model), peft_only=peft_only)


register_default_targets(_for_model)

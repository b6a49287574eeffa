"""LoRA layers: one file per base-layer kind, the variant strategies, and the dispatch tables.

=====================  =============================================================================
``tuner_layer``        ``BaseTunerLayer``: PEFT's layer interface, which every LoRA layer implements
``base``               ``LoraLayer``: what every kind shares, and the contract a kind fulfils
``linear``             ``nn.Linear`` / transformers ``Conv1D`` (the plain, readable LoRA linear)
``linear_fast``        the linear layer's fused and batched paths, tested equal to the plain one
``embedding``          ``nn.Embedding``
``conv``               ``nn.Conv1d/2d/3d``
``conv_grouped``       ``nn.Conv1d/2d/3d`` with ``groups > 1``
``mha``                ``nn.MultiheadAttention`` (its in_proj, and its out_proj as a nested Linear)
``quantized``          what the quantized linear kinds share (no silent re-quantization, exact unmerge)
``bnb``                bitsandbytes ``Linear4bit`` (QLoRA) and ``Linear8bitLt``
``torchao``            ``nn.Linear`` with a torchao int8 weight
``parameter``          a parameter read inside its module's forward (``target_parameters``: MoE experts)
``lowrank_weight``     the stand-in weight through which ``parameter`` applies its adapters
``modules_to_save``    a module trained in full beside the adapters
``trainable_tokens``   chosen rows of an embedding trained beside the adapters (tied heads share them)
``variant``            the contract of an adapter variant; ``dora``: DoRA
``rows``               mixed batches (``adapter_names``)
``registry``           base module type → layer kind; config → variant
=====================  =============================================================================
"""

from __future__ import annotations

from lorakit.layers.base import LoraLayer, RequantizeReport
from lorakit.layers.conv import Conv
from lorakit.layers.conv_grouped import GroupedConv
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d, linear_shape
from lorakit.layers.mha import MultiheadAttention
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.parameter import ParamWrapper, wrapper_chain
from lorakit.layers.quantized import QuantizedLinear
from lorakit.layers.registry import (
    lora_layer_for,
    parameter_layer_for,
    prepare_model,
    register_layer,
    supported_kinds,
    supported_parameter_kinds,
    variant_for,
)
from lorakit.layers.rows import BASE_ROWS
from lorakit.layers.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper, token_layer_problem
from lorakit.layers.tuner_layer import BaseTunerLayer

__all__ = [
    "BASE_ROWS",
    "BaseTunerLayer",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv",
    "GroupedConv",
    "MultiheadAttention",
    "ModulesToSaveWrapper",
    "QuantizedLinear",
    "RequantizeReport",
    "prepare_model",
    "TrainableTokensWrapper",
    "TrainableTokensLayer",
    "token_layer_problem",
    "ParamWrapper",
    "wrapper_chain",
    "lora_layer_for",
    "parameter_layer_for",
    "supported_parameter_kinds",
    "register_layer",
    "supported_kinds",
    "variant_for",
    "is_conv1d",
    "linear_shape",
]

"""LoRA layers: one file per base-layer kind, the variant strategies, and the dispatch tables.

=====================  =============================================================================
``tuner_layer``        ``BaseTunerLayer``: PEFT's layer interface, which every LoRA layer implements
``base``               ``LoraLayer``: what every kind shares, and the contract a kind fulfils
``linear``             ``nn.Linear`` / transformers ``Conv1D`` (the plain, readable LoRA linear)
``linear_fast``        the linear layer's fused and batched paths, tested equal to the plain one
``embedding``          ``nn.Embedding``
``conv``               ``nn.Conv1d/2d/3d``
``modules_to_save``    a module trained in full beside the adapters
``variant``            the contract of an adapter variant; ``dora``: DoRA
``rows``               mixed batches (``adapter_names``)
``registry``           base module type → layer kind; config → variant
=====================  =============================================================================
"""

from __future__ import annotations

from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import Conv
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d, linear_shape
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.registry import lora_layer_for, register_layer, supported_kinds, variant_for
from lorakit.layers.rows import BASE_ROWS
from lorakit.layers.tuner_layer import BaseTunerLayer

__all__ = [
    "BASE_ROWS",
    "BaseTunerLayer",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv",
    "ModulesToSaveWrapper",
    "lora_layer_for",
    "register_layer",
    "supported_kinds",
    "variant_for",
    "is_conv1d",
    "linear_shape",
]

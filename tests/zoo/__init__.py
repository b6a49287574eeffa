"""The test suite's model zoo: every model a test builds, the inputs that go with it, and the checks
on a model's state. Nothing is downloaded: models are built from configs with fixed seeds, so two
calls return identical weights.

Models
  transformers (``zoo.transformers_models``): ``config(arch, **overrides)`` and ``build(arch, head)``
  for every architecture in ``ARCHS`` (hidden size 16, 2 layers, every dropout 0), and the variants
  tests depend on, each with its exact config and seed:
    ``llama()``, ``gpt2()``, ``bert_cls()`` (``MODELS``): the unit-test models, vocab 64;
    ``task_model(arch, head)``: every task head, with pad tokens;
    ``ZOO[name].build()``: the PEFT-comparison table, with ``ZOO[name].inputs()``;
    ``llama_wide()``: hidden size 32, default attention (rank and compile tests);
    ``saved_model(arch, vocab_size)``: the CLI tests' models, saved beside a tokenizer.
  plain torch (``zoo.torch_models``): ``toy()`` (one layer of every kind lorakit adapts, targets
  ``TOY_TARGETS``), ``tiny()`` (Embedding → Linear → ReLU → Linear), ``Shared`` (a module at two
  paths, tied weights), ``MLP`` (Embedding, Conv2d, Linear), ``conv_groups()`` (grouped Conv2d and
  Conv1d between Linears), ``attention()`` (``nn.MultiheadAttention`` → Linear),
  ``fake_engine(name)`` (a wrapper named like a distributed engine).
  single LoRA layers (``zoo.layers``): ``lora_layer(kind)`` for each of ``LAYER_KINDS`` with its
  input, ``add_adapter(layer)``.
Inputs and outputs (``zoo.inputs``)
  ``ids()`` for the unit models, ``tiny_inputs()``, ``text_inputs()``, ``choice_inputs()``,
  ``image_inputs()``, ``speech_inputs()`` and ``labels_for(task)`` for the task models; ``logits()``,
  ``main_output()``, ``output_tensors()``.
State (``zoo.state``)
  ``snapshot()`` / ``assert_same_state()`` (every tensor), ``snapshot_all()`` / ``assert_unchanged()``
  (structure, tensors and requires_grad flags), ``structure()``, ``perturb_trainable()``.
"""

from zoo.entries import ZOO, ZooEntry
from zoo.inputs import (
    BATCH,
    choice_inputs,
    ids,
    image_inputs,
    labels_for,
    logits,
    main_output,
    output_tensors,
    speech_inputs,
    text_inputs,
    tiny_inputs,
)
from zoo.layers import LAYER_KINDS, add_adapter, lora_layer
from zoo.state import (
    assert_same_state,
    assert_unchanged,
    perturb_trainable,
    snapshot,
    snapshot_all,
    structure,
)
from zoo.torch_models import (
    MLP,
    TOY_TARGETS,
    Attention,
    ConvGroups,
    Shared,
    Tiny,
    Toy,
    attention,
    conv_groups,
    fake_engine,
    tiny,
    toy,
)
from zoo.transformers_models import (
    ARCHS,
    MODELS,
    SMALL_VOCAB,
    VOCAB,
    bert_cls,
    build,
    config,
    gpt2,
    llama,
    llama_wide,
    model_class,
    saved_model,
    task_model,
)

__all__ = [
    "ARCHS",
    "Attention",
    "ConvGroups",
    "BATCH",
    "LAYER_KINDS",
    "MLP",
    "MODELS",
    "SMALL_VOCAB",
    "TOY_TARGETS",
    "VOCAB",
    "ZOO",
    "Shared",
    "Tiny",
    "Toy",
    "ZooEntry",
    "add_adapter",
    "assert_same_state",
    "assert_unchanged",
    "attention",
    "bert_cls",
    "build",
    "choice_inputs",
    "config",
    "conv_groups",
    "fake_engine",
    "gpt2",
    "ids",
    "image_inputs",
    "labels_for",
    "llama",
    "llama_wide",
    "logits",
    "lora_layer",
    "main_output",
    "model_class",
    "output_tensors",
    "perturb_trainable",
    "saved_model",
    "snapshot",
    "snapshot_all",
    "speech_inputs",
    "structure",
    "task_model",
    "text_inputs",
    "tiny",
    "tiny_inputs",
    "toy",
]

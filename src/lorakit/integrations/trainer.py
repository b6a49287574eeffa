"""``transformers.Trainer`` checkpoints that hold only the adapter (and head), in PEFT's format.

Why a Trainer subclass is needed: ``Trainer._save`` calls ``save_pretrained`` only on models that
are ``isinstance`` of transformers' ``PreTrainedModel`` or of ``peft.PeftModel``; any other module
gets its *full* ``state_dict`` written to ``model.safetensors`` (which even fails on tied weights,
e.g. GPT-2's ``wte`` / ``lm_head``), and ``Trainer._load_from_checkpoint`` only reads adapter
files for ``peft.PeftModel``. Neither check has a hook, so lorakit overrides exactly those three
methods, for lorakit models only::

    from lorakit.integrations.trainer import LorakitTrainer   # instead of transformers.Trainer
    trainer = LorakitTrainer(model=peft_model, args=args, train_dataset=data)

or, for another Trainer subclass (e.g. TRL's ``SFTTrainer``)::

    class MyTrainer(AdapterCheckpointsMixin, SFTTrainer): ...

A checkpoint directory then holds ``adapter_model.safetensors`` + ``adapter_config.json`` (one
sub-folder per non-default adapter, as PEFT) beside the optimizer, scheduler and RNG states, and
``trainer.train(resume_from_checkpoint=...)`` continues from it. This module imports transformers;
``import lorakit`` does not import this module.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import nn

from lorakit.persistence.loading import load_weights
from lorakit.wrapper.peft_model import PeftModel

__all__ = ["AdapterCheckpointsMixin", "LorakitTrainer", "save_adapters", "load_adapters"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' file name for the pickled TrainingArguments


def save_adapters(model: PeftModel, directory: str) -> None:
    """Write every adapter of ``model`` to ``directory`` in PEFT's layout (``save_pretrained``:
    validated, atomic, other checkpoint files kept)."""
    model.save_pretrained(directory)


def load_adapters(model: PeftModel, directory: str) -> None:
    """Load every adapter of ``model`` that ``directory`` holds (all of them must be there)."""
    for name in model.peft_config:
        load_weights(model.get_base_model(), directory, name, subfolder=None if name == "default" else name)


class AdapterCheckpointsMixin:
    """Trainer methods that save and load a lorakit model's adapters instead of its full weights.

    Put it before the Trainer class in the bases. For a model that is not a lorakit ``PeftModel``
    every method defers to the Trainer unchanged.
    """

    def _lorakit_model(self) -> PeftModel | None:
        trainer: Any = self
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        trainer: Any = self
        model = self._lorakit_model()
        if model is None:
            super()._save(output_dir, state_dict)  # type: ignore[misc]
            return
        if not trainer.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(model, output_dir)  # the live adapter tensors (a gathered state_dict is not needed)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if isinstance(model, PeftModel) else self._lorakit_model()
        if target is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        load_adapters(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        trainer: Any = self
        model = self._lorakit_model()
        if model is None:
            super()._load_best_model()  # type: ignore[misc]
            return
        load_adapters(model, trainer.state.best_model_checkpoint)


class LorakitTrainer(AdapterCheckpointsMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints of a lorakit model hold only the adapter (and head)."""

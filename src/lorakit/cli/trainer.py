"""The training loop: transformers' ``Trainer``, so ``torchrun`` and ``accelerate launch`` just work.

Two small adjustments, nothing re-implemented: checkpoints hold only the trainable parameters (the
adapter and the trained head, not the frozen base), and the progress bar shows the latest loss and
evaluation metric as its postfix instead of printing a dict per log line.
"""

from __future__ import annotations

import os
from typing import Any

from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import Task, argmax_logits, classification_metrics, collator

__all__ = ["build_trainer", "last_checkpoint"]

CHECKPOINTS = "checkpoints"


def _trainer_classes() -> tuple[type, type]:
    """(AdapterTrainer, BarCallback), defined lazily so that ``lorakit --help`` stays fast."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class AdapterTrainer(Trainer):
        """A ``Trainer`` whose checkpoints keep only what training changes."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            model = self.accelerator.unwrap_model(self.model)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            state_dict = {k: v for k, v in (state_dict or model.state_dict()).items() if k in trainable}
            super()._save(output_dir, state_dict=state_dict)

        def _issue_warnings_after_load(self, load_result: Any) -> None:
            # Resuming loads a partial state dict by design: the frozen base is "missing".
            if load_result.unexpected_keys:
                raise RuntimeError(f"checkpoint holds unknown keys: {load_result.unexpected_keys[:5]}")

    class BarCallback(ProgressCallback):
        """Trainer's progress bar (rate, ETA), with the latest loss and metric as its postfix."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not (state.is_world_process_zero and self.training_bar is not None and logs):
                return
            shown = {k.removeprefix("eval_"): f"{v:.4g}" for k, v in logs.items()
                     if k in ("loss", "eval_loss", "eval_accuracy") and isinstance(v, (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=True)

    return AdapterTrainer, BarCallback


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return bool(accelerator.is_available() if accelerator else torch.cuda.is_available())


def build_trainer(model: Any, tokenizer: Any, task: Task, train_set: list, eval_set: list,
                  settings: TrainSettings, out: str) -> Any:
    """A ``Trainer`` for ``model`` (a lorakit ``PeftModel``) writing checkpoints under ``out``."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    adapter_trainer, bar_callback = _trainer_classes()
    args = TrainingArguments(
        output_dir=os.path.join(out, CHECKPOINTS),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.lr,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding
        warmup_steps=settings.warmup_ratio,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if settings.eval_steps else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        seed=settings.seed,
        report_to="none",
        disable_tqdm=False,
        dataloader_pin_memory=False,
        use_cpu=not _has_accelerator(),  # on CPU, torchrun / accelerate launch then use gloo (DDP)
        label_names=["labels"],
    )
    classify = task.classifies
    trainer = adapter_trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator(task, tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics if classify else None,
        preprocess_logits_for_metrics=argmax_logits if classify else None,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(bar_callback())
    return trainer


def last_checkpoint(out: str) -> str | None:
    """The newest ``checkpoint-N`` folder under ``out``, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = os.path.join(out, CHECKPOINTS)
    return get_last_checkpoint(folder) if os.path.isdir(folder) else None

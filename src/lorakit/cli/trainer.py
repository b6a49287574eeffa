"""The training loop: transformers' ``Trainer``, so ``torchrun`` and ``accelerate launch`` just work.

The Trainer is lorakit's :class:`~lorakit.integrations.trainer.LorakitTrainer`, whose checkpoints
hold the adapter (and trained head) in PEFT's format rather than the frozen base. The one change
here: the progress bar shows the latest loss and evaluation metric as its postfix instead of
printing a dict per log line.
"""

from __future__ import annotations

import os
from typing import Any

from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import Task, argmax_logits, classification_metrics, collator

__all__ = ["build_trainer", "last_checkpoint"]

CHECKPOINTS = "checkpoints"


def _bar_callback() -> Any:
    """Trainer's progress bar (rate, ETA) with the latest loss and metric as its postfix; defined
    lazily so that ``lorakit --help`` does not import transformers."""
    from transformers.trainer_callback import ProgressCallback

    class BarCallback(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not (state.is_world_process_zero and self.training_bar is not None and logs):
                return
            shown = {
                k.removeprefix("eval_"): f"{v:.4g}"
                for k, v in logs.items()
                if k in ("loss", "eval_loss", "eval_accuracy") and isinstance(v, (int, float))
            }
            if shown:
                self.training_bar.set_postfix(shown, refresh=True)

    return BarCallback()


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return bool(accelerator.is_available() if accelerator else torch.cuda.is_available())


def build_trainer(
    model: Any, tokenizer: Any, task: Task, train_set: list, eval_set: list, settings: TrainSettings, out: str
) -> Any:
    """A ``Trainer`` for ``model`` (a lorakit ``PeftModel``) writing checkpoints under ``out``."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from lorakit.integrations.trainer import LorakitTrainer

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
    trainer = LorakitTrainer(
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
    trainer.add_callback(_bar_callback())
    return trainer


def last_checkpoint(out: str) -> str | None:
    """The newest ``checkpoint-N`` folder under ``out``, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = os.path.join(out, CHECKPOINTS)
    return get_last_checkpoint(folder) if os.path.isdir(folder) else None

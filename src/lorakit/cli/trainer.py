"""The training loop: transformers' ``Trainer``, so ``torchrun`` and ``accelerate launch`` just work.

Every knob of :class:`TrainSettings` maps onto ``TrainingArguments`` or one of transformers' own
callbacks (``EarlyStoppingCallback``, ``TensorBoardCallback``); nothing of the loop is re-implemented.
The Trainer is lorakit's :class:`~lorakit.integrations.trainer.LorakitTrainer`, whose checkpoints
hold the adapter (and trained head) in PEFT's format rather than the frozen base. The one change
to the display: the progress bar shows the latest training loss and evaluation metrics as its
postfix instead of printing a dict per log line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import Task, argmax_logits, classification_metrics, collator

__all__ = ["build_trainer", "last_checkpoint", "has_accelerator", "check_precision", "steps_end_on_ctrl_c"]

CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SHOWN = {"loss": "loss", "eval_loss": "eval_loss", "eval_accuracy": "eval_acc"}


def _bar_callback() -> Any:
    """Trainer's progress bar (rate, ETA) with the latest losses and metric as its postfix; defined
    lazily so that ``lorakit --help`` does not import transformers."""
    from transformers.trainer_callback import ProgressCallback

    class BarCallback(ProgressCallback):
        def __init__(self) -> None:
            super().__init__()
            self.shown: dict[str, str] = {}  # the latest value of each, kept across log lines

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if not (state.is_world_process_zero and self.training_bar is not None and logs):
                return
            new = {
                SHOWN[k]: f"{v:.4g}" for k, v in logs.items() if k in SHOWN and isinstance(v, (int, float))
            }
            if new:
                self.shown = {**self.shown, **new}
                self.training_bar.set_postfix(self.shown, refresh=True)

    return BarCallback()


@contextlib.contextmanager
def steps_end_on_ctrl_c(trainer: Any) -> Iterator[None]:
    """Within it, Ctrl-C ends ``trainer.train()`` between two optimizer steps: the signal handler
    only records the request and a callback raises ``KeyboardInterrupt`` at the next step's end, in
    lorakit's code. (Raised wherever the signal lands, the exception can be caught inside a library,
    and the run then went on to its last step, or it can cut a checkpoint being written.) A second
    Ctrl-C interrupts at once; the previous handler is back on leaving, however it is left."""
    from transformers.trainer_callback import TrainerCallback

    requested = threading.Event()

    class InterruptCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if requested.is_set():
                raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def request(signum: int, frame: Any) -> None:
        requested.set()
        signal.signal(signal.SIGINT, previous)

    callback = InterruptCallback()
    trainer.add_callback(callback)
    signal.signal(signal.SIGINT, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer.remove_callback(callback)


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return bool(accelerator.is_available() if accelerator else torch.cuda.is_available())


def check_precision(settings: TrainSettings) -> None:
    """fp16 autocast needs a GPU (the CPU has bf16 only): one line, before anything loads."""
    import torch

    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CliError("--mixed-precision fp16 needs a CUDA GPU; on this machine use bf16 or no")


def _tensorboard(out: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError as exc:
        raise CliError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=os.path.join(out, TENSORBOARD)))


def build_trainer(
    model: Any,
    tokenizer: Any,
    task: Task,
    train_set: list,
    eval_set: list,
    settings: TrainSettings,
    out: str,
    optimizer: Any = None,
) -> Any:
    """A ``Trainer`` for ``model`` (a lorakit ``PeftModel``) writing checkpoints under ``out``;
    ``optimizer`` (e.g. LoRA+'s) replaces the Trainer's AdamW, the scheduler stays the Trainer's."""
    from transformers import EarlyStoppingCallback, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from lorakit.integrations.trainer import LorakitTrainer

    s = settings
    evaluates = bool(s.eval_steps)
    patience = s.early_stopping_patience if evaluates else None
    stops_early = patience is not None
    args = TrainingArguments(
        output_dir=os.path.join(out, CHECKPOINTS),
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.lr,
        weight_decay=s.weight_decay,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
        num_train_epochs=s.epochs,
        max_steps=s.max_steps or -1,
        bf16=s.mixed_precision == "bf16",
        fp16=s.mixed_precision == "fp16",
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding
        logging_steps=s.logging_steps,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=s.eval_steps or None,
        save_strategy="steps",
        save_steps=s.eval_steps
        if stops_early and s.eval_steps
        else s.save_steps,  # best-model tracking needs both aligned
        save_total_limit=2 if stops_early else 1,
        load_best_model_at_end=stops_early,
        metric_for_best_model=("accuracy" if task.classifies else "loss") if stops_early else None,
        greater_is_better=task.classifies if stops_early else None,
        seed=s.seed,
        report_to="none",
        disable_tqdm=False,
        dataloader_pin_memory=False,
        use_cpu=not has_accelerator(),  # on CPU, torchrun / accelerate launch then use gloo (DDP)
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
        optimizers=(optimizer, None),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_bar_callback())
    if patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=patience))
    if s.tensorboard and trainer.is_world_process_zero():
        trainer.add_callback(_tensorboard(out))
    return trainer


COMPLETE = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")


def last_checkpoint(out: str) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder under ``out``, if any: a run interrupted while
    it wrote a checkpoint leaves a partial folder, which a resume must pass over."""
    folder = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(folder):
        return None
    steps = [int(n.split("-", 1)[1]) for n in os.listdir(folder) if re.fullmatch(r"checkpoint-\d+", n)]
    for step in sorted(steps, reverse=True):
        path = os.path.join(folder, f"checkpoint-{step}")
        if all(os.path.isfile(os.path.join(path, name)) for name in COMPLETE):
            return path
    return None

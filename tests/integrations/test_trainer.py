"""transformers.Trainer on a lorakit model: it trains, its checkpoints hold only the adapter (plus the
head) in PEFT's format, PEFT itself loads them, and resuming from one continues the same run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from zoo import labels_for, task_model, text_inputs

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.integrations.trainer import LorakitTrainer

STEPS = 4


def _model(task: str) -> lorakit.PeftModel:
    arch, head = {"SEQ_CLS": ("bert", "ForSequenceClassification"), "CAUSAL_LM": ("gpt2", "LMHeadModel")}[
        task
    ]
    torch.manual_seed(100)
    return get_peft_model(task_model(arch, head), LoraConfig(task_type=task, r=4, lora_alpha=8))


def _dataset(task: str) -> list[dict[str, torch.Tensor]]:
    """Four rows, with an extra string column that the Trainer must drop (not in forward's signature)."""
    rows = []
    for seed in range(2):
        inputs, labels = text_inputs(seed=seed + 1), labels_for(task, seed=seed + 2)
        for i in range(2):
            rows.append({**{k: v[i] for k, v in {**inputs, **labels}.items()}, "text": "not a tensor"})
    return rows


def _trainer(
    model: lorakit.PeftModel, task: str, out: Path, evaluate: bool = False, **kwargs
) -> LorakitTrainer:
    args = transformers.TrainingArguments(
        str(out),
        max_steps=STEPS,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        **kwargs,
    )
    return LorakitTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(task),
        eval_dataset=_dataset(task) if evaluate else None,
    )


def _adapter_state(model: lorakit.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(model).items()}


def _trained_checkpoint_state(task: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Train, check the last checkpoint holds exactly the trained adapter state in PEFT's format, and
    return that state."""
    model = _model(task)
    before = _adapter_state(model)
    _trainer(model, task, tmp_path).train()
    after = _adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if ".lora_A." in k or "classifier" in k)

    ckpt = tmp_path / f"checkpoint-{STEPS}"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not any(f.startswith(("model.safetensors", "pytorch_model")) for f in files)
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(after)
        for key in after:
            torch.testing.assert_close(f.get_tensor(key), after[key], rtol=0, atol=0)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == task
    return after


def test_seq_cls_checkpoints_hold_the_adapter_and_the_head_in_peft_format(tmp_path: Path) -> None:
    after = _trained_checkpoint_state("SEQ_CLS", tmp_path)
    assert "base_model.model.classifier.weight" in after


def test_causal_lm_checkpoints_hold_only_the_adapter_in_peft_format(tmp_path: Path) -> None:
    _trained_checkpoint_state("CAUSAL_LM", tmp_path)


@pytest.mark.parity
def test_real_peft_loads_a_trainer_checkpoint(tmp_path: Path) -> None:
    model = _model("SEQ_CLS")
    _trainer(model, "SEQ_CLS", tmp_path).train()
    model.eval()
    inputs = text_inputs(seed=9)
    expected = model(**inputs).logits
    reference = peft.PeftModel.from_pretrained(
        task_model("bert", "ForSequenceClassification"), str(tmp_path / f"checkpoint-{STEPS}")
    ).eval()
    torch.testing.assert_close(reference(**inputs).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM"])
def test_resuming_from_a_checkpoint_continues_training(task: str, tmp_path: Path) -> None:
    straight = _model(task)
    _trainer(straight, task, tmp_path / "straight").train()

    resumed = _model(task)  # the same start; its trainer resumes half way from the first run's files
    trainer = _trainer(resumed, task, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    expected, got = _adapter_state(straight), _adapter_state(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_trainer_keeps_the_columns_forward_names() -> None:
    trainer = _trainer(_model("SEQ_CLS"), "SEQ_CLS", Path("unused"))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]


def test_trainer_asks_the_base_model_about_loss_kwargs() -> None:
    model = _model("CAUSAL_LM")
    trainer = _trainer(model, "CAUSAL_LM", Path("unused"))
    plain = transformers.Trainer(model=task_model("gpt2", "LMHeadModel"), args=trainer.args)
    assert trainer.model_accepts_loss_kwargs == plain.model_accepts_loss_kwargs


def test_trainer_with_activation_checkpointing_trains_the_adapter(tmp_path: Path) -> None:
    model = _model("CAUSAL_LM")
    before = _adapter_state(model)
    trainer = _trainer(
        model,
        "CAUSAL_LM",
        tmp_path,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer.train()
    assert model.is_activation_checkpointing
    after = _adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path: Path) -> None:
    model = _model("SEQ_CLS")
    trainer = _trainer(
        model,
        "SEQ_CLS",
        tmp_path,
        evaluate=True,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    with torch.no_grad():  # move away from the best weights; loading them must come back exactly
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    trainer._load_best_model()
    with safe_open(str(best / "adapter_model.safetensors"), "pt") as f:
        for key, value in _adapter_state(model).items():
            torch.testing.assert_close(value, f.get_tensor(key), rtol=0, atol=0)

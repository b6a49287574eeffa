"""Every task type on tiny random transformers models: the right wrapper, the head trained and saved,
a training step that moves only adapter and head weights, and generation equal to the merged model."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn
from zoo import (
    BATCH,
    choice_inputs,
    image_inputs,
    labels_for,
    speech_inputs,
    task_model,
    text_inputs,
)

import lorakit
from lorakit import LoraConfig, TaskType, get_peft_model
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    head: str  # the transformers class suffix, e.g. "ForSequenceClassification"
    task: str
    wrapper: str
    inputs: Callable[[], dict[str, torch.Tensor]] = text_inputs
    saved_head: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.task}-{self.arch}"


HEAD_CASES = [
    Case(
        "bert",
        "ForSequenceClassification",
        "SEQ_CLS",
        "PeftModelForSequenceClassification",
        saved_head=("classifier",),
    ),
    Case(
        "roberta",
        "ForSequenceClassification",
        "SEQ_CLS",
        "PeftModelForSequenceClassification",
        saved_head=("classifier",),
    ),
    Case(
        "llama",
        "ForSequenceClassification",
        "SEQ_CLS",
        "PeftModelForSequenceClassification",
        saved_head=("score",),
    ),
    Case(
        "gpt2",
        "ForSequenceClassification",
        "SEQ_CLS",
        "PeftModelForSequenceClassification",
        saved_head=("score",),
    ),
    Case(
        "bert",
        "ForTokenClassification",
        "TOKEN_CLS",
        "PeftModelForTokenClassification",
        saved_head=("classifier",),
    ),
    Case(
        "roberta",
        "ForTokenClassification",
        "TOKEN_CLS",
        "PeftModelForTokenClassification",
        saved_head=("classifier",),
    ),
    Case(
        "bert",
        "ForQuestionAnswering",
        "QUESTION_ANS",
        "PeftModelForQuestionAnswering",
        saved_head=("qa_outputs",),
    ),
    Case(
        "roberta",
        "ForQuestionAnswering",
        "QUESTION_ANS",
        "PeftModelForQuestionAnswering",
        saved_head=("qa_outputs",),
    ),
    Case(
        "bert",
        "ForMultipleChoice",
        "MULTIPLE_CHOICE",
        "PeftModelForMultipleChoice",
        choice_inputs,
        saved_head=("classifier",),
    ),
    Case(
        "roberta",
        "ForMultipleChoice",
        "MULTIPLE_CHOICE",
        "PeftModelForMultipleChoice",
        choice_inputs,
        saved_head=("classifier",),
    ),
    Case(
        "vit",
        "ForImageClassification",
        "IMAGE_CLASSIFICATION",
        "PeftModelForImageClassification",
        image_inputs,
        saved_head=("classifier",),
    ),
]
GEN_CASES = [
    Case("gpt2", "LMHeadModel", "CAUSAL_LM", "PeftModelForCausalLM"),
    Case("llama", "ForCausalLM", "CAUSAL_LM", "PeftModelForCausalLM"),
    Case("mistral", "ForCausalLM", "CAUSAL_LM", "PeftModelForCausalLM"),
    Case("t5", "ForConditionalGeneration", "SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"),
    Case("bart", "ForConditionalGeneration", "SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"),
    Case("t5", "ForConditionalGeneration", "TRANSLATION", "PeftModelForTranslation"),
    Case("bart", "ForConditionalGeneration", "TRANSLATION", "PeftModelForTranslation"),
    Case(
        "whisper", "ForConditionalGeneration", "SPEECH_SEQ_2_SEQ", "PeftModelForSpeechSeq2Seq", speech_inputs
    ),
]
OTHER_CASES = [
    Case("bert", "Model", "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
    Case("llama", "Model", "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
]
ALL_CASES = HEAD_CASES + GEN_CASES + OTHER_CASES


def _peft(case: Case, seed: int = 0, **kwargs) -> lorakit.PeftModel:
    torch.manual_seed(seed + 100)
    config = LoraConfig(task_type=case.task, r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    return get_peft_model(task_model(case.arch, case.head, seed=seed), config)


def _main(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_wrapper_class_and_saved_head(case: Case) -> None:
    model = _peft(case)
    assert type(model).__name__ == case.wrapper
    assert list(model.peft_config["default"].modules_to_save or []) == list(case.saved_head)
    for name in case.saved_head:
        assert isinstance(getattr(model.get_base_model(), name), ModulesToSaveWrapper)


def _adapter_or_head(name: str) -> bool:
    parts = name.split(".")
    return "modules_to_save" in parts or any(p in LoraLayer.adapter_param_names for p in parts)


@pytest.mark.parametrize("case", HEAD_CASES + GEN_CASES, ids=lambda c: c.id)
def test_training_step_moves_only_adapter_and_head(case: Case) -> None:
    model = _peft(case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(_adapter_or_head(n) for n in trainable)
    assert any("modules_to_save" in n for n in trainable) == bool(case.saved_head)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**case.inputs(), **labels_for(case.task)).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: c.id)
def test_head_is_saved_and_reloads_to_identical_outputs(case: Case) -> None:
    model = _peft(case)
    with torch.no_grad():  # a trained head: different from the freshly initialised one
        for name in case.saved_head:
            for p in getattr(model.get_base_model(), name).modules_to_save["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    state = lorakit.get_peft_model_state_dict(model)
    for name in case.saved_head:
        assert any(k.startswith(f"base_model.model.{name}.") and "modules_to_save" not in k for k in state)
    model.eval()
    expected = _main(model(**case.inputs()))

    fresh = _peft(case, seed=0)  # same base weights, other adapter and head draws
    torch.manual_seed(7)
    for p in fresh.parameters():
        if p.requires_grad:
            p.data.normal_()
    fresh.eval()
    assert not torch.allclose(_main(fresh(**case.inputs())), expected)
    lorakit.set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(_main(fresh(**case.inputs())), expected, rtol=0, atol=0)


def _greedy(model: nn.Module, case: Case, **kwargs) -> torch.Tensor:
    # min_new_tokens: a random tiny model may emit EOS at once, which would prove nothing
    return model.generate(**case.inputs(), max_new_tokens=5, min_new_tokens=5, do_sample=False, **kwargs)


@pytest.mark.parametrize("case", GEN_CASES, ids=lambda c: c.id)
def test_generate_with_adapter_equals_merged_model(case: Case) -> None:
    model = _peft(case)
    model.eval()
    with_adapter = _greedy(model, case)
    with model.disable_adapter():
        base = _greedy(model, case)
    assert not torch.equal(with_adapter, base), "the adapter should change the generations"
    mixed = _greedy(model, case, adapter_names=["default", "__base__"])
    assert torch.equal(mixed[0], with_adapter[0]) and torch.equal(mixed[1], base[1])
    merged = model.merge_and_unload()
    assert torch.equal(_greedy(merged, case), with_adapter)


def test_speech_model_names_its_input() -> None:
    case = GEN_CASES[-1]
    model = _peft(case)
    with pytest.raises(ConfigError, match="input_features"):
        model.generate(input_ids=torch.ones(BATCH, 3, dtype=torch.long), max_new_tokens=2)
    positional = model.generate(case.inputs()["input_features"], max_new_tokens=3, do_sample=False)
    assert torch.equal(positional, model.generate(**case.inputs(), max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("case", OTHER_CASES, ids=lambda c: c.id)
def test_feature_extraction_returns_hidden_states(case: Case) -> None:
    model = _peft(case).eval()
    hidden = model(**case.inputs()).last_hidden_state
    assert hidden.shape == (BATCH, case.inputs()["input_ids"].shape[1], 16)
    with model.disable_adapter():
        assert not torch.allclose(model(**case.inputs()).last_hidden_state, hidden)


@pytest.mark.parametrize("task", [None, "OTHER"])
def test_other_task_works_on_any_module(task: str | None) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = get_peft_model(net, LoraConfig(task_type=task, target_modules=["0", "2"]))
    assert type(model) is lorakit.PeftModel
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_forward_signature_names_inputs_and_labels(case: Case) -> None:
    """transformers.Trainer keeps only dataset columns named in forward's signature."""
    params = inspect.signature(_peft(case).forward).parameters
    for name in [*case.inputs(), *({} if case.task == "FEATURE_EXTRACTION" else labels_for(case.task))]:
        assert name in params, name
    assert "adapter_names" in params


def test_question_answering_alias_builds_the_same_wrapper() -> None:
    model = get_peft_model(
        task_model("bert", "ForQuestionAnswering"), LoraConfig(task_type=TaskType.QUESTION_ANSWERING)
    )
    assert type(model).__name__ == "PeftModelForQuestionAnswering"
    assert model.peft_config["default"].task_type is TaskType.QUESTION_ANS


def test_head_task_without_head_is_accepted_with_a_warning_naming_the_modules() -> None:
    """As PEFT, a classification wrapper takes a model without a head (only LoRA trains)."""
    with pytest.warns(UserWarning, match=r"no head was found.*embeddings, encoder"):
        model = get_peft_model(task_model("bert", "Model"), LoraConfig(task_type="SEQ_CLS"))
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    assert model.peft_config["default"].modules_to_save in (None, [])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }


def test_user_modules_to_save_are_kept_beside_the_head() -> None:
    model = get_peft_model(
        task_model("bert", "ForSequenceClassification"),
        LoraConfig(task_type="SEQ_CLS", modules_to_save=["pooler"]),
    )
    assert model.peft_config["default"].modules_to_save == ["pooler", "classifier"]


@pytest.mark.parametrize("case", [HEAD_CASES[0], HEAD_CASES[10]], ids=lambda c: c.id)
def test_mixed_batch_forward_uses_each_rows_adapter_and_head(case: Case) -> None:
    model = _peft(case).eval()
    with torch.no_grad():
        for name in case.saved_head:
            for p in getattr(model.get_base_model(), name).modules_to_save["default"].parameters():
                p.add_(0.1)
    adapted = _main(model(**case.inputs()))
    with model.disable_adapter():
        base = _main(model(**case.inputs()))
    mixed = _main(model(**case.inputs(), adapter_names=["__base__", "default"]))
    torch.testing.assert_close(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], adapted[1])


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: c.id)
def test_all_linear_leaves_the_head_to_modules_to_save(case: Case) -> None:
    """(PEFT 0.21 puts LoRA into ``qa_outputs`` / a token classifier here, then fails to wrap it.)"""
    model = get_peft_model(
        task_model(case.arch, case.head), LoraConfig(task_type=case.task, target_modules="all-linear")
    )
    for name in case.saved_head:
        head = getattr(model.get_base_model(), name)
        assert isinstance(head, ModulesToSaveWrapper)
        assert not any(isinstance(m, LoraLayer) for m in head.modules())
    assert any(isinstance(m, LoraLayer) for m in model.modules())


def test_added_adapter_gets_its_own_head() -> None:
    case = HEAD_CASES[0]
    model = _peft(case).eval()
    model.add_adapter("other", LoraConfig(task_type="SEQ_CLS", init_lora_weights=False))
    assert model.peft_config["other"].modules_to_save == ["classifier"]
    head = model.get_base_model().classifier
    assert set(head.modules_to_save) == {"default", "other"}
    first = _main(model(**case.inputs()))
    with torch.no_grad():
        head.modules_to_save["other"].weight.add_(0.1)
    model.set_adapter("other")
    assert not torch.allclose(_main(model(**case.inputs())), first)


def test_mixed_batch_generate_with_beams() -> None:
    """generate repeats each prompt row per beam; each repeat keeps its row's adapter."""
    case = GEN_CASES[1]  # llama
    model = _peft(case).eval()
    with_adapter = _greedy(model, case, num_beams=2)
    with model.disable_adapter():
        base = _greedy(model, case, num_beams=2)
    assert not torch.equal(with_adapter, base)
    mixed = _greedy(model, case, num_beams=2, adapter_names=["default", "__base__"])
    assert torch.equal(mixed[0], with_adapter[0]) and torch.equal(mixed[1], base[1])

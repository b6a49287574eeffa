"""One ``PeftModel`` subclass per task type (design §2), registered with ``get_peft_model``.

=========================  ==================================  ======================================
task type                  wrapper                             what it adds to ``PeftModel``
=========================  ==================================  ======================================
SEQ_CLS                    PeftModelForSequenceClassification  head trained and saved
TOKEN_CLS                  PeftModelForTokenClassification     head trained and saved
QUESTION_ANS (_ANSWERING)  PeftModelForQuestionAnswering       head trained and saved
MULTIPLE_CHOICE            PeftModelForMultipleChoice          head trained and saved
IMAGE_CLASSIFICATION       PeftModelForImageClassification     head trained and saved
CAUSAL_LM                  PeftModelForCausalLM                ``generate`` (+ ``adapter_names``)
SEQ_2_SEQ_LM               PeftModelForSeq2SeqLM               ``generate`` (+ ``adapter_names``)
TRANSLATION                PeftModelForTranslation             the same, saved as SEQ_2_SEQ_LM for PEFT
SPEECH_SEQ_2_SEQ           PeftModelForSpeechSeq2Seq           ``generate(input_features=...)``
FEATURE_EXTRACTION         PeftModelForFeatureExtraction       returns the base model's hidden states
OTHER / None               PeftModel                           any ``nn.Module``
=========================  ==================================  ======================================

Each ``forward`` has a real signature naming the task's inputs and labels, because
``transformers.Trainer`` reads it to decide which dataset columns to keep and which are labels. The
arguments are passed on by name, ``None`` ones dropped (the base model's default), with
``adapter_names`` for mixed batches. Nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.errors import ConfigError
from lorakit.integrations import gradient_checkpointing as checkpointing
from lorakit.integrations.heads import HEAD_TASKS, head_modules_to_save
from lorakit.wrapper.peft_model import PeftModel, register_task_model

__all__ = [
    "TaskPeftModel",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForMultipleChoice",
    "PeftModelForImageClassification",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForTranslation",
    "PeftModelForSpeechSeq2Seq",
    "PeftModelForFeatureExtraction",
    "TASK_MODELS",
]


class TaskPeftModel(PeftModel):
    """What every transformers task wrapper shares: the head as ``modules_to_save`` (for the head
    tasks), forwarding by name, and gradient checkpointing that works with frozen embeddings."""

    task_type: ClassVar[TaskType]

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
        super().__init__(
            model,
            self._with_head(model, peft_config),
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    def _with_head(self, model: nn.Module, peft_config: LoraConfig) -> LoraConfig:
        """For a head task, the config with the model's head added to ``modules_to_save``."""
        if self.task_type not in HEAD_TASKS:
            return peft_config
        heads = head_modules_to_save(model, self.task_type, peft_config.modules_to_save)
        return dataclasses.replace(peft_config, modules_to_save=heads)

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add another adapter, with its own copy of the head (as PEFT)."""
        super().add_adapter(
            adapter_name,
            self._with_head(self.get_base_model(), peft_config),
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )

    def _run(self, adapter_names: Sequence[str] | None, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        """Call the base model with the named arguments that are set, plus ``kwargs``."""
        inputs = {k: v for k, v in named.items() if v is not None}
        return super().forward(adapter_names=adapter_names, **inputs, **kwargs)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the base model's loss takes ``num_items_in_batch`` (transformers.Trainer asks, to
        scale the loss correctly under gradient accumulation): the base model's answer."""
        base = self.get_base_model()
        flag = getattr(base, "accepts_loss_kwargs", None)
        if flag is None:
            params = inspect.signature(base.forward).parameters.values()
            flag = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        return bool(flag)

    # -- gradient checkpointing (see lorakit.integrations.checkpointing) --------------------------
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Recompute activations in the backward pass; LoRA weights still get their gradients when
        the embeddings are frozen, in both reentrant and non-reentrant modes."""
        checkpointing.enable(self.get_base_model(), activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        checkpointing.enable(self.get_base_model(), gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        checkpointing.disable(self.get_base_model())

    def gradient_checkpointing_disable(self) -> None:
        checkpointing.disable(self.get_base_model())

    @property
    def is_activation_checkpointing(self) -> bool:
        return checkpointing.is_enabled(self.get_base_model())

    @property
    def is_gradient_checkpointing(self) -> bool:
        return checkpointing.is_enabled(self.get_base_model())


class _EncoderClassifier(TaskPeftModel):
    """Text classification over tokens or sequences; ``labels`` as the base model defines them."""

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        position_ids: Any = None,
        inputs_embeds: Any = None,
        labels: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``input_ids`` (B, S) — (B, C, S) for multiple choice — and ``labels`` as the base model
        expects them: (B,) for sequence classification / multiple choice, (B, S) for tokens."""
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForSequenceClassification(_EncoderClassifier):
    """Sequence classification (``SEQ_CLS``): logits (B, num_labels); the head is trained and saved."""

    task_type = TaskType.SEQ_CLS


class PeftModelForTokenClassification(_EncoderClassifier):
    """Token classification (``TOKEN_CLS``): logits (B, S, num_labels); the head is trained and saved."""

    task_type = TaskType.TOKEN_CLS


class PeftModelForMultipleChoice(_EncoderClassifier):
    """Multiple choice (``MULTIPLE_CHOICE``): ``input_ids`` (B, C, S) → logits (B, C)."""

    task_type = TaskType.MULTIPLE_CHOICE


class PeftModelForQuestionAnswering(TaskPeftModel):
    """Extractive QA (``QUESTION_ANS``): start and end logits (B, S); the head is trained and saved."""

    task_type = TaskType.QUESTION_ANS

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        position_ids: Any = None,
        inputs_embeds: Any = None,
        start_positions: Any = None,
        end_positions: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``start_positions`` / ``end_positions`` (B,) are the labels."""
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            start_positions=start_positions,
            end_positions=end_positions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForImageClassification(TaskPeftModel):
    """Image classification: ``pixel_values`` (B, C, H, W) → logits (B, num_labels)."""

    task_type = TaskType.IMAGE_CLASSIFICATION

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        pixel_values: Any = None,
        labels: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            pixel_values=pixel_values,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForFeatureExtraction(TaskPeftModel):
    """The backbone's outputs (``last_hidden_state`` (B, S, H), ...), with the adapter applied."""

    task_type = TaskType.FEATURE_EXTRACTION

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        position_ids: Any = None,
        inputs_embeds: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForCausalLM(TaskPeftModel):
    """Decoder-only LM: logits (B, S, V); ``generate`` runs with the active adapter(s), or with
    ``adapter_names`` (one per prompt row, ``"__base__"`` for none) for a mixed batch."""

    task_type = TaskType.CAUSAL_LM

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Any = None,
        inputs_embeds: Any = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``labels`` (B, S) are shifted inside the base model, as in transformers."""
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForSeq2SeqLM(TaskPeftModel):
    """Encoder-decoder LM (``SEQ_2_SEQ_LM``, ``TRANSLATION``): logits (B, T, V); ``generate`` as in
    :class:`PeftModelForCausalLM`."""

    task_type = TaskType.SEQ_2_SEQ_LM

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        inputs_embeds: Any = None,
        decoder_inputs_embeds: Any = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``labels`` (B, T); the base model derives ``decoder_input_ids`` from them when absent."""
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)


class PeftModelForTranslation(PeftModelForSeq2SeqLM):
    """``TRANSLATION``: a sequence-to-sequence LM (saved with its own task type)."""

    task_type = TaskType.TRANSLATION


class PeftModelForSpeechSeq2Seq(TaskPeftModel):
    """Speech-to-text (Whisper-style): ``input_features`` (B, mel bins, frames) in, tokens out."""

    task_type = TaskType.SPEECH_SEQ_2_SEQ

    def forward(  # type: ignore[override]  # a real signature for transformers.Trainer
        self,
        input_features: Any = None,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        decoder_inputs_embeds: Any = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        _check_speech_inputs(self, kwargs)
        named = dict(
            input_features=input_features,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(adapter_names, named, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``generate(input_features, ...)``: a positional first argument is the audio features."""
        _check_speech_inputs(self, kwargs)
        if args:
            kwargs = {"input_features": args[0], **kwargs}
            args = args[1:]
        return super().generate(*args, adapter_names=adapter_names, **kwargs)


def _check_speech_inputs(model: PeftModel, kwargs: dict[str, Any]) -> None:
    main = getattr(model.get_base_model(), "main_input_name", "input_features")
    if "input_ids" in kwargs and main != "input_ids":
        raise ConfigError(
            f"{type(model.get_base_model()).__name__} takes {main!r} (audio features, e.g. from a "
            f"WhisperFeatureExtractor), not 'input_ids'; decoder tokens go in 'decoder_input_ids'"
        )


TASK_MODELS: dict[TaskType, type[TaskPeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.MULTIPLE_CHOICE: PeftModelForMultipleChoice,
    TaskType.IMAGE_CLASSIFICATION: PeftModelForImageClassification,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.TRANSLATION: PeftModelForTranslation,
    TaskType.SPEECH_SEQ_2_SEQ: PeftModelForSpeechSeq2Seq,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}

for _task, _cls in TASK_MODELS.items():
    register_task_model(_task, _cls)

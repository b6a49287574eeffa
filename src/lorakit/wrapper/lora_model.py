"""``LoraModel``: PEFT's tuner object, the ``base_model`` of a ``PeftModel``, over lorakit's parts.

It holds the user's model as ``model`` (so parameter names read as PEFT's,
``base_model.model.<path>.lora_A.<adapter>.weight``) and the configs by adapter name as
``peft_config``. Its methods are PEFT's ``LoraModel`` / ``BaseTuner`` API; each delegates to
:mod:`lorakit.model.injection` (structure) or :mod:`lorakit.model.state` (adapter state). Attributes
it does not have are read from ``model`` (``lora_model.lin0``, ``lora_model.config``), with a guard
that makes the lookup impossible to recurse.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, ConfigError, RequantizationWarning
from lorakit.layers import LoraLayer
from lorakit.model import arithmetic, injection, state

__all__ = ["LoraModel", "check_new_config", "PREFIX"]

# PEFT's parameter-name marker of LoRA tensors (``lora_A``, ``lora_embedding_B``, ...).
PREFIX = "lora_"


def check_new_config(configs: Mapping[str, LoraConfig], config: LoraConfig, adapter_name: str) -> None:
    """What PEFT refuses or warns about when an adapter joins others (checked before any change):
    an existing name, a second adapter with a trainable bias, and PiSSA/OLoRA beside other adapters
    (they change the base weights the others were trained on)."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(config).__name__}")
    if adapter_name in configs:
        raise AdapterError(
            f"Adapter with name '{adapter_name}' already exists (existing adapters: {list(configs)}); "
            "choose another name or delete_adapter() it first"
        )
    with_bias = [n for n, c in configs.items() if c.bias != "none"]
    if config.bias != "none" and with_bias:
        raise AdapterError(
            f"LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' "
            f"for all adapters: adapter(s) {with_bias} already train biases, the new adapter "
            f"{adapter_name!r} has bias={config.bias!r}"
        )
    if configs:
        inits = [c.init_lora_weights for c in (config, *configs.values())]
        for kind in ("pissa", "olora"):
            if any(isinstance(i, str) and i.startswith(kind) for i in inits):
                warnings.warn(
                    f"{'PiSSA' if kind == 'pissa' else 'OLoRA'} changes the base weights of the model "
                    "and should thus not be used with other adapters. Consider converting it into a "
                    "normal LoRA adapter (save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=...))",
                    UserWarning,
                    stacklevel=4,
                )
                break


class LoraModel(nn.Module):
    """The model with LoRA layers in place, and PEFT's tuner API over it.

    ``LoraModel(model, config, adapter_name)`` injects ``config`` as ``adapter_name`` into
    ``model`` (active, trainable unless ``config.inference_mode``), as PEFT's does;
    ``peft_config`` may also be a mapping ``{adapter_name: config}``.
    """

    prefix: ClassVar[str] = PREFIX

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig | Mapping[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(peft_config, LoraConfig):
            config = peft_config
        elif isinstance(peft_config, Mapping) and isinstance(peft_config.get(adapter_name), LoraConfig):
            config = peft_config[adapter_name]
        else:
            raise ConfigError(
                f"peft_config must be a lorakit.LoraConfig or a mapping holding one under {adapter_name!r}, "
                f"got {type(peft_config).__name__}"
            )
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        # The adapted modules' names, each once, in the order adapters first targeted them (PEFT's).
        self.targeted_module_names: list[str] = []
        self.inject(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        if not autocast_adapter_dtype:
            state.place_adapter(model, adapter_name, autocast_dtype=False)
        state.set_active(model, adapter_name)
        if config.inference_mode:
            for param in model.parameters():
                param.requires_grad_(False)
        else:
            state.set_trainable(model, [adapter_name], bias=self.peft_config[adapter_name].bias)
        model.__dict__["peft_config"] = self.peft_config  # PEFT records the configs on the model too

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (``model``)
        except AttributeError:
            if name == "model":  # not initialised yet: never look further
                raise
        return getattr(self.model, name)

    # -- structure ------------------------------------------------------------------------------
    def inject(self, adapter_name: str, config: LoraConfig, *, low_cpu_mem_usage: bool = False) -> None:
        """Add ``config`` as adapter ``adapter_name`` (inactive; its parameters as created), after
        PEFT's checks against the adapters already present."""
        check_new_config(self.peft_config, config, adapter_name)
        self.peft_config[adapter_name] = injection.inject(
            self.model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )
        for name, module in injection.lora_modules(self.model):
            held = isinstance(module, LoraLayer) and module.has_adapter(adapter_name)
            if held and name not in self.targeted_module_names:
                self.targeted_module_names.append(name)
        if state.merged_adapters(self.model):
            # As PEFT (its injection re-applies set_adapter): a model gaining an adapter is unmerged,
            # so that every adapter is again separate from the base weights.
            warnings.warn(
                "Adapter cannot be set when the model is merged. Unmerging the model first.",
                UserWarning,
                stacklevel=3,
            )
            state.unmerge(self.model)

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Parameters adapted directly (PEFT's ``target_parameters``): none, lorakit adapts modules."""
        return []

    # -- which adapters act -----------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return state.active_adapters(self.model)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several, or none, are active)."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their updates add up); they become trainable and the
        other adapters frozen, unless ``inference_mode`` (all frozen). As PEFT, a merged model is
        unmerged first, with a warning."""
        state.set_adapter(self.model, adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch ``requires_grad`` of the given adapters' tensors (and modules-to-save copies)."""
        state.set_requires_grad(self.model, adapter_names, requires_grad)

    def disable_adapter_layers(self) -> None:
        """Every LoRA layer computes as its base layer until :meth:`enable_adapter_layers`."""
        for name in self.active_adapters:
            bias = self.peft_config[name].bias if name in self.peft_config else "none"
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                    "the same output as the base model would without adaption.",
                    UserWarning,
                    stacklevel=2,
                )
        state.enable_layers(self.model, False)

    def enable_adapter_layers(self) -> None:
        state.enable_layers(self.model, True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. The last one may go too (the LoRA layers then compute as their base
        layers; :meth:`unload` removes them). If the deleted adapter was the only active one, the
        first remaining adapter by name becomes active, with a warning, as in PEFT."""
        if adapter_name not in self.peft_config:
            raise AdapterError(
                f"Adapter {adapter_name} does not exist; existing adapters: {list(self.peft_config)}"
            )
        state.delete(self.model, adapter_name)
        del self.peft_config[adapter_name]

    # -- merging --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weights, exactly reversibly."""
        state.merge(self.model, adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every merged base weight bit for bit."""
        state.unmerge(self.model)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge, then return the model without any LoRA layer (for deployment); on a quantized
        base see :meth:`lorakit.PeftModel.merge_and_unload` (``requantize``)."""
        state.merge(self.model, adapter_names, safe_merge=safe_merge, keep_original=False)
        if not requantize:
            return self._unloaded(injection.unload(self.model, keep_merged=True))
        reports = injection.unload_requantized(self.model)
        if reports:
            worst = max(reports, key=lambda r: r.relative_error)
            mean = sum(r.relative_error for r in reports) / len(reports)
            warnings.warn(
                f"merge_and_unload(requantize=True) re-quantized {len(reports)} merged layer(s): the "
                f"weight error this caused is {mean:.2f}× the merged update ‖s·B·A‖ on average "
                f"(worst: {worst.name}, {worst.relative_error:.2f}×), so the model no longer computes "
                "what the adapter learned; merge_and_unload() without requantize keeps them exact",
                RequantizationWarning,
                stacklevel=3,
            )
        return self._unloaded(self.model)

    def unload(self) -> nn.Module:
        """Return the model with every LoRA layer removed and its original weights (see
        :meth:`lorakit.PeftModel.unload`)."""
        return self._unloaded(injection.unload(self.model, keep_merged=False))

    @staticmethod
    def _unloaded(model: nn.Module) -> nn.Module:
        """The plain model again: without the record of configs that LoRA put on it."""
        model.__dict__.pop("peft_config", None)
        return model

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        **kwargs: Any,
    ) -> None:
        """See :meth:`lorakit.PeftModel.add_weighted_adapter` (the new adapter is frozen)."""
        self.peft_config[adapter_name] = arithmetic.add_weighted_adapter(
            self.model, self.peft_config, adapters, weights, adapter_name, combination_type, **kwargs
        )
        for _, module in injection.lora_modules(self.model):
            for param in module.adapter_parameters(adapter_name):
                param.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

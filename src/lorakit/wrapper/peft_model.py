"""`PeftModel`: PEFT's model API over lorakit's parts, and `get_peft_model`.

The wrapper holds ``base_model`` (a :class:`LoraModel`) whose ``model`` is the user's model, so
parameter names read as PEFT's (``base_model.model.<path>.lora_A.default.weight``). Every
operation delegates to :mod:`lorakit.injection` (structure) or :mod:`lorakit.adapters` (state).
Attributes of the base model are forwarded one by one from an explicit list, never by a catch-all.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.distributed import group as distributed_group
from lorakit.errors import AdapterError, ConfigError, RequantizationWarning
from lorakit.layers.rows import BASE_ROWS, row_adapters
from lorakit.model import arithmetic, injection, state
from lorakit.persistence import adapter_dir

__all__ = ["PeftModel", "LoraModel", "get_peft_model", "inject_adapter_in_model", "register_task_model"]

# Base-model members a PEFT user reaches through the wrapper (transformers' Trainer and generate
# use several of them). Anything else: ``model.get_base_model().<name>``.
FORWARDED_ATTRIBUTES = (
    "config",
    "generation_config",
    "main_input_name",
    "name_or_path",
    "device",
    "dtype",
    "hf_device_map",
    "warnings_issued",
    "is_gradient_checkpointing",
    "supports_gradient_checkpointing",
    "can_generate",
    "get_input_embeddings",
    "get_output_embeddings",
    "resize_token_embeddings",
    "gradient_checkpointing_enable",
    "gradient_checkpointing_disable",
    "activation_checkpointing_enable",  # transformers >= 5 names (Trainer calls these)
    "activation_checkpointing_disable",
    "is_activation_checkpointing",
    "enable_input_require_grads",
    "disable_input_require_grads",
    "prepare_inputs_for_generation",
    "num_parameters",
)


def _forwarded(name: str) -> property:
    def get(self: PeftModel) -> Any:
        return getattr(self.get_base_model(), name)

    get.__doc__ = f"The base model's ``{name}``."
    return property(get)


class LoraModel(nn.Module):
    """The container between ``PeftModel`` and the user's model (PEFT's ``base_model``)."""

    def __init__(self, model: nn.Module, peft_config: dict[str, LoraConfig]) -> None:
        super().__init__()
        self.model = model
        self.peft_config = peft_config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or several (their updates add up), as PEFT's
        ``model.base_model.set_adapter([...])``; trainability is left unchanged."""
        state.set_active(self.model, adapter_name)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        **kwargs: Any,
    ) -> None:
        """See :meth:`PeftModel.add_weighted_adapter` (the new adapter is frozen)."""
        self.peft_config[adapter_name] = arithmetic.add_weighted_adapter(
            self.model, self.peft_config, adapters, weights, adapter_name, combination_type, **kwargs
        )
        for _, module in injection.lora_modules(self.model):
            for param in module.adapter_parameters(adapter_name):
                param.requires_grad_(False)


class PeftModel(nn.Module):
    """A model with LoRA adapters; PEFT's ``PeftModel`` API.

    ``model.peft_config`` maps adapter names to their (resolved) configs. One adapter is created by
    the constructor, made active and, unless ``inference_mode``, trainable.
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
        configs: dict[str, LoraConfig] = {}
        self.base_model = LoraModel(model, configs)
        self.training = self.base_model.training = model.training  # report the model's mode
        self.peft_config = configs
        configs[adapter_name] = injection.inject(model, peft_config, adapter_name)
        state.set_active(model, adapter_name)
        self._apply_trainability([] if peft_config.inference_mode else [adapter_name])

    # -- identity -------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The user's model, with its LoRA layers in place."""
        return self.base_model.model

    @property
    def active_adapters(self) -> list[str]:
        return state.active_adapters(self.get_base_model())

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active)."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter, inactive and frozen; :meth:`set_adapter` activates it."""
        trainable = self._trainable_names()  # before injection: new parameters start with requires_grad
        self.peft_config[adapter_name] = injection.inject(self.get_base_model(), peft_config, adapter_name)
        self._apply_trainability(trainable)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of ``adapters`` (inactive and frozen).

        ``combination_type``: ``"cat"``, ``"linear"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"``, ``"svd"`` or ``"<one of those>_svd"``; the math is in
        :mod:`lorakit.arithmetic`. ``density`` is the fraction the pruning types keep;
        ``majority_sign_method`` (``"total"`` / ``"frequency"``) is how TIES elects signs.
        Unlike PEFT, an existing ``adapter_name`` is an error rather than a silent no-op.
        """
        trainable = self._trainable_names()
        self.peft_config[adapter_name] = arithmetic.add_weighted_adapter(
            self.get_base_model(),
            self.peft_config,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        self._apply_trainability(trainable)

    def set_adapter(self, adapter_name: str | Sequence[str], *, trainable: bool = False) -> None:
        """Make ``adapter_name`` (or several, whose updates add up) the active adapter(s).

        Trainability is unchanged unless ``trainable=True``, which makes exactly these adapters
        (and their modules to save) the trainable parameters. PEFT silently changes
        ``requires_grad`` here; lorakit only does when asked.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        state.set_active(self.get_base_model(), names)
        if trainable:
            self._apply_trainability(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and all its parameters. Deleting the active adapter activates the first
        remaining one (with a warning); the last adapter cannot be deleted (use :meth:`unload`)."""
        model = self.get_base_model()
        known = state.adapter_names(model)
        if adapter_name not in known:
            raise AdapterError(f"no adapter named {adapter_name!r}; existing adapters: {known}")
        if known == [adapter_name]:
            raise AdapterError(f"{adapter_name!r} is the only adapter; use unload() to remove LoRA entirely")
        active = [a for a in self.active_adapters if a != adapter_name]
        trainable = [a for a in self._trainable_names() if a != adapter_name]
        state.delete(model, adapter_name)
        del self.peft_config[adapter_name]
        if not active:
            active = [state.adapter_names(model)[0]]
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; {active[0]!r} is now active", stacklevel=2
            )
        state.set_active(model, active)
        self._apply_trainability(trainable)

    def _trainable_names(self) -> list[str]:
        model = self.get_base_model()
        names = []
        for _, module in injection.lora_modules(model):
            for name in module.adapter_names:
                params = module.adapter_parameters(name)
                if params and params[0].requires_grad and name not in names:
                    names.append(name)
        return names

    def _apply_trainability(self, names: list[str]) -> None:
        model = self.get_base_model()
        if not names:
            for param in model.parameters():
                param.requires_grad_(False)
            return
        bias = self.peft_config[names[0]].bias
        state.set_trainable(model, names, bias=bias)

    # -- state ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly as its base model."""
        with state.disabled(self.get_base_model()):
            yield

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weights, exactly reversibly."""
        state.merge(self.get_base_model(), adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every merged base weight bit for bit."""
        state.unmerge(self.get_base_model())

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge, then return the base model without any LoRA layer (for deployment).

        On a quantized base (bitsandbytes, torchao) each merged layer becomes a dense ``nn.Linear``
        holding ``deq(Q) + s·B·A`` (summed in float32, rounded once into the model's dtype): exact,
        at the memory of a dense weight (while merging, 4 bytes per element of each merged layer).
        ``requantize=True`` (lorakit's, off by default) stores the merged weights quantized again
        instead, as PEFT does: compact but lossy, and it warns how much of the update it lost
        (:class:`~lorakit.errors.RequantizationWarning`)."""
        model = self.get_base_model()
        state.merge(model, adapter_names, safe_merge=safe_merge, keep_original=False)
        if not requantize:
            return injection.unload(model, keep_merged=True)
        reports = injection.unload_requantized(model)
        if reports:
            worst = max(reports, key=lambda r: r.relative_error)
            mean = sum(r.relative_error for r in reports) / len(reports)
            warnings.warn(
                f"merge_and_unload(requantize=True) re-quantized {len(reports)} merged layer(s): the "
                f"weight error this caused is {mean:.2f}× the merged update ‖s·B·A‖ on average "
                f"(worst: {worst.name}, {worst.relative_error:.2f}×), so the model no longer computes "
                "what the adapter learned; merge_and_unload() without requantize keeps them exact",
                RequantizationWarning,
                stacklevel=2,
            )
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every LoRA layer removed and its original weights.

        "Original" means as they were before any merge: after a PiSSA or OLoRA initialisation the
        base holds the residual ``W − s·B₀A₀`` (as in PEFT); the converted save
        (``path_initial_model_for_weight_conversion``) is the way back to an adapter for ``W``."""
        return injection.unload(self.get_base_model(), keep_merged=False)

    # -- files (lorakit.persistence.adapter_dir does the work) ----------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's layout: "default" in ``save_directory``, others in subfolders
        named after them; validated first, written atomically (a crash leaves the previous save).
        Keywords: ``is_main_process`` (False: write nothing), ``safe_serialization`` (must be True),
        ``path_initial_model_for_weight_conversion`` (the directory a PiSSA/OLoRA adapter was saved
        to right after its init: save a rank-2r plain LoRA for the original base instead).

        Inside a process group only rank 0 writes; an adapter sharded by FSDP or ZeRO-3 is first
        gathered, which makes this a collective: call it on every rank (see lorakit.distributed)."""
        if distributed_group.is_active():
            from lorakit.distributed import persist

            persist.save_pretrained(
                self.get_base_model(), self.peft_config, save_directory, selected_adapters, **kwargs
            )
            return
        adapter_dir.save_adapters(
            self.get_base_model(), self.peft_config, save_directory, selected_adapters, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the adapter in directory ``model_id`` (or Hub repository ``"org/adapter"``) onto
        ``model``. Config, keys, shapes and the base fingerprint are checked before ``model`` changes.
        ``is_trainable=False``: inference (frozen, eval mode). Keywords: ``on_base_mismatch`` ("warn" |
        "error" | "ignore"), ``subfolder``, and for a Hub id ``revision`` and ``token``."""
        build = get_peft_model if cls is PeftModel else cls
        return adapter_dir.load_new(
            model, model_id, adapter_name, is_trainable=is_trainable, build=build, **kwargs
        )

    def load_adapter(
        self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add the adapter in directory (or Hub repository) ``model_id`` as ``adapter_name`` (inactive;
        trainable only with ``is_trainable``). Same checks and keywords as :meth:`from_pretrained`."""
        trainable = self._trainable_names()
        adapter_dir.load_adapter(
            self.get_base_model(),
            self.peft_config,
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            **kwargs,
        )
        self._apply_trainability(trainable + [adapter_name] if is_trainable else trainable)
        if not is_trainable:
            self.eval()

    # -- parameters -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as PEFT reports them."""
        return state.count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # -- running --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter_names_hooks(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Give row ``i`` of every batch adapter ``adapter_names[i]`` for the duration of one call."""
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        known = list(self.peft_config) + [BASE_ROWS]
        unknown = sorted({n for n in names if n not in known})
        if unknown:
            raise AdapterError(f"adapter_names has unknown adapter(s) {unknown}; existing: {known}")
        with row_adapters(names):
            yield

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._adapter_names_hooks(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._adapter_names_hooks(adapter_names):
            generate = getattr(self.get_base_model(), "generate", None)
            if generate is None:
                raise AttributeError(f"{type(self.get_base_model()).__name__} has no generate()")
            return generate(*args, **kwargs)


for _name in FORWARDED_ATTRIBUTES:
    setattr(PeftModel, _name, _forwarded(_name))


_TASK_MODELS: dict[TaskType, Callable[..., PeftModel]] = {}


def register_task_model(task: TaskType, cls: Callable[..., PeftModel]) -> None:
    """Register the ``PeftModel`` subclass that :func:`get_peft_model` builds for ``task``."""
    _TASK_MODELS[task] = cls


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """Add a LoRA adapter to ``model`` and return the task's ``PeftModel``.

    ``autocast_adapter_dtype`` (PEFT's name): on a float16/bfloat16 base the adapter weights are
    float32 (``True``, the default) or take the base dtype (``False``).
    Validation happens first; on error ``model`` is left exactly as it was.
    """
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
    task = peft_config.task_type
    cls = _TASK_MODELS.get(task, PeftModel) if isinstance(task, TaskType) else PeftModel
    peft_model = cls(model, peft_config, adapter_name)
    if not autocast_adapter_dtype:
        state.place_adapter(peft_model.get_base_model(), adapter_name, autocast_dtype=False)
    return peft_model


def inject_adapter_in_model(
    peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default"
) -> nn.Module:
    """Add LoRA layers to any ``nn.Module`` in place (no wrapper); the adapter is active and
    trainable. ``model.peft_config`` records the resolved config, as PEFT does."""
    resolved = injection.inject(model, peft_config, adapter_name)
    configs = dict(getattr(model, "peft_config", None) or {})
    configs[adapter_name] = resolved
    setattr(model, "peft_config", configs)  # noqa: B010 (nn.Module typing)
    state.set_active(model, adapter_name)
    if not peft_config.inference_mode:
        state.set_trainable(model, adapter_name, bias=resolved.bias)
    return model

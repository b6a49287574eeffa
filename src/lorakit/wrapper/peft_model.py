"""`PeftModel`: PEFT's model API over lorakit's parts, and `get_peft_model`.

The wrapper holds ``base_model`` (a :class:`~lorakit.wrapper.lora_model.LoraModel`) whose ``model``
is the user's model, so parameter names read as PEFT's (``base_model.model.<path>.lora_A.default.
weight``). Adapter operations delegate to the ``LoraModel``; files to :mod:`lorakit.persistence`.
Attributes the wrapper does not have are read from ``base_model`` and from there from the user's
model (``peft_model.config``, ``peft_model.lin0``), as PEFT users expect; the lookup never recurses
(``base_model`` itself is never looked up further).
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
from lorakit.errors import AdapterError, ConfigError
from lorakit.layers import LoraLayer
from lorakit.layers.rows import BASE_ROWS, row_adapters
from lorakit.model import injection, state
from lorakit.persistence import adapter_dir, loading
from lorakit.persistence.state_dict import IncompatibleKeys
from lorakit.wrapper import hub, status
from lorakit.wrapper.lora_model import LoraModel, check_new_config

__all__ = [
    "PeftModel",
    "PeftMixedModel",
    "LoraModel",
    "get_peft_model",
    "inject_adapter_in_model",
    "register_task_model",
]


class PeftModel(nn.Module):
    """A model with LoRA adapters; PEFT's ``PeftModel`` API.

    ``model.peft_config`` maps adapter names to their (resolved) configs. One adapter is created by
    the constructor, made active and, unless ``inference_mode``, trainable.
    ``autocast_adapter_dtype`` (PEFT's name): on a float16/bfloat16 base the adapter weights are
    float32 (``True``, the default) or take the base dtype (``False``). ``low_cpu_mem_usage``: the
    adapter tensors are created on the meta device (no memory, no initialisation), to be filled
    by loading weights (:meth:`load_adapter`, :func:`lorakit.set_peft_model_state_dict`).
    """

    # transformers' Trainer refuses a quantized model that has no adapters, telling adapters by
    # PEFT's class or by this flag of its own PEFT integration; this model has adapters. (Set on the
    # class, so it is not forwarded to the base model, which reports is_quantized.)
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
        self.base_model = LoraModel(
            model,
            peft_config,
            adapter_name,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        self.training = self.base_model.training = model.training  # report the model's mode

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (``base_model``)
        except AttributeError:
            if name == "base_model":  # not initialised yet: never look further
                raise
        return getattr(self.base_model, name)

    # -- identity -------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name → its config (the ``LoraModel``'s dict)."""
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, LoraConfig]) -> None:
        self.base_model.peft_config = value

    def get_base_model(self) -> nn.Module:
        """The user's model, with its LoRA layers in place."""
        return self.base_model.model

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several, or none, are active)."""
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether forward applies any adapter: one is active and the layers are not disabled."""
        layers = [m for _, m in injection.lora_modules(self.get_base_model()) if isinstance(m, LoraLayer)]
        return bool(self.active_adapters) and any(not m.disable_adapters for m in layers)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The union of every adapter's ``modules_to_save`` (``None`` when there are none), as PEFT."""
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, inactive and frozen; :meth:`set_adapter` activates it. Every other
        parameter keeps its ``requires_grad``."""
        model = self.get_base_model()
        flags = [(p, p.requires_grad) for p in model.parameters()]
        self.base_model.inject(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        for param, flag in flags:
            param.requires_grad_(flag)
        state.set_requires_grad(model, adapter_name, False)
        if not autocast_adapter_dtype:
            state.place_adapter(model, adapter_name, autocast_dtype=False)

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
        :mod:`lorakit.model.arithmetic`. ``density`` is the fraction the pruning types keep;
        ``majority_sign_method`` (``"total"`` / ``"frequency"``) is how TIES elects signs.
        Unlike PEFT, an existing ``adapter_name`` is an error rather than a silent no-op.
        """
        self.base_model.add_weighted_adapter(
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

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several, whose updates add up) the active adapter(s).

        As in PEFT, the activated adapters become trainable and every other adapter frozen, or all
        are frozen with ``inference_mode=True``; a merged model is unmerged first, with a warning.
        """
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch ``requires_grad`` of the given adapters' tensors (and modules-to-save copies)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and all its parameters (see :meth:`LoraModel.delete_adapter`)."""
        self.base_model.delete_adapter(adapter_name)

    # -- state ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly as its base model and no adapter tensor
        requires a gradient; on exit every layer's state is restored exactly."""
        with state.disabled(self.get_base_model()):
            yield

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until :meth:`enable_adapter_layers` (adapters frozen)."""
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`; the active adapters become trainable (PEFT's rule)."""
        self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weights, exactly reversibly."""
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every merged base weight bit for bit."""
        self.base_model.unmerge_adapter()

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
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names, requantize=requantize)

    def unload(self) -> nn.Module:
        """Return the base model with every LoRA layer removed and its original weights.

        "Original" means as they were before any merge: after a PiSSA or OLoRA initialisation the
        base holds the residual ``W − s·B₀A₀`` (as in PEFT); the converted save
        (``path_initial_model_for_weight_conversion``) is the way back to an adapter for ``W``."""
        return self.base_model.unload()

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """One :class:`~lorakit.wrapper.status.TunerLayerStatus` per LoRA layer or modules-to-save
        wrapper (PEFT's report)."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The model-wide summary of :meth:`get_layer_status` (``"irregular"`` where layers differ)."""
        return status.get_model_status(self)

    # -- files (lorakit.persistence.adapter_dir does the work) ------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's layout: "default" in ``save_directory``, others in subfolders
        named after them, and a README.md model card (an existing card keeps its content); validated
        first, written atomically (a crash leaves the previous save).

        ``safe_serialization=False`` writes ``adapter_model.bin`` (a torch pickle of tensors only)
        as PEFT does; lorakit reads such files with ``weights_only=True``.
        ``save_embedding_layers``: ``"auto"`` (when an embedding is targeted), ``True`` or ``False``:
        whether the input/output embeddings' base weights go into the file.
        ``path_initial_model_for_weight_conversion``: the directory a PiSSA/OLoRA adapter was saved to
        right after its init: save a rank-2r plain LoRA for the original base instead.

        Inside a process group only rank 0 writes; an adapter sharded by FSDP or ZeRO-3 is first
        gathered, which makes this a collective: call it on every rank (see lorakit.distributed)."""
        if kwargs:
            raise AdapterError(
                f"save_pretrained got unknown keyword argument(s) {sorted(kwargs)}; valid: "
                "safe_serialization, selected_adapters, save_embedding_layers, is_main_process, "
                "path_initial_model_for_weight_conversion"
            )
        options: dict[str, Any] = dict(
            is_main_process=is_main_process,
            safe_serialization=safe_serialization,
            save_embedding_layers=save_embedding_layers,
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
        )
        if distributed_group.is_active():
            from lorakit.distributed import persist

            # PEFT's default is_main_process=True means "this process may write"; in a process
            # group the writer is rank 0 (None: persist's default), and False keeps a rank silent
            options["is_main_process"] = None if is_main_process else False
            persist.save_pretrained(
                self.get_base_model(), self.peft_config, save_directory, selected_adapters, **options
            )
        else:
            adapter_dir.save_adapters(
                self.get_base_model(), self.peft_config, save_directory, selected_adapters, **options
            )
        if is_main_process and (not distributed_group.is_active() or distributed_group.is_main_process()):
            self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str | os.PathLike[str]) -> None:
        """Write ``README.md`` in ``output_dir`` with PEFT's model-card facts (``library_name: peft``,
        tags, base model), keeping the content of an existing card."""
        hub.write_model_card(self, output_dir)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Save the adapters (and model card) and upload them to the Hugging Face Hub repository
        ``repo_id``; see :func:`lorakit.wrapper.hub.push_to_hub` for the keywords."""
        return hub.push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the adapter in directory ``model_id`` (or Hub repository ``"org/adapter"``) onto
        ``model``. Config, keys, shapes and the base fingerprint are checked before ``model`` changes.
        ``is_trainable=False``: inference (frozen, eval mode). ``config``: use this config instead of
        the saved one. ``key_mapping``: regex → replacement applied to the file's keys (after
        ``base_model.model.``). Further keywords: ``torch_device``, ``ignore_mismatched_sizes``,
        ``subfolder``, ``on_base_mismatch`` ("warn" | "error" | "ignore"), and for a Hub id
        ``revision`` and ``token``; see :class:`lorakit.persistence.loading.LoadOptions`."""
        build = get_peft_model if cls is PeftModel else cls
        options = loading.load_options(
            kwargs,
            config=config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            ephemeral_gpu_offload=ephemeral_gpu_offload,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
        )
        return loading.load_new(  # type: ignore[no-any-return]
            model, model_id, adapter_name, is_trainable=is_trainable, build=build, options=options
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> IncompatibleKeys:
        """Add the adapter in directory (or Hub repository) ``model_id`` as ``adapter_name``
        (inactive; trainable only with ``is_trainable``). Same checks and keywords as
        :meth:`from_pretrained`. Returns PEFT's load result (``missing_keys``, ``unexpected_keys``;
        both empty, since lorakit refuses a file whose keys do not fit)."""
        options = loading.load_options(
            {**kwargs, "torch_device": torch_device},
            config=None,
            autocast_adapter_dtype=autocast_adapter_dtype,
            ephemeral_gpu_offload=ephemeral_gpu_offload,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
        )
        model = self.get_base_model()
        flags = [(p, p.requires_grad) for p in model.parameters()]
        result = loading.load_adapter(
            model,
            self.peft_config,
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            options=options,
            check=lambda cfg: check_new_config(self.peft_config, cfg, adapter_name),
        )
        for param, flag in flags:
            param.requires_grad_(flag)
        state.set_requires_grad(model, adapter_name, is_trainable)
        if not is_trainable:
            self.eval()
        return result

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
            raise AdapterError(f"Trying to infer with non-existing adapter(s): {unknown}; existing: {known}")
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


class PeftMixedModel(PeftModel):
    """``get_peft_model(..., mixed=True)``: PEFT's model for several adapters active together.

    PEFT's mixed model combines adapters of different types (LoRA with LoHa, ...). lorakit has one
    adapter type, LoRA, and ``PeftModel`` already activates several LoRA adapters at once
    (``set_adapter(["a", "b"])``: their updates add up), so this is a ``PeftModel`` under PEFT's
    name: same layers, same files; unlike PEFT's, it can also save its adapters."""


_TASK_MODELS: dict[TaskType, Callable[..., PeftModel]] = {}


def register_task_model(task: TaskType, cls: Callable[..., PeftModel]) -> None:
    """Register the ``PeftModel`` subclass that :func:`get_peft_model` builds for ``task``."""
    _TASK_MODELS[task] = cls


def _replace_existing(model: nn.Module, peft_config: LoraConfig, adapter_name: str) -> None:
    """``get_peft_model`` on a model that already holds LoRA layers: warn as PEFT does; an adapter
    of the same name is replaced by the new one (checked first: nothing changes on an error)."""
    warnings.warn(
        "You are trying to modify a model with PEFT for a second time. If you want to reload the model "
        "with a different config, make sure to call `.unload()` before.",
        UserWarning,
        stacklevel=3,
    )
    if adapter_name not in state.adapter_names(model):
        return
    if adapter_name in state.merged_adapters(model):
        raise AdapterError(
            f"cannot replace adapter {adapter_name!r}: it is merged into the model; unmerge it first, "
            "or call unload() before get_peft_model"
        )
    injection.plan(model, peft_config, adapter_name, replacing=True)  # validates; changes nothing
    state.delete(model, adapter_name)


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Add a LoRA adapter to ``model`` and return the task's ``PeftModel`` (a ``PeftMixedModel``
    with ``mixed=True``).

    ``autocast_adapter_dtype`` (PEFT's name): on a float16/bfloat16 base the adapter weights are
    float32 (``True``, the default) or take the base dtype (``False``). ``revision``: recorded in
    the saved config as the base model's revision. ``low_cpu_mem_usage``: see :class:`PeftModel`.
    Validation happens first; on error ``model`` is left exactly as it was.
    """
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
    new_name = model.__dict__.get("name_or_path") or getattr(model, "name_or_path", None) or None
    old_name = peft_config.base_model_name_or_path
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint (the saved "
            "adapter names the model it was added to)",
            UserWarning,
            stacklevel=2,
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, "
                f"overwriting with revision {revision}",
                UserWarning,
                stacklevel=2,
            )
        peft_config.revision = revision
    if injection.has_lora_layers(model):
        _replace_existing(model, peft_config, adapter_name)
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    task = peft_config.task_type
    cls = _TASK_MODELS.get(task, PeftModel) if isinstance(task, TaskType) else PeftModel
    return cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Add LoRA layers to any ``nn.Module`` in place (no wrapper); the adapter is active and
    trainable. ``model.peft_config`` records the resolved config, as PEFT does.
    ``low_cpu_mem_usage``: the adapter is created on the meta device, to be filled by
    :func:`lorakit.set_peft_model_state_dict`. ``state_dict``: target exactly the modules that
    have LoRA tensors in this (PEFT-format) state dict, instead of the config's ``target_modules``."""
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
    configs = dict(getattr(model, "peft_config", None) or {})
    check_new_config(configs, peft_config, adapter_name)
    if state_dict is not None:
        peft_config = loading.config_for_state_dict(model, peft_config, state_dict)
    resolved = injection.inject(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    configs[adapter_name] = resolved
    setattr(model, "peft_config", configs)  # noqa: B010 (nn.Module typing)
    state.set_active(model, adapter_name)
    if not peft_config.inference_mode:
        state.set_trainable(model, adapter_name, bias=resolved.bias)
    return model

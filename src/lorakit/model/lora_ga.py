"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"), with PEFT's
API::

    config = LoraConfig(r=8, target_modules=[...], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    preprocess_loraga(model, config, train_step)    # estimates ∂L/∂W of every targeted linear layer
    peft_model = get_peft_model(model, config)       # A, B from those gradients; W ← W − s·B A

``train_step()`` runs forward and backward passes on a few batches (the paper uses 64 samples, §4);
the gradient of each targeted weight is accumulated over them and divided by the number of backward
passes. Only the targeted weights require gradients meanwhile; every ``requires_grad`` flag and
the train/eval mode are restored. Each estimate is kept on its module (PEFT's attribute
``_peft_loraga_grad``, so a model prepared by PEFT's ``preprocess_loraga`` works here and the
reverse) until ``get_peft_model`` consumes it. The math is :func:`lorakit.functional.init.lora_ga`.

As with PiSSA, the base weights change: the trained adapter belongs to the residual base. Save it
with ``path_initial_model_for_weight_conversion`` (the adapter saved right after the init) to get a
plain LoRA adapter for the original weights.

``cache_file``: the estimates are written there (safetensors) and read back on the next call
instead of running ``train_step``; a cache written by PEFT (``torch.save``) is read with
``weights_only=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lorakit import fileio
from lorakit.config import LORA_GA_GRAD, LoraConfig, LoraGAConfig, parse_init
from lorakit.errors import AdapterFileError, ConfigError, TargetingError
from lorakit.functional import init as LI
from lorakit.layers import LoraLayer, lora_layer_for
from lorakit.model.targeting import resolve_config, select_targets

__all__ = ["GRAD_ATTR", "preprocess_loraga", "estimate_gradients", "layer_problems", "initialize"]

GRAD_ATTR = LORA_GA_GRAD  # PEFT's attribute for the estimate, on the base module


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The linear layers the config targets, refusing quantized ones (LoRA-GA needs full-precision
    gradients of the weights)."""
    found, quantized = [], []
    for name, module in select_targets(resolve_config(config, model), model):
        kind = lora_layer_for(module)
        if kind is None or not kind.is_linear:
            continue
        weight = getattr(module, "weight", None)
        if hasattr(module, "quant_state") or not (
            isinstance(weight, torch.Tensor) and weight.is_floating_point()
        ):
            quantized.append(f"{name} ({type(module).__name__})")
        else:
            found.append((name, module))
    if quantized:
        raise TargetingError(
            f"LoRA-GA needs full-precision weights to estimate gradients; quantized: {quantized}"
        )
    if not found:
        raise TargetingError(
            "LoRA-GA found no nn.Linear / Conv1D layer among the targets of "
            f"target_modules={config.target_modules!r}"
        )
    return found


def estimate_gradients(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None]) -> None:
    """Run ``train_step()`` with gradients on the targeted weights only, and attach each weight's
    mean gradient per backward pass to its module (``_peft_loraga_grad``)."""
    targets = _targets(model, lora_config)
    flags = {p: p.requires_grad for p in model.parameters()}
    counts = dict.fromkeys((name for name, _ in targets), 0)
    hooks = []
    was_training = model.training
    try:
        for param in flags:
            param.requires_grad_(False)
        for name, module in targets:
            weight: torch.Tensor = module.weight  # type: ignore[assignment]
            weight.grad = None
            weight.requires_grad_(True)

            def count(grad: torch.Tensor, name: str = name) -> None:
                counts[name] += 1

            hooks.append(weight.register_hook(count))
        model.train()
        with torch.enable_grad():
            train_step()
        for name, module in targets:
            weight = module.weight  # type: ignore[assignment]
            if counts[name] and weight.grad is not None:
                setattr(module, GRAD_ATTR, weight.grad.detach() / counts[name])
    finally:
        for hook in hooks:
            hook.remove()
        for _, module in targets:
            module.weight.grad = None  # type: ignore[union-attr]
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)
    missed = [name for name, n in counts.items() if not n]
    if missed:
        warnings.warn(
            f"LoRA-GA: train_step did not reach {missed}; they get the default initialisation", stacklevel=3
        )


def _read_cache(path: Path, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    try:
        tensors, _ = fileio.read_safetensors(path)
    except AdapterFileError:
        tensors = fileio.read_legacy_bin(path)  # PEFT's torch.save cache, read with weights_only=True
    problems = []
    for name, module in targets:
        grad = tensors.get(f"{name}.{GRAD_ATTR}")
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        shape = tuple(weight.shape)
        if grad is None:
            problems.append(f"no gradient for {name}")
        elif tuple(grad.shape) != shape:
            problems.append(f"{name}: shape {tuple(grad.shape)}, the weight is {shape}")
    if problems:
        raise AdapterFileError(f"LoRA-GA cache {path} does not fit this model: " + "; ".join(problems[:5]))
    return {name: tensors[f"{name}.{GRAD_ATTR}"] for name, _ in targets}


def _write_cache(path: Path, grads: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fileio.write_safetensors(partial, {f"{n}.{GRAD_ATTR}": g.contiguous() for n, g in grads.items()}, {})
    os.replace(partial, path)  # atomic: a crash leaves the previous cache or none


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: str | os.PathLike[str] | None = None,
) -> None:
    """Estimate the gradients LoRA-GA initialises from (PEFT's name and arguments; see the module
    docstring). Call it on the plain model, before ``get_peft_model(model, lora_config)``."""
    if not isinstance(lora_config, LoraConfig):
        raise ConfigError(f"lora_config must be a lorakit.LoraConfig, got {type(lora_config).__name__}")
    if (parse_init(lora_config.init_lora_weights) or ("",))[0] != "lora_ga":
        raise ConfigError(
            f"preprocess_loraga is for init_lora_weights='lora_ga' (the config has "
            f"{lora_config.init_lora_weights!r}); set it and lora_ga_config=LoraGAConfig(...)"
        )
    targets = _targets(model, lora_config)
    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.is_file() and path.stat().st_size > 0:
        grads = _read_cache(path, targets)
        for name, module in targets:
            weight: torch.Tensor = module.weight  # type: ignore[assignment]
            setattr(module, GRAD_ATTR, grads[name].to(weight.device))
        return
    estimate_gradients(model, lora_config, train_step)
    if path is not None:
        _write_cache(path, {n: getattr(m, GRAD_ATTR) for n, m in targets if hasattr(m, GRAD_ATTR)})


def layer_problems(name: str, base: nn.Module, r: int, layer: type[LoraLayer]) -> list[str]:
    """Why LoRA-GA cannot initialise ``base`` from the gradient attached to it (empty: it can, or
    no gradient is attached and the layer gets the default init)."""
    grad = getattr(base, GRAD_ATTR, None)
    if grad is None or not layer.is_linear:
        return []
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(grad.shape) != tuple(weight.shape):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        return [f"{name}: its LoRA-GA gradient has shape {tuple(grad.shape)}, the weight {shape}"]
    if 2 * r > min(weight.shape):
        return [
            f"{name}: LoRA-GA needs 2r ≤ {min(weight.shape)} (the weight is {tuple(weight.shape)}), r={r}"
        ]
    return []


@torch.no_grad()
def initialize(layer: LoraLayer, name: str, settings: LoraGAConfig) -> None:
    """Give adapter ``name`` of ``layer`` its LoRA-GA factors from the gradient on the base module,
    replace the base weight by the residual (float32, rounded once) and drop the gradient."""
    base = layer.base_layer
    grad = getattr(base, GRAD_ATTR, None)
    if grad is None or not layer.is_linear:
        return
    weight = layer.dense_weight()
    a, b, residual = LI.lora_ga(
        layer.to_matrix(weight),
        layer.to_matrix(grad.to(weight.device)),
        layer.r[name],
        layer.scaling[name],
        direction=settings.direction,
        scale=settings.scale,
        stable_gamma=settings.stable_gamma,
    )
    lora_a, lora_b = layer.factors(name)
    lora_a.copy_(a)
    lora_b.copy_(b)
    layer.write_base(layer.to_matrix(residual).to(weight.dtype), None)
    delattr(base, GRAD_ATTR)
    variant = layer.lora_variant.get(name)
    if variant is not None:  # DoRA's magnitude is ‖W_res + s·B A‖, computed once the factors are set
        variant.init(layer, name)

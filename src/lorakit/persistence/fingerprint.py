"""A cheap fingerprint of the base weights an adapter was trained on.

For every targeted module (by name) it records the weight's shape and ``SAMPLES`` elements at fixed,
evenly spread flat positions. Computing it reads ``SAMPLES`` numbers per module, whatever the
model's size (a few hundred reads for a 70B model), and it is stored in the safetensors header
metadata (key ``lorakit_base_fingerprint``), which PEFT ignores.

Comparison is tolerant to the base being cast to another floating dtype (float32 / bfloat16 /
float16 copies of one model agree) but not to different weights: two samples differ when they are
further apart than bfloat16's rounding (relative 2⁻⁷). Modules whose weight is not a floating
tensor on a real device (quantized or meta) are left out.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.layers import LoraLayer, lora_layer_for

__all__ = ["Fingerprint", "fingerprint", "base_weight", "METADATA_KEY"]

METADATA_KEY = "lorakit_base_fingerprint"
SAMPLES = 8
_RTOL = 2.0**-7
_ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Per module: its weight's shape and ``SAMPLES`` sampled values (float32)."""

    shapes: dict[str, tuple[int, ...]]
    values: dict[str, list[float]]

    def to_json(self) -> str:
        names = sorted(self.shapes)
        flat = torch.tensor([v for n in names for v in self.values[n]], dtype=torch.float32)
        return json.dumps(
            {
                "version": 1,
                "samples": SAMPLES,
                "modules": {n: list(self.shapes[n]) for n in names},
                "values_f32_b64": base64.b64encode(flat.numpy().tobytes()).decode("ascii"),
                "sha256": self.digest(),
            },
            separators=(",", ":"),
        )

    def digest(self) -> str:
        """An exact hash (shapes and values): equal digests mean the same sampled weights."""
        h = hashlib.sha256()
        for name in sorted(self.shapes):
            h.update(f"{name}:{self.shapes[name]}:{self.values[name]}".encode())
        return h.hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Fingerprint | None:
        """Parse :meth:`to_json` output; ``None`` if it is not a fingerprint lorakit understands."""
        try:
            data = json.loads(text)
            names = sorted(data["modules"])
            raw = base64.b64decode(data["values_f32_b64"])
            flat = torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist()
            n = int(data["samples"])
            if data.get("version") != 1 or len(flat) != n * len(names):
                return None
            return cls(
                {k: tuple(data["modules"][k]) for k in names},
                {k: flat[i * n : (i + 1) * n] for i, k in enumerate(names)},
            )
        except (ValueError, KeyError, TypeError):
            return None

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable reasons ``other`` (the model now) is not this fingerprint's base."""
        out = []
        for name in sorted(self.shapes):
            if name not in other.shapes:
                continue  # the module could not be fingerprinted on this model (e.g. quantized)
            if self.shapes[name] != other.shapes[name]:
                out.append(f"{name}: weight shape {self.shapes[name]} when trained, {other.shapes[name]} now")
                continue
            a = torch.tensor(self.values[name])
            b = torch.tensor(other.values[name])
            if not torch.allclose(a, b, rtol=_RTOL, atol=_ATOL):
                worst = int((a - b).abs().argmax())
                out.append(
                    f"{name}: sampled weight {a[worst].item():.6g} when trained, {b[worst].item():.6g} now"
                )
        return out


def base_weight(module: nn.Module | torch.Tensor) -> torch.Tensor | None:
    """The unmerged base weight of a target (a LoRA layer's original weight while merged; a
    targeted parameter is its own weight); ``None`` for a quantized one: an adapter trained on a
    quantized base is meant for the full-precision model too (``lorakit merge --base``), whose
    weights differ by the quantization error."""
    if isinstance(module, torch.Tensor):
        return module
    if isinstance(module, LoraLayer):
        return None if module.is_quantized else module.original_weight()
    kind = lora_layer_for(module)
    if kind is not None and kind.is_quantized:
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _samples(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    idx = torch.tensor([i * (n - 1) // (SAMPLES - 1) for i in range(SAMPLES)], device=flat.device)
    return flat.index_select(0, idx).float().cpu().tolist()


def fingerprint(modules: Iterable[tuple[str, nn.Module | torch.Tensor]]) -> Fingerprint | None:
    """The fingerprint of these named targets; ``None`` if none has a readable floating weight."""
    shapes: dict[str, tuple[int, ...]] = {}
    values: dict[str, list[float]] = {}
    for name, module in modules:
        weight = base_weight(module)
        if weight is None or not weight.is_floating_point() or weight.is_meta or weight.numel() == 0:
            continue
        shapes[name] = tuple(int(s) for s in weight.shape)
        values[name] = _samples(weight)
    return Fingerprint(shapes, values) if shapes else None

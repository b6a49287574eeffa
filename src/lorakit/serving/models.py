"""What the server serves: one base causal LM, its tokenizer and any number of named adapters.

The base alone is a plain transformers model; the first adapter wraps it in a :class:`PeftModel`
(``PeftModel.from_pretrained``), later ones are added with ``load_adapter``, and unloading the last
one unwraps it again (``unload()``), so a server without adapters runs the untouched base. One
forward call serves a batch whose rows use different adapters through lorakit's ``adapter_names``
(``"__base__"`` for a row on the base model).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError, ModelNotFoundError, ServingError
from lorakit.hub import ADAPTER_FILES, local_folder
from lorakit.layers.rows import BASE_ROWS
from lorakit.wrapper.peft_model import PeftModel

__all__ = [
    "ServedModel",
    "AdapterInfo",
    "load_base",
    "resolve_adapter_path",
    "adapter_folder_name",
    "BASE_ROWS",
]

# PEFT adapter names become keys of nn.ModuleDicts: no dots, no empty name.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A served adapter: the name clients put in ``model``, where it was loaded from, and when."""

    name: str
    path: str
    created: int


def load_base(model: str, dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a folder or hub id (``AutoModelForCausalLM``), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ServingError(f"cannot load {model!r} as a causal LM: {str(exc).splitlines()[0]}") from exc
    return base.eval(), tokenizer


def resolve_adapter_path(path: str) -> str:
    """A local adapter folder as is; a Hub id from the HF cache or the Hub (:mod:`lorakit.hub`)."""
    folder = local_folder(path, files=ADAPTER_FILES, what="adapter")
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"adapter path {path!r} is not a folder holding adapter_config.json")
    return str(folder)


class ServedModel:
    """The base model, its tokenizer and the loaded adapters, with a batched forward.

    Not thread-safe: the engine calls it from its own thread only.
    """

    def __init__(self, base: nn.Module, tokenizer: Any, name: str) -> None:
        if getattr(base.config, "is_encoder_decoder", False):
            raise ServingError(f"{name!r} is an encoder-decoder model; the server runs decoder-only LMs")
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.created = int(time.time())
        self.peft: PeftModel | None = None
        self.adapters: dict[str, AdapterInfo] = {}
        params = inspect.signature(base.forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None

    # -- what is served ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + completion) the model's positions allow."""
        config = self.base.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(getattr(self.tokenizer, "model_max_length", 2048))

    def row_name(self, model: str) -> str:
        """The ``adapter_names`` entry for a request's ``model``: an adapter's name, or ``"__base__"``."""
        if model == self.name:
            return BASE_ROWS
        if model in self.adapters:
            return model
        raise ModelNotFoundError(f"The model `{model}` does not exist. Served models: {self.served_names()}")

    def served_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def eos_ids(self) -> set[int]:
        """Every token id that ends a completion: the generation config's and the tokenizer's."""
        ids: set[int] = set()
        for value in (
            getattr(getattr(self.base, "generation_config", None), "eos_token_id", None),
            getattr(self.base.config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load the adapter folder (or hub id) ``path`` as ``name``; the model is unchanged on error."""
        if not _ADAPTER_NAME.fullmatch(name or ""):
            raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
        if name in self.served_names() or name == BASE_ROWS:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
        folder = resolve_adapter_path(path)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
        else:
            self.peft.load_adapter(folder, adapter_name=name)
        self.peft.eval()
        info = AdapterInfo(name, path, int(time.time()))
        self.adapters[name] = info
        return info

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; removing the last one gives back the untouched base model."""
        if name not in self.adapters:
            raise ModelNotFoundError(f"The lora adapter '{name}' cannot be found.")
        assert self.peft is not None
        if len(self.adapters) == 1:
            self.base = self.peft.unload().eval()
            self.peft = None
        else:
            self.peft.delete_adapter(name)
        del self.adapters[name]

    # -- running ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        rows: Sequence[str],
    ) -> torch.Tensor:
        """Logits (B, V) of the last position of each row; ``cache`` is extended in place.

        ``input_ids`` (B, S), ``attention_mask`` (B, T + S) over cached and new columns,
        ``position_ids`` (B, S); ``rows[i]`` is row ``i``'s adapter (``"__base__"``: none).
        """
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._keep_kw:
            kwargs[self._keep_kw] = 1
        out = self.base(**kwargs) if self.peft is None else self.peft(adapter_names=list(rows), **kwargs)
        return out.logits[:, -1, :].float()  # (B, V)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        config: Any = self.base.config  # the same object after wrapping (PeftModel forwards it)
        return DynamicCache(config=config)


def adapter_folder_name(path: str | os.PathLike[str]) -> str:
    """A default adapter name for a folder: its last path component."""
    return Path(path).resolve().name

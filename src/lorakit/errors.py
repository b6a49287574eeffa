"""lorakit's exceptions. Each is a ``ValueError`` so that PEFT-style ``except ValueError`` still works;
where PEFT raises another built-in type for the same problem, the error is that type too (a size
mismatch in loading is also a ``RuntimeError``, as torch's ``load_state_dict`` raises)."""

from __future__ import annotations

__all__ = [
    "LorakitError",
    "ConfigError",
    "TargetingError",
    "TargetingTypeError",
    "AdapterError",
    "MixedBatchError",
    "AdapterFileError",
    "AdapterShapeError",
    "AdapterStateDictError",
    "AdapterMergeError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "DistributedError",
    "PeftError",
    "NoMatchingPeftModuleError",
    "PeftWarning",
]


class LorakitError(ValueError):
    """Base class of every error lorakit raises for bad input."""


class PeftError(Exception):
    """PEFT's base class for the errors it raises under its own names (here:
    :class:`NoMatchingPeftModuleError`), so that ``except PeftError`` written for PEFT keeps working."""


class ConfigError(LorakitError):
    """A configuration field holds a value lorakit cannot use."""


class TargetingError(LorakitError):
    """A config selects no module, or a module lorakit cannot adapt."""


class TargetingTypeError(TargetingError, TypeError):
    """A config names a module of a type that cannot be used that way (PEFT raises a ``TypeError``:
    ``modules_to_save`` naming a ``ModuleList``, say)."""


class NoMatchingPeftModuleError(TargetingError, PeftError):
    """An adapter's ``target_modules`` select no module of the model (PEFT's error of that name: a
    ``ValueError`` and a ``PeftError``)."""


class AdapterError(LorakitError):
    """An adapter operation was asked for that the model's current state does not allow."""


class MixedBatchError(AdapterError, TypeError):
    """``adapter_names`` (a mixed batch) reached a layer kind that applies one set of adapters to the
    whole batch (``nn.MultiheadAttention``). Also a ``TypeError``, which PEFT raises there."""


class AdapterFileError(LorakitError):
    """An adapter file or directory is missing, unreadable, truncated, corrupt or unsafe."""


class AdapterShapeError(AdapterError, RuntimeError):
    """Loading an adapter whose tensors have other shapes than the model's (PEFT raises a
    ``RuntimeError`` here: "size mismatch")."""


class AdapterStateDictError(AdapterError, RuntimeError):
    """A strict load of a state dict whose keys do not match the model's (torch raises a
    ``RuntimeError`` here: "Missing key(s)" / "Unexpected key(s)")."""


class AdapterMergeError(AdapterError, RuntimeError):
    """A merge that cannot be done (nothing was merged); PEFT raises a ``RuntimeError`` for some of
    these, e.g. a LoRA bias with no base bias to merge into."""


class BaseModelMismatchError(AdapterError):
    """An adapter's recorded base-weight fingerprint differs from the model it is loaded onto."""


class BaseModelMismatchWarning(UserWarning):
    """Warned (by default) when an adapter was trained on a different base model."""


class DistributedError(LorakitError):
    """A distributed operation was misused (not called on every rank, ranks disagree) or the model's
    sharding does not allow it."""


class PeftWarning(UserWarning):
    """The category of the warnings lorakit gives where PEFT gives its ``PeftWarning``, under the same
    name, so that warning filters written for PEFT keep working."""

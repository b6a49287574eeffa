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
    "RequantizationWarning",
    "ServingError",
    "ModelNotFoundError",
    "ExportError",
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


class RequantizationWarning(UserWarning):
    """Warned when a merge re-quantizes a quantized base weight (asked for explicitly), with the
    weight error that caused relative to the merged update."""


class ServingError(LorakitError):
    """A generation request the server cannot run as asked (a prompt longer than the context, a bad
    sampling parameter): the client's mistake, answered with HTTP 400."""


class ModelNotFoundError(ServingError):
    """A request names a model that is not served (neither the base nor a loaded adapter): HTTP 404."""


class ExportError(LorakitError):
    """An adapter that the export format cannot express (DoRA, modules to save, an unknown
    architecture), or a base model it does not fit."""


class PeftWarning(UserWarning):
    """The category of the warnings lorakit gives where PEFT gives its ``PeftWarning``, under the same
    name, so that warning filters written for PEFT keep working."""

"""lorakit's exceptions. Each is a ``ValueError`` so that PEFT-style ``except ValueError`` still works."""

from __future__ import annotations

__all__ = [
    "LorakitError",
    "ConfigError",
    "TargetingError",
    "AdapterError",
    "MixedBatchError",
    "AdapterFileError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "DistributedError",
    "RequantizationWarning",
    "ServingError",
    "ModelNotFoundError",
    "ExportError",
]


class LorakitError(ValueError):
    """Base class of every error lorakit raises for bad input."""


class ConfigError(LorakitError):
    """A configuration field holds a value lorakit cannot use."""


class TargetingError(LorakitError):
    """A config selects no module, or a module lorakit cannot adapt."""


class AdapterError(LorakitError):
    """An adapter operation was asked for that the model's current state does not allow."""


class MixedBatchError(AdapterError, TypeError):
    """``adapter_names`` (a mixed batch) reached a layer kind that applies one set of adapters to the
    whole batch (``nn.MultiheadAttention``). Also a ``TypeError``, which PEFT raises there."""


class AdapterFileError(LorakitError):
    """An adapter file or directory is missing, unreadable, truncated, corrupt or unsafe."""


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

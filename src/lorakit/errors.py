"""lorakit's exceptions. Each is a ``ValueError`` so that PEFT-style ``except ValueError`` still works."""

from __future__ import annotations

__all__ = ["LorakitError", "ConfigError", "TargetingError", "AdapterError"]


class LorakitError(ValueError):
    """Base class of every error lorakit raises for bad input."""


class ConfigError(LorakitError):
    """A configuration field holds a value lorakit cannot use."""


class TargetingError(LorakitError):
    """A config selects no module, or a module lorakit cannot adapt."""


class AdapterError(LorakitError):
    """An adapter operation was asked for that the model's current state does not allow."""

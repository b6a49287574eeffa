"""lorakit's version, in one place (read by the package and written into adapter files)."""

__version__ = "0.1.0"

"""Choosing the rank: the spectrum of an adapter, resizing it, and extracting one from a fine-tune."""

from lorakit.rank.resize import ResizeResult, resize_adapter
from lorakit.rank.spectrum import Spectrum, spectrum

__all__ = ["Spectrum", "spectrum", "ResizeResult", "resize_adapter"]

"""Choosing the rank: the spectrum of an adapter, resizing it, and extracting one from a fine-tune."""

from lorakit.rank.extract import ExtractResult, extract_adapter
from lorakit.rank.report import RankReport, rank_report
from lorakit.rank.resize import ResizeResult, resize_adapter, resize_adapter_files
from lorakit.rank.spectra import Spectrum, spectrum

__all__ = [
    "Spectrum",
    "spectrum",
    "RankReport",
    "rank_report",
    "ResizeResult",
    "resize_adapter",
    "resize_adapter_files",
    "ExtractResult",
    "extract_adapter",
]

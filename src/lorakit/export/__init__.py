"""Exporting adapters to the runtimes people deploy on: GGUF LoRA adapters for llama.cpp."""

from lorakit.export.gguf_lora import ARCHITECTURES, GgufExport, export_gguf

__all__ = ["export_gguf", "GgufExport", "ARCHITECTURES"]

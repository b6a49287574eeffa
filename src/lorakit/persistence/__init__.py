"""PEFT's file format: the key grammar (``keys``), adapter folders (``adapter_dir``), the base-weight
fingerprint (``fingerprint``), PiSSA/OLoRA conversion (``conversion``) and hot-swapping
(``hotswap``). Safe, atomic file I/O itself is :mod:`lorakit.fileio`."""

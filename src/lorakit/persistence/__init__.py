"""PEFT's file format: the key grammar (``keys``), the state-dict functions (``state_dict``),
adapter folders (``adapter_dir``: saving, reading, checking; ``loading``: ``from_pretrained`` and
``load_adapter`` with PEFT's keywords), the base-weight fingerprint (``fingerprint``), PiSSA/OLoRA
conversion (``conversion``) and hot-swapping (``hotswap``). Safe, atomic file I/O itself is
:mod:`lorakit.fileio`."""

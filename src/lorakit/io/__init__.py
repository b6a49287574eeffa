"""Adapter persistence, in PEFT's format.

``keys`` (the one place for PEFT's key rules), ``files`` (atomic, safe reading and writing),
``config_json`` (adapter_config.json), ``fingerprint`` (the base-weight check) and ``adapter_dir``
(save / load whole adapter directories, used by ``PeftModel`` and ``LoraConfig``).
"""

from lorakit.io.keys import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]

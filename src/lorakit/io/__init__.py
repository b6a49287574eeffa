"""Adapter persistence: PEFT's key rules (``keys``) and, built on them, files."""

from lorakit.io.keys import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]

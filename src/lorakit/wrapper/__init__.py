"""The model users hold: ``PeftModel`` (PEFT's API), ``LoraModel`` and ``get_peft_model``."""

"""The model users hold: ``PeftModel`` (PEFT's API, ``peft_model``), ``LoraModel`` (PEFT's tuner,
``lora_model``) and ``get_peft_model``; PEFT's status reports (``status``); the model card and
``push_to_hub`` (``hub``)."""

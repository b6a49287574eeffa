"""Operations on a whole model, on top of the layers: which modules a config selects
(``targeting``), wrapping and unwrapping them (``injection``), the named state changes of its
adapters (``state``), adapter arithmetic (``arithmetic``), what could be adapted
(``inspection``), what a distributed engine did to the model (``engines``), the data-driven
initialisations (``eva`` with its data pass ``eva_pass``; ``lora_ga``) and LoRA+ optimizers
(``loraplus``)."""

"""Operations on a whole model, on top of the layers: which modules a config selects
(``targeting``), wrapping and unwrapping them (``injection``), the named state changes of its
adapters (``state``), adapter arithmetic (``arithmetic``), what could be adapted
(``inspection``) and what a distributed engine did to the model (``engines``)."""

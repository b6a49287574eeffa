"""The math of LoRA as pure functions on tensors: no modules, no state.

=============  =====================================================================
``lora``       scaling, ΔW, merging, the plain LoRA branch, default initialisations
``dropout``    the branch's dropout masks, drawn fast and kept packed 8 to a byte
``fused``      the fast LoRA linear path (autograd functions equal to ``lora``'s)
``dora``       DoRA's magnitude and direction (Liu et al. 2024)
``init``       PiSSA, OLoRA and orthogonal initialisations
``combine``    combining task tensors (task arithmetic, TIES, DARE)
``eva``        EVA's incremental SVD of layer inputs and its rank redistribution
=============  =====================================================================

Modules import one another in this order only (``fused`` uses ``dropout`` and ``lora``).
"""

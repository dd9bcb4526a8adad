"""The layers svdadapt adapts: ``bnb`` (bitsandbytes layers, one adapter between them and the rest), ``layers``
(the layer-kind table: shapes, weights, dtypes and the before-wrap / after-wrap / before-save hooks), ``backends``
(HQQ, torchao, quanto, compressed-tensors layers read through their own libraries), ``probe`` (any linear forward,
read by probing), ``targets`` (which modules a ``target_modules`` pattern names, tied and shared weights),
``qbase`` (a quantized base: options, schemes, quantizing a residual). Imports ``core`` only.
"""

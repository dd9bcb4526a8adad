"""The core: linear algebra, the method registry and the adaptation record. Imports no other svdadapt package.

Modules, each importing only those listed before it: ``linalg`` (truncated / randomized SVD, Gram routes,
whitening), ``allocate`` (per-layer ranks under a parameter budget, exact), ``patterns`` (PEFT's ``rank_pattern`` / ``alpha_pattern`` matching and checks), ``record`` (``AdaptRecord``, the factors and weight checksums, ``check_record``), ``methods`` (the
methods' math, ``MethodSpec`` and ``METHODS``, their options, ``finish`` and ``lora_scaling``).
"""

"""The engine both entry points share, above ``core``, ``modules`` and ``calibration``.

Modules, each importing only those listed before it: ``checks`` (the input checks), ``plan`` (the pure plan: one
``LayerInput`` -> one ``LayerPlan``), ``job`` (the user's keywords -> a validated ``Job``), ``apply`` (PEFT surgery:
plans -> adapters and new bases), ``sources`` (where layers come from: a model, a checkpoint), ``distributed``
(one process's share of the layers and batches, and the collectives).
"""

"""The streaming init of a checkpoint on disk (``svdadapt.init_checkpoint``), one tensor at a time.

Modules, each importing only those listed before it: ``lazy`` (decoder blocks loaded on demand), ``journal`` (the
resume journal and one layer's plan-or-journal step), ``inputs`` (the checks of the checkpoint and the reference),
``calibrated`` (the calibrated path: block by block over lazy blocks), ``init`` (``init_checkpoint``).
"""

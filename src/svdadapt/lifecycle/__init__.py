"""An adapter's life after planning: ``checkpoint`` (the save directory's format and ``verify``), ``export``
(``save`` / ``load`` / ``export_lora`` / ``unwrap`` and the training guard), ``compact`` (the compact export: each layer's update at a reduced rank, ``export_lora(rank=, energy=, ...)``), ``initdir`` (the init directory
``base/`` + ``adapter/``: written, verified, exported after training). Imports ``core``, ``storage``, ``modules``
and ``engine``.
"""

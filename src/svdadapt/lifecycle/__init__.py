"""An adapter's life after planning: ``checkpoint`` (the save directory's format and ``verify``), ``export``
(``save`` / ``load`` / ``export_lora`` / ``unwrap`` and the training guard), ``initdir`` (the init directory
``base/`` + ``adapter/``: written, verified, exported after training). Imports ``core``, ``storage``, ``modules``
and ``engine``.
"""

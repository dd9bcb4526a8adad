"""svdadapt: LoRA adapters initialized from the structure of a model's own weights and activations.

``svdadapt.wrap(model, method=..., rank=...)`` returns an ordinary ``peft.PeftModel``.
"""

import sys

from .core.allocate import Allocation, allocate_ranks
from .core.linalg import randomized_svd, truncated_svd
from .core.methods import METHODS, MethodSpec
from .engine.allocation import AllocateOptions
from .wrap import resolve_targets, wrap
from .quant import compress

sys.modules[__name__ + ".compress"] = compress  # public as svdadapt.compress (import it, or from it)
from .calibration import Covariances, collect_covariances, text_batches
from .lifecycle.export import export_lora, load, save, unwrap
from .stream.init import init_checkpoint
from .blockwise import BlockwiseOptions
from .lifecycle.checkpoint import verify
from .cli.plot import plot_ranks
from .modules.probe import register_linear, unregister_linear

__version__ = "0.1.0"

__all__ = ["wrap", "METHODS", "MethodSpec", "resolve_targets", "randomized_svd", "truncated_svd", "__version__",
           "Covariances", "collect_covariances", "text_batches", "compress", "save", "load", "export_lora", "unwrap",
           "init_checkpoint", "BlockwiseOptions", "verify", "allocate_ranks", "Allocation",
           "AllocateOptions", "plot_ranks", "register_linear", "unregister_linear"]

"""svdadapt: LoRA adapters initialized from the structure of a model's own weights and activations.

``svdadapt.wrap(model, method=..., rank=...)`` returns an ordinary ``peft.PeftModel``.
"""

from .linalg import randomized_svd, truncated_svd
from .methods import METHODS, MethodSpec
from .wrap import resolve_targets, wrap
from . import compress
from .calibration import Covariances, collect_covariances, text_batches
from .export import export_lora, load, save, unwrap
from .stream import init_checkpoint
from .blockwise import BlockwiseOptions
from .checkpoint import verify

__version__ = "0.1.0"

__all__ = ["wrap", "METHODS", "MethodSpec", "resolve_targets", "randomized_svd", "truncated_svd", "__version__",
           "Covariances", "collect_covariances", "text_batches", "compress", "save", "load", "export_lora", "unwrap",
           "init_checkpoint", "BlockwiseOptions", "verify"]

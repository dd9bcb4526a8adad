"""Calibration for CorDA and EoRA: the input covariances C = XᵀX / N of Linear layers, collected with forward hooks.

For users (also in ``svdadapt``): :class:`Covariances` (the mapping and its file), :func:`collect_covariances`,
:func:`text_batches`; :func:`as_covariances` turns what ``wrap(calibration=...)`` accepts into covariances.

For the block-by-block path (``svdadapt.blockwise``), which runs the same collection on one block at a time:
:func:`collect` (on given modules), :func:`hooked_targets`, :func:`run_batch` (one batch through a model, its masks
handed to a :class:`BatchState`), and the forward's helpers :func:`model_device`, :func:`eval_mode`,
:func:`first_tensor`, :func:`version`, :func:`caller_level`, :func:`fmt_bytes`, :func:`token_mask` (the tokens that
count in a batch: attention mask and labels).

MoE experts (``experts``): per-expert covariances of 3-D expert parameters (``collect_covariances(target_parameters=)``,
keys :func:`expert_key`), :func:`fallback_covariances` for experts with too few routed tokens.

Modules, each importing only those listed before it: ``covariances`` (the mapping, save / load), ``gram`` (XᵀX at
half the work), ``forward`` (what a calibration forward needs), ``masks`` (which tokens count), ``experts`` (the
routed tokens of MoE experts), ``collect`` (hooks and collection), ``batches`` (token batches from text).
"""

from .batches import text_batches
from .collect import BatchState, as_covariances, collect, collect_covariances, hooked_targets, run_batch
from .covariances import Covariances, fmt_bytes
from .experts import expert_key, fallback_covariances
from .forward import caller_level, eval_mode, first_tensor, model_device, version
from .masks import token_mask

__all__ = ["Covariances", "collect_covariances", "as_covariances", "text_batches",
           "collect", "hooked_targets", "run_batch", "BatchState",
           "model_device", "eval_mode", "first_tensor", "version", "caller_level", "fmt_bytes", "token_mask",
           "expert_key", "fallback_covariances"]

"""What running a model for calibration needs, for the whole-model collection (``collect.py``) and the
block-by-block path (``svdadapt.blockwise``) alike: where the model's data is, its forward without a KV cache (and,
when no target reads the output head, without the logits of every position), eval mode with every training flag
restored, a layer's input, the identity of a tensor's state, and the user's frame for a warning.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["version", "first_tensor", "model_device", "no_cache", "no_logits", "eval_mode", "caller_level"]

# the svdadapt package (this file is svdadapt/calibration/forward.py): its frames are not the user's
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version(x: torch.Tensor) -> object:
    """What tells two states of one tensor object apart: its version counter, bumped by every in-place op. An
    inference tensor has none: a fresh ``object()``, equal to nothing, so such an input is never taken as shared."""
    try:
        return x._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return object()


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input of a layer's forward: the first positional argument, else the first tensor keyword
    (``input=`` for nn.Linear, ``x=`` for transformers Conv1D)."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's data is: the device of its first parameter not on the meta device (weights loaded one
    block at a time, ``svdadapt.lazy``, leave the others there), CPU for none."""
    p = next((p for p in model.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def no_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (transformers models), else ``{}``:
    a calibration forward never needs a KV cache, and one built during it would be handed to every block
    (``svdadapt.blockwise`` runs the blocks again on their own)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (a builtin)
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def no_logits(model: nn.Module, targets: Iterable[nn.Module]) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` for a model whose forward takes ``logits_to_keep`` (transformers causal LMs) and
    whose output head (``get_output_embeddings()``) neither is nor holds one of ``targets``, else ``{}``. A
    calibration forward needs only its targets' inputs; the head over every position is a vocabulary-wide product
    (SmolLM2: 576 x 49152 per token, a fifth of the forward), over the last position it is negligible."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if "logits_to_keep" in params and callable(getter) else None
    except Exception:  # transformers' generic lookup raises for models it cannot place
        head = None
    if not isinstance(head, nn.Module):
        return {}
    inside = {id(m) for m in head.modules()}
    return {} if any(id(t) in inside for t in targets) else {"logits_to_keep": 1}


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode; every submodule's training flag restored one by one afterwards (``module.train()``
    would flip them all)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside svdadapt and torch's decorators (the user's call), counted
    from the caller of this function."""
    skip = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level

"""Which tokens of a hooked input count: the padding rule of the collection (``collect.py``).

Padding is dropped with the mask of the stack an input belongs to: ``attention_mask`` in the encoder (or the only
stack), ``decoder_attention_mask`` in the decoder of an encoder–decoder model, from inputs laid out (batch, seq, in)
or (batch·seq, in) (the rule: :class:`Masks`). A batch's ``labels`` equal to -100 (the positions no loss is
computed on: prompts, padding) are masked out the same way, for every calibrated method (:func:`batch_masks`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .forward import version

__all__ = ["Masks", "batch_masks", "encoder_decoder", "token_mask", "IGNORE_INDEX"]

_ENCODER, _DECODER = "encoder", "decoder"


def encoder_decoder(model: nn.Module) -> dict[str, nn.Module]:
    """The encoder and decoder of a transformers encoder–decoder model (``config.is_encoder_decoder``, through
    ``get_encoder()`` / ``get_decoder()``), else ``{}``: one stack, one mask."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return {}
    found = {}
    for stack, getter in ((_ENCODER, "get_encoder"), (_DECODER, "get_decoder")):
        try:
            m = getattr(model, getter)()
        except Exception:  # transformers' generic lookup raises for models it cannot place
            return {}
        found[stack] = m
    enc, dec = found[_ENCODER], found[_DECODER]
    ok = all(isinstance(m, nn.Module) and m is not model for m in (enc, dec)) and enc is not dec
    return found if ok else {}


class Masks:
    """The masks of one batch and which stack is running: decides which tokens of each hooked input count.

    The rule (encoder–decoder models; any other model has one stack, the batch's ``attention_mask``):
      - a module runs inside the encoder or the decoder (tracked by hooks on the two stacks); outside both, it
        belongs to the stack that ran last (``lm_head`` after the decoder), or the encoder before either ran;
      - in the encoder, inputs laid out (batch, seq) like ``attention_mask`` drop its padding;
      - in the decoder, the encoder states it was handed (``encoder_hidden_states``, the same tensor object at the
        same version: cross-attention k/v) take ``attention_mask``; inputs laid out like the decoder sequence take
        ``decoder_attention_mask`` (none given: every decoder token counts); an input laid out like the encoder
        mask but not like the decoder sequence (encoder states transformed first) takes ``attention_mask``;
      - an input laid out (batch·seq, in), one row per token (MoE blocks flatten the hidden states for their shared
        expert), takes the mask of its (batch, seq) layout flattened;
      - anything else (another layout, e.g. tokens gathered for a routed MoE expert) counts all its rows
        (:meth:`unmasked_padding` tells the collector, which warns when the batch has padding).
    """

    def __init__(self, enc: torch.Tensor | None, dec: torch.Tensor | None) -> None:
        self.enc, self.dec = enc, dec  # (batch, seq_enc) / (batch, seq_dec) bool, or None
        self.running: list[str] = []  # stacks entered and not yet left, innermost last
        self.last = _ENCODER
        self.enc_states: list[tuple[weakref.ref, object]] = []  # encoder states handed to the decoder
        self.dec_shape: tuple[int, ...] | None = None if dec is None else tuple(dec.shape)

    def enter(self, stack: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.running.append(stack)
        if stack != _DECODER:
            return
        states = kwargs.get("encoder_hidden_states")
        if isinstance(states, torch.Tensor):
            self.enc_states.append((weakref.ref(states), version(states)))
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        for t, dim in ((ids, 2), (embeds, 3)):
            if self.dec is None and isinstance(t, torch.Tensor) and t.dim() == dim:
                self.dec_shape = tuple(t.shape[:2])

    def leave(self, stack: str) -> None:
        if self.running and self.running[-1] == stack:
            self.running.pop()
        self.last = stack

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``x``'s real tokens: (batch, seq) for ``x`` laid out (batch, seq, in), (batch·seq,) for ``x``
        laid out (batch·seq, in) (a (batch, seq) layout flattened, as MoE blocks hand their shared expert), or
        None: every row counts."""
        enc = self.enc if self.enc is not None and _fits(x, tuple(self.enc.shape)) else None
        if (self.running[-1] if self.running else self.last) == _ENCODER:
            return _flat(enc, x)
        if any(r() is x and v == version(x) for r, v in self.enc_states):
            return _flat(enc, x)
        if self.dec_shape is not None and _fits(x, self.dec_shape):
            return _flat(self.dec, x)
        return _flat(enc, x) if self.dec_shape is not None else None

    def unmasked_padding(self, x: torch.Tensor) -> bool:
        """True when the batch has padding but ``x`` is laid out like no sequence of it (e.g. rows gathered for a
        routed MoE expert): its padding rows cannot be told apart and count."""
        layouts = [tuple(self.enc.shape)] if self.enc is not None else []
        layouts += [self.dec_shape] if self.dec_shape is not None else []
        padded = any(m is not None and not bool(m.all()) for m in (self.enc, self.dec))
        return padded and not any(_fits(x, layout) for layout in layouts)


def _fits(x: torch.Tensor, layout: tuple[int, ...]) -> bool:
    """``x`` (..., in) is laid out (batch, seq, in) or (batch·seq, in) for ``layout`` = (batch, seq)."""
    if x.dim() == 3:
        return tuple(x.shape[:2]) == layout
    return x.dim() == 2 and x.shape[0] == layout[0] * layout[1]


def _flat(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (batch, seq) as ``x`` needs it: itself for (batch, seq, in), flattened for (batch·seq, in)."""
    if mask is None:
        return None
    return mask if x.dim() == 3 else mask.reshape(-1)


IGNORE_INDEX = -100  # the label of a position no loss is computed on (transformers' and PEFT's EVA default)


def _label_mask(batch: Mapping[str, Any], mask: torch.Tensor | None, i: int, key: str) -> torch.Tensor | None:
    """``mask`` (batch, seq) bool or None, and-ed with ``labels != -100`` where the batch has ``labels`` laid out
    like it (or like ``input_ids`` when there is no mask): a position whose label is ignored counts nowhere."""
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return mask
    like = mask if mask is not None else batch.get("input_ids" if key == "attention_mask" else "decoder_input_ids")
    if isinstance(like, torch.Tensor) and tuple(like.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"batch {i}: labels has shape {tuple(labels.shape)}, but {key} (or the ids) "
                         f"{tuple(like.shape[:2])}: labels must be laid out like the sequence they label")
    keep = labels != IGNORE_INDEX
    return keep if mask is None else mask & keep


def batch_masks(batch: Mapping[str, Any], i: int, decoder_labels: bool = False) -> Masks:
    """The masks a dict batch gives: ``attention_mask`` (the encoder's, or the only stack's) and
    ``decoder_attention_mask``, each (batch, seq) or absent; ``labels`` (batch, seq) equal to -100 mask their
    positions out too, in the only stack's mask (``decoder_labels`` False) or the decoder's (an encoder–decoder
    model: labels are the decoder's)."""
    masks = []
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = batch.get(key)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"batch {i}: {key} must be (batch, seq), got shape {shape}")
        mask = None if mask is None else mask.bool()
        if (key == "decoder_attention_mask") == decoder_labels:
            mask = _label_mask(batch, mask, i, key)
        masks.append(mask)
    return Masks(*masks)


def token_mask(batch: Any, i: int = 0) -> torch.Tensor | None:
    """The (batch, seq) bool mask of the tokens that count in a decoder-only batch (``attention_mask`` and
    ``labels != -100``), None where every token counts or the batch is not a dict (the block-by-block path's
    capture, ``blockwise/capture.py``)."""
    return batch_masks(batch, i).enc if isinstance(batch, Mapping) else None

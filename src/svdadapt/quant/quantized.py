"""Planning with a quantized base: QPiSSA (and QMiLoRA / QCorDA), and EoRA from a full-precision model.

QPiSSA (PiSSA paper, §4): decompose W in full precision, quantize the residual. With ``iters`` > 1 it alternates
as LoftQ does — the adapter re-fits what quantization lost, ``B·A ← method(W − deq(Q(W_res)))``, then
``W_res ← W − s·B·A`` — and keeps the step whose ‖W − (deq(Q(W_res)) + s·B·A)‖ is smallest, so more steps never
do worse than one. bitsandbytes quantization is deterministic, so ``apply`` re-quantizing the final residual gets
the very matrix measured here.

EoRA with ``quantize=``: the compressed weight is deq(Q(W)) and the reference is W itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from ..engine.plan import Job, LayerInput, LayerPlan, plan_layer
from ..core.methods import finish
from ..modules.qbase import QuantOptions, quantize_dequantize

__all__ = ["plan_quantized_layer", "compressed_inputs"]


def _relative(diff: torch.Tensor, W: torch.Tensor) -> float:
    total = float(torch.linalg.vector_norm(W))
    return float(torch.linalg.vector_norm(diff)) / total if total > 0 else 0.0


@torch.no_grad()
def plan_quantized_layer(job: Job, layer: LayerInput, prepared: dict[str, Any] | None, quant: QuantOptions
                         ) -> LayerPlan:
    """``plan_layer`` for a base that is quantized after the decomposition, alternating ``quant.iters`` times.

    The report adds ``quant_error`` = ‖W − (deq(Q(W_res)) + s·B·A)‖ / ‖W‖ (the adapter + quantized base against
    the full-precision weight), ``qlora_error`` = ‖W − deq(Q(W))‖ / ‖W‖ (QLoRA's start, for comparison),
    ``residual_quant_error`` = ‖W_res − deq(Q(W_res))‖ / ‖W‖ (what an export to the full-precision base differs
    by) and ``quant_iter``, the step kept.
    """
    W = layer.W.to(torch.float32)
    best, target, scaling = None, W, job.scaling_of(layer.name)
    for step in range(1, quant.iters + 1):
        plan = plan_layer(job, replace(layer, W=target), prepared)
        sBA = scaling * (plan.B.to(W) @ plan.A.to(W))
        residual = finish(W, plan.A.to(W.device), plan.B.to(W.device), scaling, torch.float32)
        Q = quantize_dequantize(residual, quant.scheme)
        error = _relative(W - Q - sBA, W)
        if best is None or error < best[0]:
            best = (error, step, plan, _relative(residual - Q, W))
        target = W - Q
    error, step, plan, residual_error = best
    plan.report.update(quant_error=error, qlora_error=_relative(W - quantize_dequantize(W, quant.scheme), W),
                       residual_quant_error=residual_error, quant_iter=step)
    return plan


def compressed_inputs(layers: Iterable[LayerInput], scheme: str) -> Iterator[LayerInput]:
    """EoRA's inputs when the model is quantized here: W_c = deq(Q(W)) against the reference W."""
    for layer in layers:
        yield replace(layer, W=quantize_dequantize(layer.W, scheme).to(layer.W.dtype), reference=layer.W)

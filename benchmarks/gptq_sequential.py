"""A whole model quantized by GPTQ block by block, as GPTQModel's looper does it (``true_sequential=True``): block
i's calibration inputs come out of blocks 0 … i−1 already quantized, and inside a block the Linears are quantized in
GPTQModel's subsets for Llama (``models/definitions/llama.py``: q/k/v, then o, then gate/up, then down), each
subset's Hessian from inputs computed with the earlier subsets quantized. The block's outputs, computed with all its
Linears quantized, feed the next block.

Alongside each Hessian the same inputs give GPTQModel's EoRA statistics (``gptqmodel_ref.eora_statistics``: when
GPTQModel quantizes with an EoRA adapter, its EoRA processor hooks the same module inputs), so its EoRA can also be run
with the statistics it would have collected itself.

Block inputs are captured and carried with svdadapt's own block-by-block machinery (``svdadapt.blockwise``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gptqmodel_ref import eora_statistics, gptq_quantize, hessian_from_inputs
from svdadapt.blockwise.capture import capture
from svdadapt.blockwise.hidden import HiddenStates
from svdadapt.blockwise.stack import find_stack

__all__ = ["LLAMA_SUBSETS", "gptq_model"]

LLAMA_SUBSETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _subset_inputs(block: nn.Module, names: tuple[str, ...], store: HiddenStates, index: int
                   ) -> dict[str, list[torch.Tensor]]:
    """Every batch's input (batch, seq, in) of each of ``names`` (modules of ``block``), the block run on the
    carried hidden states (the outputs are dropped)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [block.get_submodule(n).register_forward_hook(lambda m, a, o, _n=n: seen[_n].append(a[0].detach()))
               for n in names]
    try:
        for j in range(len(store)):
            store.run(block, j, index)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def gptq_model(model: nn.Module, batches: list, subsets=LLAMA_SUBSETS, **gptq_options
               ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(a copy of ``model`` whose subsets' Linears hold GPTQ's dequantized W_c (fp32 ``nn.Linear``), GPTQModel's EoRA
    statistics of each quantized Linear (name -> (in, in))), calibrated on ``batches``; ``gptq_options`` go to
    ``gptq_quantize`` (its defaults: GPTQModel's)."""
    q = copy.deepcopy(model).eval()
    stack, blocks = find_stack(q)
    store = HiddenStates(budget=math.inf, offload_dir=None)
    capture(q, blocks, batches, store)
    stats: dict[str, torch.Tensor] = {}
    try:
        for i, block in enumerate(blocks):
            for names in subsets:
                inputs = _subset_inputs(block, names, store, i)
                for n in names:
                    layer = block.get_submodule(n)
                    layer.weight.copy_(gptq_quantize(layer.weight, hessian_from_inputs(inputs[n]), **gptq_options))
                    stats[f"{stack}.{i}.{n}"] = eora_statistics(inputs[n])
                del inputs
            for j in range(len(store)):
                store.set(j, store.run(block, j, i))
    finally:
        store.close()
    return q, stats

"""Block-by-block calibration for decoder stacks (GPTQ-style): one block's covariances alive at a time.

The whole-model path (``calibration.collect_covariances``) runs the model once per batch with hooks on every target
and holds every covariance until the plan is done. For a decoder stack (transformers Llama-family models:
``model.model.layers``, blocks run one after the other, each reading the previous one's output) this package instead

1. captures the inputs of block 0 for every batch (``capture.py``, into the hidden-state store of ``hidden.py``):
   a forward pre-hook records (args, kwargs) and stops the forward, without a KV cache. On batch 0 the forward runs
   through the whole stack first, to check that the blocks form a chain (``stack.Chain``): block j reads block j−1's
   output (the same tensor, unchanged). Blocks called with arguments of their own (Gemma2's per-layer sliding-window
   masks) have every block's call recorded. A model that is not such a chain (no stack, something between the
   blocks) raises :class:`BlockwiseUnsupported`, which ``wrap``'s automatic mode answers with the whole-model path;
2. for block i (``stage.py``): runs the block on every batch's hidden state with hooks on its targets only
   (``calibration.collect`` on a small module that runs the block, so padding, shared inputs and every check follow
   the whole-model rules), hands the block's covariances to ``plan`` (``wrap``'s: a ``ModelSource`` of the block's
   targets into ``plan.plan_layers``, covariance users counted per block), frees them, and keeps the block's
   outputs as block i+1's inputs.

The inputs a block sees are those of the whole-model forward, so the covariances, and the adapters, are the same.
Hidden states stay in memory up to ``BlockwiseOptions.memory_budget_mb`` and go to disk beyond (a temporary directory,
one file per batch, rewritten after every block); the per-batch keyword arguments stay in memory. Targets outside the
stack (an explicitly targeted ``lm_head``) are collected first by one whole-model pass with hooks on them alone. A
target module object used in two places (two blocks) is left to the whole-model path, which sees both uses.

EoRA's sequential variant (``sequential=True``): block i+1 reads the outputs of the *compressed* block i with its
just-computed compensation W_c + s·B·A applied (:class:`Compensation`): the activations the adapted model will see,
rather than the reference's. It gave the lower perplexity in every setting measured (docs/benchmarks.md), so it is
EoRA's default wherever the block-by-block path applies (``wrap``'s automatic ``blockwise=None`` and
``blockwise=True``); ``BlockwiseOptions(sequential=False)`` keeps the whole-model path's inputs (the same adapters as
``blockwise=False``).

Modules, each importing only those listed before it (and ``svdadapt.calibration``'s public names): ``stack`` (which
models: the stack, the chain check, :class:`BlockwiseUnsupported`), ``hidden`` (the hidden-state store), ``capture``
(block 0's inputs), ``stage`` (one block's covariances, plans and outputs), ``path`` (options,
:func:`plan_blockwise`, and :func:`routed_blockwise`: MoE experts' routed covariances block by block).
"""

from .path import BlockwiseOptions, Compensation, plan_blockwise, resolve, routed_blockwise
from .stack import BlockwiseUnsupported, block_of, find_stack

__all__ = ["BlockwiseOptions", "BlockwiseUnsupported", "Compensation", "find_stack", "block_of", "resolve",
           "plan_blockwise", "routed_blockwise"]

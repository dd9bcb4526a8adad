"""Block-by-block calibration for decoder stacks (GPTQ-style): one block's covariances alive at a time.

The whole-model path (``calibration.collect_covariances``) runs the model once per batch with hooks on every target
and holds every covariance until the plan is done. For a decoder stack (transformers Llama-family models:
``model.model.layers``, blocks run one after the other, each reading the previous one's output) this module instead

1. captures the inputs of block 0 for every batch: a forward pre-hook records (args, kwargs) and stops the forward
   (which runs with ``use_cache=False`` where the model takes it; a cache left in the arguments, positional as GPT-2
   passes it or keyword, is dropped: a block run again must not attend to the keys of an earlier run).
   On batch 0 the forward runs through the whole stack first, to check that the blocks form a chain: block j reads
   block j−1's output (the same tensor, unchanged) with the same keyword arguments as block 0 (attention mask,
   position embeddings). Where they do not (per-layer sliding-window masks, anything between the blocks) the
   whole-model path is used;
2. for block i: runs the block on every batch's hidden state with hooks on its targets only
   (``calibration._collect`` on a small module that runs the block, so padding, shared inputs and every check follow
   the whole-model rules), hands the block's ``LayerInput``s to the engine (``plan``: a ``ModelSource`` of the block's
   targets into ``engine.plan_layers``, covariance users counted per block), frees the covariances, and keeps the
   block's outputs as block i+1's inputs.

The inputs a block sees are those of the whole-model forward, so the covariances, and the adapters, are the same.
Hidden states stay in memory up to ``BlockwiseOptions.memory_budget_mb`` and go to disk beyond (a temporary directory,
one file per batch, rewritten after every block); the per-batch keyword arguments stay in memory. Targets outside the
stack (an explicitly targeted ``lm_head``) are collected first by one whole-model pass with hooks on them alone. A
target module object used in two places (two blocks) is left to the whole-model path, which sees both uses.

EoRA's sequential variant (``sequential=True``): block i+1 reads the outputs of the *compressed* block i with its
just-computed compensation W_c + s·B·A applied (forward hooks adding s·(x·Aᵀ)·Bᵀ, no PEFT model built): the
activations the adapted model will see, rather than the reference's. It gave the lower perplexity in every setting
measured (docs/benchmarks.md), so it is EoRA's default wherever the block-by-block path applies (``wrap``'s
automatic ``blockwise=None`` and ``blockwise=True``); ``BlockwiseOptions(sequential=False)`` keeps the whole-model
path's inputs (the same adapters as ``blockwise=False``).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import _collect, _first_tensor, _fmt_bytes, _model_device, _run_batch, _version, _caller_level
from .checks import check_covariances
from .engine import LayerPlan
from .methods import MethodSpec
from .targets import shared_modules
from .distributed import my_batches, reduce_covariances, world

__all__ = ["BlockwiseOptions", "find_stack", "block_of", "resolve", "plan_blockwise"]

# one block's targets (name -> module of the adapted model) and their checked covariances -> their plans
Plan = Callable[[dict[str, nn.Module], dict[str, torch.Tensor]], dict[str, LayerPlan]]


@dataclass(frozen=True)
class BlockwiseOptions:
    """How ``wrap(blockwise=...)`` calibrates block by block.

    memory_budget_mb: hidden states (and the per-batch keyword arguments) kept in memory up to this many MiB; the
        hidden states of the batches past it go to disk.
    offload_dir: where the temporary directory for those goes (None: the system's temporary directory).
    sequential: EoRA only: block i+1 reads the outputs of the compressed, already compensated block i (the paper's
        sequential variant) instead of the reference's (or, with ``calibrate_on="compressed"``, the uncompensated
        compressed block's). None: sequential where it applies (EoRA without ``quantize=``): it gave the lower
        perplexity in every setting measured (docs/calibration.md).
    """

    memory_budget_mb: float = 1024.0
    offload_dir: str | os.PathLike | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 or math.isinf(budget):
            raise ValueError(f"memory_budget_mb must be a finite number ≥ 0, got {budget!r}")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise TypeError(f"sequential must be None, True or False, got {self.sequential!r}")
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise ValueError(f"offload_dir={os.fspath(self.offload_dir)!r} is not a directory")


class _Unsupported(Exception):
    """The model is not a chain of blocks this module can run one at a time (the reason is the message)."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


# --------------------------------------------------------------------------------------------------- the stack
def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder stack of ``model``: (its name, the ModuleList of blocks), or None.

    ``model.model.layers`` when it is a ModuleList (transformers Llama-family models), else the ModuleList of at least
    two blocks of one type holding the most parameters. Encoder–decoder models have two stacks: None.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList) and len(inner.layers):
        for name, module in model.named_modules():
            if module is inner.layers:
                return name, module
    best, size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > size:
            best, size = (name, module), n
    return best


def block_of(name: str, stack: str, n_blocks: int) -> int | None:
    """The index of the block holding module ``name``, or None when it is outside the stack."""
    if not name.startswith(stack + "."):
        return None
    head = name[len(stack) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n_blocks else None


def resolve(blockwise: bool | BlockwiseOptions | None, spec: MethodSpec, calibration: Any,
            quantized: bool) -> BlockwiseOptions | None:
    """The options of the block-by-block path, or None for the whole-model one.

    None (automatic) and True take the block-by-block path when the method needs calibration and ``calibration`` is
    an iterable of batches (precomputed covariances need no forward pass); whether the model is a supported decoder
    stack is decided later, by :func:`plan_blockwise`. An explicit request (True or options) that cannot apply raises.
    ``sequential=None`` becomes True where it applies (a method that keeps the base, EoRA, without ``quantize=``):
    it gave the lower perplexity in every setting measured, so the automatic mode takes it too.
    """
    if blockwise is False:
        return None
    if blockwise is not None and not isinstance(blockwise, (bool, BlockwiseOptions)):
        raise TypeError("blockwise must be None, True, False or a svdadapt.blockwise.BlockwiseOptions, "
                        f"got {blockwise!r}")
    if spec.needs_calibration and not isinstance(calibration, Iterable):
        return None  # the whole-model path says what calibration must be
    batches = spec.needs_calibration and not isinstance(calibration, (Mapping, str, os.PathLike, torch.Tensor))
    if not batches:
        if blockwise is None:
            return None
        raise ValueError(f"blockwise={blockwise!r} calibrates from batches: method {spec.name!r} "
                         + ("was given precomputed covariances" if spec.needs_calibration else "needs no calibration"))
    options = blockwise if isinstance(blockwise, BlockwiseOptions) else BlockwiseOptions()
    if options.sequential is None:
        options = replace(options, sequential=not spec.rewrites_base and not quantized)
    if options.sequential and spec.rewrites_base:
        raise ValueError(f"sequential=True compensates a base left as it is (EoRA); {spec.name} rewrites the base "
                         "so that the wrapped model equals the original at init: its blocks already see the "
                         "original's inputs")
    if options.sequential and quantized:
        raise ValueError("sequential=True with quantize=: the compressed blocks exist only after the plan; "
                         "quantize the model first (a bitsandbytes model) and pass reference=")
    return options


# ------------------------------------------------------------------------------------------------ hidden states
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


Call = tuple[str | None, tuple[Any, ...], dict[str, Any]]  # (keyword of the hidden state or None, args, kwargs)


class _HiddenStates:
    """Per batch: the hidden state entering the current block (batch, seq, d), how the blocks are called (a
    ``Call``: the keyword carrying the hidden state, or None for the first positional argument, and the other
    arguments; one for every block, or one per block where they differ, e.g. per-layer attention masks) and the
    batch's attention mask. Hidden states stay in memory while the running total (the calls' tensors included, each
    counted once) is within ``budget`` bytes, and go to one file per batch beyond it."""

    def __init__(self, budget: float, offload_dir: str | os.PathLike | None) -> None:
        self.budget, self.offload_dir = budget, offload_dir
        self.used = self.on_disk = 0
        self.items: list[torch.Tensor | str] = []
        self.devices: list[torch.device] = []
        self.calls: list[list[Call]] = []  # per batch: [the call of every block] or [block 0's, block 1's, ...]
        self.masks: list[torch.Tensor | None] = []
        self._counted: set[int] = set()  # ids of the call tensors counted in ``used`` (held here: ids stay valid)
        self._dir: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, hidden: torch.Tensor, call: Call, mask: torch.Tensor | None) -> None:
        """A batch: its hidden state entering block 0 and block 0's call."""
        self.calls.append([])
        self.add_call(len(self.calls) - 1, call)
        self.masks.append(mask)
        self.devices.append(hidden.device)
        if self.used + _nbytes(hidden) <= self.budget:
            self.used += _nbytes(hidden)
            self.items.append(hidden)
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="svdadapt-hidden-", dir=self.offload_dir)
        self.items.append(os.path.join(self._dir.name, f"batch{len(self.items)}.pt"))
        self.on_disk += _nbytes(hidden)
        self.set(len(self.items) - 1, hidden)

    def add_call(self, i: int, call: Call) -> None:
        """Batch i's call of the next block (after block 0's: blocks called with arguments of their own)."""
        self.calls[i].append(call)
        for t in _tensors(call[1:]):
            if id(t) not in self._counted:
                self._counted.add(id(t))
                self.used += _nbytes(t)

    def get(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if isinstance(item, torch.Tensor) else torch.load(item, map_location=self.devices[i],
                                                                        weights_only=True)

    def set(self, i: int, hidden: torch.Tensor) -> None:
        if isinstance(self.items[i], torch.Tensor):
            self.items[i] = hidden
            return
        hidden = hidden.detach().cpu()
        if hidden.untyped_storage().nbytes() != _nbytes(hidden):  # a view: save the tensor, not its whole storage
            hidden = hidden.clone()
        torch.save(hidden, self.items[i])

    def run(self, block: nn.Module, i: int, j: int) -> torch.Tensor:
        """``block`` (block j of the stack) on batch i's hidden state; returns its output hidden state."""
        calls = self.calls[i]
        key, args, kwargs = calls[j if len(calls) > 1 else 0]
        hidden = self.get(i)
        out = block(hidden, *args, **kwargs) if key is None else block(*args, **{key: hidden}, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


# ------------------------------------------------------------------------------------------------------ capture
def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, torch.Tensor, tuple, dict]:
    """(keyword of the hidden state or None for the first positional argument, the hidden state, the other
    positional arguments, the other keyword arguments) of a block call."""
    if args and isinstance(args[0], torch.Tensor):
        return None, args[0], args[1:], kwargs
    x = _first_tensor((), kwargs)
    if x is None:
        raise _Unsupported("the first block was called without a tensor input")
    key = next(k for k, v in kwargs.items() if v is x)
    return key, x, args, {k: v for k, v in kwargs.items() if k != key}


def _is_cache(v: Any) -> bool:
    """A KV cache object (transformers' ``Cache`` classes, ``DynamicCache``, ``EncoderDecoderCache`` ...)."""
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__)


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block run on its own must not append to the forward's KV cache: caches become None, positional (GPT-2
    passes its cache second) or keyword, and ``use_cache`` False (attention then reads the new keys and values
    themselves, the values the cache would have handed back)."""
    args = tuple(None if _is_cache(v) else v for v in args)
    return args, {k: None if _is_cache(v) else (False if k == "use_cache" else v) for k, v in kwargs.items()}


def _same(a: Any, b: Any) -> bool:
    """The same call arguments: tensors (and caches) the same objects, other values equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # a comparison that does not give a bool
        return False


class _Capture:
    """Hooks on the blocks: record block 0's call for every batch (then stop the forward); on the first batch, run
    the whole stack and check that it is a chain (:mod:`svdadapt.blockwise`). Blocks called with arguments of their
    own (``varies``: per-layer attention masks, as Gemma2's sliding-window and full layers) have every block's call
    recorded: on the first batch from the real forward, on the others by ``_Recorder`` stand-ins."""

    def __init__(self, blocks: nn.ModuleList, store: _HiddenStates) -> None:
        self.blocks, self.store = blocks, store
        self.checking, self.varies, self.mask = True, False, None
        self.calls = [0] * len(blocks)
        self.first: Any = None  # block 0's (keyword, other args, kwargs) in the checked forward
        self.last: tuple[torch.Tensor, object] | None = None  # the previous block's output and its version
        self.template: Any = None  # the last block's output in the checked forward (what a stand-in returns)

    def pre(self, j: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key, hidden, rest, kw = _split(args, kwargs)
        if self.calls[j] or (j and self.calls[j - 1] != 1):
            raise _Unsupported(f"block {j} of the stack ran out of order or more than once per forward pass")
        self.calls[j] += 1
        self.record(j, key, hidden, rest, kw)
        if j == 0:
            self.first = (key, rest, kw)
            if not self.checking:
                raise _Stop
            return
        if self.last is None or hidden is not self.last[0] or _version(hidden) != self.last[1]:
            raise _Unsupported(f"block {j} of the stack does not read block {j - 1}'s output as it left it")
        self.varies = self.varies or not _same((key, rest, kw), self.first)

    def record(self, j: int, key: str | None, hidden: torch.Tensor, rest: tuple[Any, ...],
               kw: dict[str, Any]) -> None:
        call = (key, *_without_cache(rest, kw))
        if j == 0:
            self.store.add(hidden, call, self.mask)
        else:
            self.store.add_call(len(self.store) - 1, call)

    def post(self, j: int, out: Any) -> None:
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        self.last = (hidden, _version(hidden))
        if j == len(self.blocks) - 1:
            self.template = out
            raise _Stop

    def end_check(self) -> None:
        """After the checked forward: one call for every block unless their arguments differ."""
        self.checking = False
        if not self.varies:
            del self.store.calls[0][1:]

    def begin(self, batch: Any) -> None:
        self.calls = [0] * len(self.blocks)
        self.last = None
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.mask = mask if isinstance(mask, torch.Tensor) else None


class _Recorder(nn.Module):
    """Stands in for block j while the calls of blocks with arguments of their own are recorded: records the call
    and hands the hidden state on unchanged (shaped like the real block's output), so no block runs or is loaded.
    Other attributes are the block's own (a model may read e.g. ``layer.attention_type``)."""

    def __init__(self, j: int, block: nn.Module, cap: _Capture) -> None:
        super().__init__()
        object.__setattr__(self, "_stand_in", (j, block, cap))  # not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        j, _, cap = self._stand_in
        key, hidden, rest, kw = _split(args, kwargs)
        cap.record(j, key, hidden, rest, kw)
        if j == len(cap.blocks) - 1:
            raise _Stop
        out = cap.template
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._stand_in[1], name)


class _Batch:
    """What ``calibration._run_batch`` wants as its state: nothing to collect while capturing."""

    def begin(self, i: int, masks: Any) -> None:
        pass

    def end(self) -> None:
        pass


@contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode; every submodule's training flag restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _capture(model: nn.Module, blocks: nn.ModuleList, batches: list[Any], store: _HiddenStates) -> None:
    """Block 0's inputs and the blocks' calls for every batch into ``store``; ``_Unsupported`` when the stack is not
    a chain."""
    cap = _Capture(blocks, store)
    handles = []
    for j, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, _j=j: cap.pre(_j, m, a, k), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, _j=j: cap.post(_j, o)))
    originals = list(blocks)
    device = _model_device(model)
    try:
        with _eval(model):
            for i, batch in enumerate(batches):
                if i == 1 and cap.varies:  # the other batches' calls, without running any block
                    for j, block in enumerate(originals):
                        blocks[j] = _Recorder(j, block, cap)
                cap.begin(batch)
                try:
                    _run_batch(model, batch, i, device, _Batch())
                except _Stop:
                    if i == 0:
                        cap.end_check()
                    continue
                raise _Unsupported("the forward pass ended without running the whole stack of blocks")
    finally:
        for j, block in enumerate(originals):
            blocks[j] = block
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------- per block
class _BlockRun(nn.Module):
    """What ``calibration._collect`` runs for one block: ``forward(slot=j, attention_mask=m)`` runs the block on
    batch j's hidden state (the mask only tells the hooks which rows are padding) and, with ``keep``, stores the
    output as the next block's input."""

    def __init__(self, block: nn.Module, index: int, store: _HiddenStates, keep: bool) -> None:
        super().__init__()
        self.block = block
        self.index, self.store, self.keep = index, store, keep

    def forward(self, slot: int, attention_mask: torch.Tensor | None = None) -> None:
        out = self.store.run(self.block, slot, self.index)
        if self.keep:
            self.store.set(slot, out)


def _add_lora(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor, *,
              A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A forward hook: the output of W_c plus the compensation, as PEFT's LoRA layer computes it (the factors go to
    the input's device here: a block loaded only while it runs, ``svdadapt.lazy``, has no device before)."""
    x = _first_tensor(args, kwargs)
    A, B = A.to(x.device), B.to(x.device)
    return out + (((x.to(A.dtype) @ A.mT) @ B.mT) * scaling).to(out.dtype)


@contextmanager
def _compensated(modules: Mapping[str, nn.Module], plans: Mapping[str, LayerPlan], scaling: float) -> Iterator[None]:
    """Each named module computes W_c·x + s·B·A·x while inside."""
    handles = []
    try:
        for name, module in modules.items():
            A, B = plans[name].A, plans[name].B
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, _A=A, _B=B: _add_lora(m, a, k, o, A=_A, B=_B, scaling=scaling), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Stage:
    """What every block's step shares."""

    store: _HiddenStates
    plan: Plan
    hook_targets: dict[str, nn.Module]  # name -> the module hooked for calibration (on the hook model)
    targets: dict[str, nn.Module]  # name -> the module adapted (on the wrapped model)
    sequential: bool
    scaling: float
    tokens: int = 0

    def step(self, index: int, names: list[str], collect_block: nn.Module, propagate_block: nn.Module
             ) -> dict[str, LayerPlan]:
        """Plan block ``index``'s ``names`` from their covariances and move every hidden state past the block."""
        plans: dict[str, LayerPlan] = {}
        runner = _BlockRun(collect_block, index, self.store, keep=not self.sequential)
        if names:
            slots = [{"slot": j} if m is None else {"slot": j, "attention_mask": m}
                     for j, m in enumerate(self.store.masks)]
            plans = self.covariances_and_plans(runner, slots, names)
        elif not self.sequential:
            with _eval(collect_block):
                for j in range(len(self.store)):
                    runner(slot=j)
        if self.sequential:
            with _eval(propagate_block), _compensated({n: self.targets[n] for n in names}, plans, self.scaling):
                for j in range(len(self.store)):
                    self.store.set(j, self.store.run(propagate_block, j, index))
        return plans

    def covariances_and_plans(self, run: nn.Module, batches: list[Any], names: list[str]) -> dict[str, LayerPlan]:
        """``names``' covariances from ``run`` over ``batches`` (all-reduced over the ranks of a process group),
        handed to ``plan``; they are freed on return."""
        covs = _collect(run, batches, {n: self.hook_targets[n] for n in names}, torch.float32, progress=False)
        if world()[1] > 1:
            covs = reduce_covariances(covs)
        self.tokens = max(self.tokens, covs.tokens)
        targets = {n: self.targets[n] for n in names}
        return self.plan(targets, check_covariances(covs, targets))


# ----------------------------------------------------------------------------------------------------- the path
def _hook_targets(hook_model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """The modules of the model run for calibration that carry the targets' names."""
    from .layers import is_target_type

    modules = dict(hook_model.named_modules())
    out = {}
    for n in names:
        if n not in modules or not is_target_type(modules[n]):
            raise ValueError(f"the model run for calibration ({type(hook_model).__name__}) has no adaptable layer "
                             f"named {n!r}")
        out[n] = modules[n]
    return out


def _stacks(hook_model: nn.Module, model: nn.Module, sequential: bool, names: list[str]
            ) -> tuple[str, nn.ModuleList, nn.ModuleList]:
    """(the stack's name, the blocks calibrated, the blocks whose outputs are carried on), or ``_Unsupported``."""
    found = find_stack(hook_model)
    if found is None:
        raise _Unsupported(f"{type(hook_model).__name__} has no decoder stack (a ModuleList of identical blocks)")
    stack, blocks = found
    if not any(block_of(n, stack, len(blocks)) is not None for n in names):
        raise _Unsupported(f"no targeted layer lies inside the decoder stack {stack!r}")
    for a, b in shared_modules(hook_model, names)[:1]:  # one block's pass would see one of its uses only
        raise _Unsupported(f"module {a!r} is also used as {b!r}: its covariance comes from both uses")
    if not sequential or model is hook_model:
        return stack, blocks, blocks
    other = find_stack(model)
    if other is None or other[0] != stack or len(other[1]) != len(blocks):
        raise _Unsupported(f"the compressed model's decoder stack is not {stack!r} with {len(blocks)} blocks")
    return stack, blocks, other[1]


def _note(progress: bool, stage: _Stage, stack: str, n_blocks: int) -> None:
    if progress:
        store = stage.store
        print(f"svdadapt calibration: block by block over {stack!r} ({n_blocks} blocks), {len(stage.targets)} layers, "
              f"{stage.tokens:,} tokens; hidden states {_fmt_bytes(store.used)} in memory, "
              f"{_fmt_bytes(store.on_disk)} on disk")


@torch.no_grad()
def plan_blockwise(hook_model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable[Any], plan: Plan,
                   options: BlockwiseOptions = BlockwiseOptions(), *, model: nn.Module | None = None,
                   scaling: float = 1.0, strict: bool = True,
                   fallback: Callable[[list[Any]], dict[str, LayerPlan]] | None = None,
                   progress: bool = True) -> dict[str, LayerPlan]:
    """Every target's plan, the covariances collected one decoder block at a time.

    Args:
        hook_model: the model the batches run on (the reference, or the model itself).
        targets: name -> module of the model being adapted (``model``); ``hook_model`` has modules of the same names.
        batches: as for ``collect_covariances`` (dicts run as ``hook_model(**batch)``, or tensors).
        plan: (one block's targets, their covariances) -> their ``LayerPlan``s (``wrap``'s: a ``ModelSource`` into
            ``engine.plan_layers``, covariance users counted per block).
        options: memory budget, offload directory, EoRA's sequential variant (None here: not sequential; ``resolve``
            decides it for ``wrap``).
        model: the model being adapted (default ``hook_model``): with ``options.sequential`` its blocks, compensated
            by the plans, carry the hidden states on.
        scaling: the LoRA scaling s of the compensation (``sequential``).
        strict: raise ``ValueError`` when the model is not a supported decoder stack; otherwise say so in one line
            (``warnings.warn``) and return ``fallback(batches)`` (the whole-model path).
    Returns:
        name -> ``LayerPlan``, in the order of ``targets``.
    """
    model, sequential = hook_model if model is None else model, bool(options.sequential)
    batches, names = list(batches), list(targets)
    mine = my_batches(batches) if world()[1] > 1 else batches  # a process group: each rank runs its share
    hook_targets = _hook_targets(hook_model, names)
    store = _HiddenStates(options.memory_budget_mb * 2 ** 20, options.offload_dir)
    try:
        stack, blocks, carriers = _stacks(hook_model, model, sequential, names)
        _capture(model if sequential else hook_model, carriers, mine, store)
    except _Unsupported as e:
        store.close()
        if strict or fallback is None:
            raise ValueError(f"blockwise calibration: {e}") from None
        warnings.warn(f"svdadapt: {e}: calibrating on the whole model", stacklevel=_caller_level())
        return fallback(batches)
    stage = _Stage(store, plan, hook_targets, dict(targets), sequential, scaling)
    try:
        plans = _run_blocks(stage, hook_model, mine, stack, blocks, carriers, progress)
    finally:
        store.close()
    _note(progress, stage, stack, len(blocks))
    return plans


def _run_blocks(stage: _Stage, hook_model: nn.Module, batches: list[Any], stack: str, blocks: nn.ModuleList,
                carriers: nn.ModuleList, progress: bool) -> dict[str, LayerPlan]:
    """The targets outside the stack (one whole-model pass with hooks on them alone), then block after block up to
    the last one holding a target."""
    names = list(stage.targets)
    where = {n: block_of(n, stack, len(blocks)) for n in names}
    plans: dict[str, LayerPlan] = {}
    outside = [n for n in names if where[n] is None]
    if outside:
        plans.update(stage.covariances_and_plans(hook_model, batches, outside))
    last = max(i for i in where.values() if i is not None)
    for i in tqdm(range(last + 1), desc="svdadapt blocks", unit="block", disable=not progress):
        plans.update(stage.step(i, [n for n in names if where[n] == i], blocks[i], carriers[i]))
    return {n: plans[n] for n in names}

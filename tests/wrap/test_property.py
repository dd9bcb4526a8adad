"""Property-based test of ``svdadapt.wrap`` over random small models, methods, dtypes and target selections.

For every drawn example, EITHER

(a) ``wrap`` succeeds and
    - the LoRA layers sit on exactly the modules PEFT's selection rules pick (re-implemented here), only their
      factors train, the global RNG, the hooks and the original (reference) model are left alone;
    - pissa / milora / corda (ipa, kpa) are exact at init: in weight space, entry by entry, base + s·B·A is W up to
      one rounding of the residual (DESIGN.md), and the wrapped model's output equals the original's (tolerances
      below); eora leaves the compressed base bit-identical and does not increase any target's output error
      against the reference on the calibration inputs (the quantity EoRA minimizes; end to end through the
      nonlinearities nothing is guaranteed, so the end-to-end error is only noted);
    - ``svdadapt.save`` then plain ``peft.PeftModel.from_pretrained(copy of the original base, dir)`` (eora: of the
      compressed base) reproduces the wrapped model's outputs, and ``svdadapt.load`` rebuilds its state bit for
      bit — at init and again after a simulated training step (factors moved by ~5%: only then does the converted
      adapter B·A − B₀·A₀ carry anything); ``unwrap(merge=True)`` of the reloaded model keeps its outputs and
      ``unwrap()`` gives the original weights back within one rounding (eora: bit for bit);
OR
(b) the example is invalid (rank ≤ 0, not an int or above a target's min(out, in); alpha NaN, inf or ≤ 0; a NaN in
    a targeted weight; a selection matching nothing; svd='randomized' for the bottom of a spectrum; a target whose
    calibration input is all zeros) and ``wrap`` raises a ValueError / TypeError naming the offending keyword or
    module, leaving the model exactly as it was: same module tree, same state_dict bit for bit, same trainable
    flags, no hooks left behind, the reference untouched.

Valid examples must take branch (a): an error on them is a failure, not an acceptable outcome.

Models: ``nn.Sequential`` stacks of ``nn.Linear`` (with or without bias) and transformers ``Conv1D`` layers whose
sizes chain (1 to 24), a GELU between two layers, some layers nested one level down in an inner ``nn.Sequential``
(so that names such as ``0`` and ``2.0`` collide under PEFT's suffix rule). Spectra: Gaussian, rank one, zero,
flat (all singular values equal), ill-conditioned (1 … 1e-6). Inputs (rows, in) or (rows, seq, in). Selections:
"all-linear", lists of full names or of suffixes (passed as list, tuple or one-shot iterator), regexes, with or
without exclude_modules; svd auto / full / randomized with niter / oversample / seed, CorDA damping (0 included),
EoRA calibrate_on.

Output tolerances, relative in the Frobenius norm: fp64 1e-10, fp32 1e-5 (float noise of a few chained layers),
bf16 3e-2: a bf16 model's output carries about one bf16 rounding (unit roundoff 2⁻⁸ ≈ 3.9e-3) per layer from its
own weights and activations; the wrapped model rounds the residual base once more (no worse than casting W) and
PEFT's LoRA forward rounds each layer's output once more (base output, then the sum with the fp32 adapter), so
3e-2 is a few bf16 roundings over up to four layers. The bf16 messages also print how much casting the fp32 model to
bf16 moved its output, the natural yardstick. A relative tolerance cannot hold for a model whose output cancels (a
tiny W·h summed from large terms turns each activation rounding into a large relative error, the original model's
included), so an output also passes when every entry is within twice ``rounding_bound``: a componentwise
forward-error bound, a few roundings per layer propagated through |W|. The weight-space check is exact whatever
the conditioning.

Deterministic in CI (``derandomize=True``, 60 examples, ~10 s on one thread). To hunt for bugs with fresh random
examples: ``SVDADAPT_HYPOTHESIS_HUNT=500 pytest tests/test_property.py`` (derandomize off, 500 examples).
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft
import svdadapt

# derived in the module docstring: a few roundings (u64, √n·u32, u_bf16 = 2^-8) per layer, up to four layers
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
INVALID = ("rank_too_big", "rank_zero", "rank_not_int", "alpha_bad", "nan_weight", "no_match")
SPECTRA = ("gauss", "gauss", "gauss", "rank1", "zero", "flat", "illcond")

_HUNT = int(os.environ.get("SVDADAPT_HYPOTHESIS_HUNT", "0") or 0)
SETTINGS = settings(
    max_examples=_HUNT or 60,
    deadline=None,
    derandomize=not _HUNT,
    database=None,
    print_blob=True,
    # one_thread (conftest) is function-scoped: it only sets the thread count, nothing to reset between examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------------------------------------ the drawn example
@dataclass(frozen=True)
class Layer:
    kind: str  # "Linear" | "Conv1D"
    bias: bool
    spectrum: str
    out: int
    inp: int


@dataclass
class Case:
    dtype: str
    blocks: tuple  # each block: a Layer, or a tuple of Layers (an inner nn.Sequential)
    rows: int
    seq: int | None  # inputs (rows, seq, in) instead of (rows, in)
    calib_rows: int
    seed: int
    method: str
    mode: str | None
    svd: str
    rank: int
    alpha: float | None
    use_rslora: bool
    target_modules: object
    exclude_modules: object
    options: dict = field(default_factory=dict)  # more keywords: niter, oversample, seed, damping, calibrate_on
    container: str = "list"  # how a list selector is passed: "list", "tuple" or "iter" (a one-shot iterator)
    invalid: str | None = None  # what was made invalid on purpose (None: a valid example)
    nan_module: str | None = None
    expected_targets: list = field(default_factory=list)

    def describe(self) -> str:
        layers = ", ".join(f"{n}={l.kind}({l.inp}->{l.out}{'' if l.bias or l.kind == 'Conv1D' else ', no bias'}, "
                           f"{l.spectrum})"
                           for n, l in layer_names(self.blocks))
        return (f"dtype={self.dtype} layers=[{layers}] rows={self.rows} seq={self.seq} calib_rows={self.calib_rows} "
                f"seed={self.seed}\n"
                f"  wrap(method={self.method!r}, mode={self.mode!r}, svd={self.svd!r}, rank={self.rank}, "
                f"alpha={self.alpha!r}, use_rslora={self.use_rslora}, target_modules={self.target_modules!r}, "
                f"exclude_modules={self.exclude_modules!r}{''.join(f', {k}={v!r}' for k, v in self.options.items())}) "
                f"lists passed as {self.container}\n"
                f"  invalid={self.invalid!r} nan_module={self.nan_module!r} expected targets={self.expected_targets}")


def layer_names(blocks: tuple) -> list[tuple[str, Layer]]:
    """(module name, layer) in ``named_modules()`` order for the model ``build`` makes: a GELU between two
    top-level blocks and between two layers of an inner Sequential."""
    out = []
    for j, block in enumerate(blocks):
        if isinstance(block, Layer):
            out.append((str(2 * j), block))
        else:
            out += [(f"{2 * j}.{2 * k}", layer) for k, layer in enumerate(block)]
    return out


def peft_matches(selector, name: str) -> bool:
    """PEFT's rules, written out independently of svdadapt: a string is a full-match regex, a list matches exact
    names or dotted suffixes."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == t or name.endswith("." + t) for t in selector)


def expected_targets(blocks: tuple, target_modules, exclude_modules) -> list[str]:
    return expected_targets_of([n for n, _ in layer_names(blocks)], target_modules, exclude_modules)


def expected_targets_of(names: list[str], target_modules, exclude_modules) -> list[str]:
    if target_modules == "all-linear":  # an nn.Sequential has no output head: every layer
        found = names
    else:
        found = [n for n in names if peft_matches(target_modules, n)]
    if exclude_modules is not None:
        found = [n for n in found if not peft_matches(exclude_modules, n)]
    return found


@st.composite
def selections(draw, names: list[str]):
    """(target_modules, exclude_modules): "all-linear", a list of full names, a list of suffixes or a regex; when it
    selects two layers or more, an exclusion one time in two (some of them by name or suffix, or a regex)."""
    def suffix_of(s: list[str]) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n in s})

    subset = st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True)
    regex = st.one_of(subset.map(lambda s: "|".join(re.escape(n) for n in s)),
                      st.sampled_from([r".*", r"\d+", r"\d+\.\d+", r".*0", r"[02]", r"(0|2)(\.\d)?"]))
    target = draw(st.one_of(st.just("all-linear"), subset, subset.map(suffix_of), regex))
    chosen = expected_targets_of(names, target, None)
    exclude = None
    if len(chosen) >= 2 and draw(st.booleans()):
        some = st.lists(st.sampled_from(chosen), min_size=1, max_size=len(chosen) - 1, unique=True)
        exclude = draw(st.one_of(some, some.map(suffix_of), st.sampled_from([r"2(\.\d+)?", r"\d+\.0"])))
    return target, exclude


@st.composite
def options(draw, method: str, svd: str) -> dict:
    """The other keywords, each left at its default half the time."""
    out = {}
    if svd != "full" and draw(st.booleans()):
        out["niter"] = draw(st.sampled_from([None, 0, 1, 3]))
        out["oversample"] = draw(st.sampled_from([0, 2, 8]))
    if draw(st.booleans()):
        out["seed"] = draw(st.integers(0, 3))
    if method == "corda" and draw(st.booleans()):
        out["damping"] = draw(st.sampled_from([0.0, 1e-4, 1.0]))
    if method == "eora" and draw(st.booleans()):
        out["calibrate_on"] = draw(st.sampled_from(["reference", "compressed"]))
    return out


@st.composite
def cases(draw) -> Case:
    n_layers = draw(st.integers(1, 4))
    dims = draw(st.lists(st.one_of(st.integers(2, 10), st.just(1), st.integers(11, 24)), min_size=n_layers + 1,
                         max_size=n_layers + 1))
    layers = [Layer(draw(st.sampled_from(["Linear", "Linear", "Conv1D"])), draw(st.booleans()),
                    draw(st.sampled_from(SPECTRA)), dims[i + 1], dims[i]) for i in range(n_layers)]
    # group consecutive layers into blocks; a block of two or more becomes an inner nn.Sequential
    blocks, i = [], 0
    while i < n_layers:
        size = draw(st.integers(1, n_layers - i))
        group = tuple(layers[i:i + size])
        blocks.append(group[0] if size == 1 and draw(st.booleans()) else group)
        i += size
    blocks = tuple(blocks)
    names = [n for n, _ in layer_names(blocks)]
    shapes = dict((n, (l.out, l.inp)) for n, l in layer_names(blocks))

    method = draw(st.sampled_from(["pissa", "milora", "corda", "eora"]))
    mode = draw(st.sampled_from([None, "ipa", "kpa"])) if method == "corda" else None
    svd = draw(st.sampled_from(["auto", "auto", "auto", "full", "full", "randomized"]))
    target, exclude = draw(selections(names))
    # about one example in four is invalid on purpose; shrinking goes towards a valid one
    invalid = draw(st.integers(0, 23).map(lambda i: INVALID[i - 18] if i >= 18 else None))
    if invalid == "no_match":
        which = draw(st.sampled_from(["list", "regex", "exclude_all"]))
        if which == "list":
            target, exclude = ["nope", "2.nope"], None
        elif which == "regex":
            target, exclude = r"nope\d*", None
        else:
            exclude = r".*"
    targets = expected_targets(blocks, target, exclude)
    limit = min((min(shapes[n]) for n in targets), default=1)
    rank = draw(st.integers(1, limit))
    alpha = draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0, 16.0])))
    nan_module = None
    if invalid == "rank_too_big":
        rank = limit + draw(st.integers(1, 3))
    elif invalid == "rank_zero":
        rank = draw(st.sampled_from([0, -1]))
    elif invalid == "rank_not_int":
        rank = draw(st.sampled_from([True, float(rank)]))
    elif invalid == "alpha_bad":
        alpha = draw(st.sampled_from([math.nan, 0.0, -2.0, math.inf]))
    elif invalid == "nan_weight" and targets:
        nan_module = draw(st.sampled_from(targets))
    return Case(dtype=draw(st.sampled_from(list(DTYPES))), blocks=blocks, rows=draw(st.integers(1, 5)),
                seq=draw(st.one_of(st.none(), st.none(), st.integers(1, 3))),
                calib_rows=draw(st.integers(1, 12)), seed=draw(st.integers(0, 2**16)), method=method, mode=mode,
                svd=svd, rank=rank, alpha=alpha, use_rslora=draw(st.booleans()), target_modules=target,
                exclude_modules=exclude, options=draw(options(method, svd)),
                container=draw(st.sampled_from(["list", "list", "tuple", "iter"])), invalid=invalid,
                nan_module=nan_module, expected_targets=targets)


# ------------------------------------------------------------------------------------------------ building and running
def _weight(spectrum: str, out: int, inp: int, g: torch.Generator) -> torch.Tensor:
    """(out, in) fp64 weight with the named spectrum, scaled so activations stay O(1)."""
    k = min(out, inp)
    if spectrum == "zero":
        return torch.zeros(out, inp, dtype=torch.float64)
    if spectrum == "rank1":
        return torch.randn(out, 1, generator=g, dtype=torch.float64) @ torch.randn(1, inp, generator=g,
                                                                                  dtype=torch.float64) / inp ** 0.5
    if spectrum in ("flat", "illcond"):
        U = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))[0]
        S = torch.ones(k, dtype=torch.float64) if spectrum == "flat" else torch.logspace(0, -6, k, dtype=torch.float64)
        return (U * S) @ V.T
    return torch.randn(out, inp, generator=g, dtype=torch.float64) / inp ** 0.5


def build(case: Case, dtype: torch.dtype) -> nn.Sequential:
    """The model ``case`` describes, its weights from a private generator (the global RNG is left alone)."""
    g = torch.Generator().manual_seed(case.seed)

    def layer(spec: Layer) -> nn.Module:
        W, b = _weight(spec.spectrum, spec.out, spec.inp, g), 0.1 * torch.randn(spec.out, generator=g,
                                                                               dtype=torch.float64)
        if spec.kind == "Conv1D":
            m = Conv1D(spec.out, spec.inp)
            m.weight.data = W.T.contiguous()
            m.bias.data = b
        else:
            m = nn.Linear(spec.inp, spec.out, bias=spec.bias)
            m.weight.data = W
            if spec.bias:
                m.bias.data = b
        return m

    def chain(mods: list[nn.Module]) -> list[nn.Module]:
        return [x for i, m in enumerate(mods) for x in ([m] if i == len(mods) - 1 else [m, nn.GELU()])]

    with torch.random.fork_rng(devices=[]):  # the layers' own init draws from the global RNG
        items = [layer(b) if isinstance(b, Layer) else nn.Sequential(*chain([layer(l) for l in b]))
                 for b in case.blocks]
        model = nn.Sequential(*chain(items))
    return model.to(dtype).eval()


def inputs(case: Case, dtype: torch.dtype, rows: int, seed: int) -> torch.Tensor:
    """(rows, in) Gaussian inputs, or (rows, seq, in) for a sequence example."""
    d0 = layer_names(case.blocks)[0][1].inp
    shape = (rows, d0) if case.seq is None else (rows, case.seq, d0)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).to(torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    num, den = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def bits(t: torch.Tensor) -> bytes:
    """The tensor's bytes (NaN-safe bit-identity)."""
    return t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> dict:
    return {
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in model.state_dict().items()},
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def hooks_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def lora_names_any(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A")]


def lora_names(peft_model: nn.Module) -> list[str]:
    return [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]


# ------------------------------------------------------------------------------------------------ the property
@torch.no_grad()
def silent_targets(model: nn.Module, x: torch.Tensor, targets: list[str]) -> list[str]:
    """The targets whose input is exactly zero on ``x`` (behind a zero weight without bias): their covariance is
    zero, which calibration refuses (docs/errors.md)."""
    probe = copy.deepcopy(model)
    mods = dict(probe.named_modules())
    seen: dict[str, bool] = {}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, not bool(a[0].any())))
               for n in targets]
    try:
        probe(x)
    finally:
        for h in handles:
            h.remove()
    return [n for n in targets if seen.get(n)]


def _expected_error(case: Case, shapes: dict[str, tuple[int, int]], silent: list[str]) -> list[str] | None:
    """The substrings one of which the error message must contain, or None if the example is valid."""
    why: list[str] = []
    why += [f"covariance for {n!r} is zero" for n in silent]
    bottom = case.method == "milora" or (case.method == "corda" and case.mode == "kpa")
    if case.svd == "randomized" and bottom:
        why.append("svd='randomized'")
    if case.invalid in ("rank_zero", "rank_not_int"):
        why.append("rank must be a positive integer")
    if case.invalid == "alpha_bad":
        why.append("alpha must be a finite positive number")
    if not case.expected_targets:
        why.append("matched no")
    else:
        limit = min(min(shapes[n]) for n in case.expected_targets)
        if case.rank > limit:
            tight = [n for n in case.expected_targets if min(shapes[n]) == limit]
            why += [f"rank={case.rank} exceeds min(out, in) = {limit} of module {n!r}" for n in tight]
        if case.nan_module is not None:
            why.append(f"module {case.nan_module!r} has a weight with NaN")
    return why or None


def _eora_layer_errors(pm, reference: nn.Module, compressed: nn.Module, calibrated_on: nn.Module,
                       x_calib: torch.Tensor, targets: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per target: (‖(W_ref − W_c)·X‖², ‖(W_ref − W_c − s·B·A)·X‖², slack) over the inputs X of that layer in the
    model calibrated on, on the calibration batch, in fp64. EoRA's M minimizes the second over rank-r matrices and
    M = 0 is one of them, so it cannot exceed the first; slack bounds the rounding of the computed optimum."""
    ref_mods, comp_mods = dict(reference.named_modules()), dict(compressed.named_modules())
    layers = dict(pm.base_model.model.named_modules())
    probe = copy.deepcopy(calibrated_on)
    probe_mods = dict(probe.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [probe_mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
               for n in targets]
    try:
        run(probe, x_calib)
    finally:
        for h in handles:
            h.remove()
    # noise floor of errors squared, relative to ‖dW‖²‖X‖²: the fp32 factors' rounding (~2u32·κ) or fp64's (~1e-15)
    u = 1e-12 if x_calib.dtype == torch.float64 else 1e-5
    out = {}
    for n in targets:
        X = seen[n].to(torch.float64).reshape(-1, seen[n].shape[-1])  # (tokens, in)
        W_ref = _as_out_in(ref_mods[n]).to(torch.float64)
        W_c = _as_out_in(comp_mods[n]).to(torch.float64)
        lay = layers[n]
        A = lay.lora_A["default"].weight.detach().to(torch.float64)
        B = lay.lora_B["default"].weight.detach().to(torch.float64)
        M = float(lay.scaling["default"]) * (B @ A)
        dW = W_ref - W_c
        e0 = float(((dW @ X.T) ** 2).sum())
        e1 = float((((dW - M) @ X.T) ** 2).sum())
        scale = float(torch.linalg.matrix_norm(dW) ** 2 * torch.linalg.matrix_norm(X) ** 2)
        out[n] = (e0, e1, u * scale)
    return out


def _pass(selector, container: str):
    """A list selector as the container the example names (a string or None as it is)."""
    if not isinstance(selector, list):
        return selector
    return {"list": list, "tuple": tuple, "iter": iter}[container](selector)


UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def _effective_gap(pm, original: nn.Module, targets: list[str], dtype: torch.dtype
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target (out, in): |base + s·B·A − W| and the bound exactness at init allows, entry by entry: ONE rounding
    of the residual W − s·B·A to the weight dtype (DESIGN.md) plus the noise of computing it in fp32 (fp64 for fp64
    weights) from the rounded factors."""
    mods, layers = dict(original.named_modules()), dict(pm.base_model.model.named_modules())
    u_store = UNIT_ROUNDOFF[dtype]
    u_comp = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    out = {}
    for n in targets:
        lay = layers[n]
        W = _as_out_in(mods[n]).to(torch.float64)
        R = _as_out_in(lay.get_base_layer()).to(torch.float64)
        A = lay.lora_A["default"].weight.detach().to(torch.float64)
        B = lay.lora_B["default"].weight.detach().to(torch.float64)
        s = float(lay.scaling["default"])
        gap = (R + s * (B @ A) - W).abs()
        bound = 1.01 * u_store * R.abs() + (A.shape[0] + 2) * u_comp * (W.abs() + s * (B.abs() @ A.abs()))
        out[n] = (gap, bound)
    return out


def _check_effective_weights(pm, original: nn.Module, targets: list[str], dtype: torch.dtype, info: str
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exactness at init in weight space, entry by entry (``_effective_gap``, which it returns)."""
    layers = dict(pm.base_model.model.named_modules())
    gaps = _effective_gap(pm, original, targets, dtype)
    for n, (gap, bound) in gaps.items():
        if gap.numel() and bool((gap > bound).any()):
            i = int((gap - bound).argmax())
            W = _as_out_in(dict(original.named_modules())[n]).to(torch.float64)
            R = _as_out_in(layers[n].get_base_layer()).to(torch.float64)
            raise AssertionError(
                f"module {n!r}: base + s·B·A is off W by more than one rounding of the residual: entry {i} gap "
                f"{float(gap.flatten()[i]):.3e} > bound {float(bound.flatten()[i]):.3e} (|W| "
                f"{float(W.flatten()[i].abs()):.3e}, |residual| {float(R.flatten()[i].abs()):.3e}, ‖residual‖/‖W‖ = "
                f"{float(R.norm() / W.norm()) if W.norm() > 0 else math.nan:.3g}):\n{info}")
    return gaps


GELU_SLOPE = 1.13  # max |GELU'(t)| ≈ 1.129: how much GELU can amplify an error in its input
ROUNDINGS = 4  # roundings per layer allowed in the bound: the weight, the product, PEFT's base output and sum


@torch.no_grad()
def rounding_bound(base: nn.Module, pm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A componentwise forward-error bound (rows, out) on the outputs of the models compared here (the original or
    compressed ``base``, the wrapped ``pm``, its save / load / merge round trips) against the exact fp64 evaluation
    of the function ``pm`` computes now (base + s·B·A on its LoRA layers): ROUNDINGS roundings of unit roundoff u
    per layer, each relative to the magnitudes that layer adds up (|W|·|h| + |b| + |y|, with |W| widened to
    |W| + |base| + s·|B|·|A| + s·|B₀|·|A₀| on the LoRA layers: the rounded residual, the adapter and the converted
    adapter), carried to the output through |W| and GELU's slope. It catches what a relative tolerance cannot: a
    model whose output cancels (a tiny W·h from large terms) turns every rounding of its activations into a large
    relative output error, in the original model as well."""
    u = UNIT_ROUNDOFF[dtype]
    layers = dict(pm.base_model.model.named_modules())
    h, e = x.to(torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    for n, m in base.named_modules():
        if isinstance(m, nn.GELU):
            h = torch.nn.functional.gelu(h)
            e = GELU_SLOPE * e + ROUNDINGS * u * h.abs()
        elif isinstance(m, (nn.Linear, Conv1D)):
            W = _as_out_in(m).to(torch.float64)
            b = torch.zeros(W.shape[0], dtype=torch.float64) if m.bias is None else m.bias.detach().to(torch.float64)
            mag = W.abs()
            lay = layers.get(n)
            if lay is not None and hasattr(lay, "lora_A"):
                A = lay.lora_A["default"].weight.detach().to(torch.float64)
                B = lay.lora_B["default"].weight.detach().to(torch.float64)
                A0, B0 = (t.to(torch.float64) for t in pm.svdadapt.init_factors[n])  # in the converted adapter
                R = _as_out_in(lay.get_base_layer()).to(torch.float64)
                s = float(lay.scaling["default"])
                W = R + s * (B @ A)  # what pm computes
                mag = mag + W.abs() + R.abs() + s * (B.abs() @ A.abs()) + s * (B0.abs() @ A0.abs())
            y = h @ W.T + b
            e = e @ W.abs().T + ROUNDINGS * u * (h.abs() @ mag.T + b.abs() + y.abs())
            h = y
    return e


@torch.no_grad()
def perturb(pm, seed: int) -> None:
    """A stand-in for training: move every LoRA factor by about 5% of its mean magnitude, deterministically."""
    g = torch.Generator().manual_seed(seed)
    for n, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A"):
            for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                noise = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)
                w.add_(0.05 * (float(w.abs().mean()) + 1e-3) * noise)  # a step size, not a tolerance


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float, bound: torch.Tensor, info: str,
                note_: str = "") -> None:
    """``got`` equals ``want`` within ``tol`` relative (Frobenius), or entry by entry within twice the rounding bound
    (each of the two models may be off the exact result by the bound)."""
    err = rel(got, want)
    if err <= tol or bool(((got - want).abs() <= 2 * bound).all()):
        return
    worst = float(((got - want).abs() / (2 * bound).clamp_min(1e-300)).max())  # 1e-300: no division by zero
    raise AssertionError(f"{what}: relative output error {err:.3e} > {tol:.1e}, and an entry is off by {worst:.3g}x "
                         f"the rounding bound{note_}:\n{info}")


def _as_out_in(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().T if isinstance(m, Conv1D) else m.weight.detach()


def example_case(blocks: tuple, **kw) -> Case:
    """A hand-written example (the strategy's fields, expected targets computed)."""
    defaults = dict(dtype="fp32", rows=3, seq=None, calib_rows=4, seed=7, method="pissa", mode=None, svd="auto",
                    rank=1, alpha=None, use_rslora=False, target_modules="all-linear", exclude_modules=None)
    c = Case(blocks=blocks, **{**defaults, **kw})
    c.expected_targets = expected_targets(blocks, c.target_modules, c.exclude_modules)
    return c


_L, _C = (lambda o, i, spec="gauss", bias=True: Layer("Linear", bias, spec, o, i),
          lambda o, i, spec="gauss": Layer("Conv1D", True, spec, o, i))
# nested, so that "0" is a suffix of "2.0": mixed Linear / Conv1D
_NESTED = (_L(6, 5), (_C(7, 6), _L(4, 7, "illcond")), _C(3, 4, "flat"))
EXAMPLES = [  # sub-cases every CI run covers, whatever the derandomized draw
    example_case(_NESTED, dtype="bf16", method="corda", mode="kpa", rank=2, target_modules=r"\d+(\.\d+)?",
                 exclude_modules=["2.2"], options={"damping": 0.0}),
    example_case(_NESTED, dtype="fp64", method="milora", rank=3, target_modules=["0"], container="iter",
                 use_rslora=True, alpha=3.0),
    example_case(_NESTED, method="eora", rank=2, target_modules=["0", "4"], seq=2,
                 options={"calibrate_on": "compressed"}),
    example_case(_NESTED, dtype="bf16", method="eora", rank=3, svd="randomized", options={"niter": 1}),
    example_case(_NESTED, method="corda", rank=2, target_modules=["2.0", "2.2"]),
    example_case(_NESTED, rank=4, invalid="rank_too_big"),  # 2.2 and 4 are 3 wide at most
    example_case(_NESTED, target_modules=["q_proj"], invalid="no_match"),
    example_case(_NESTED, method="corda", nan_module="2.0", invalid="nan_weight"),
    example_case(_NESTED, method="milora", svd="randomized"),
    # a bf16 output that cancels (rank-one last layer after an ill-conditioned one): the rounding bound's case
    example_case(((_C(2, 1, "flat"), _C(14, 2, "rank1")), (_C(6, 14, "illcond"), _L(7, 6, "rank1", bias=False))),
                 dtype="bf16", rows=1, seed=0),
]


def _with_examples(test):
    for c in reversed(EXAMPLES):
        test = example(case=c)(test)
    return test


@SETTINGS
@_with_examples
@given(case=cases())
def test_wrap_exact_and_round_trip_or_documented_error(one_thread, case: Case):
    note(case.describe())
    dtype = DTYPES[case.dtype]
    shapes = {n: (l.out, l.inp) for n, l in layer_names(case.blocks)}
    original = build(case, dtype)
    x = inputs(case, dtype, case.rows, case.seed + 1)
    x_calib = inputs(case, dtype, case.calib_rows, case.seed + 2)

    if case.method == "eora":
        model = svdadapt.compress.quantize(original, bits=4, group_size=8)  # a copy; W_c
        peft_base = model  # what the saved EoRA adapter applies to
        kw = dict(calibration=[x_calib], reference=original)
    else:
        model = copy.deepcopy(original)
        peft_base = original
        kw = dict(calibration=[x_calib]) if case.method == "corda" else {}
    if case.nan_module is not None:
        with torch.no_grad():
            dict(model.named_modules())[case.nan_module].weight.view(-1)[0] = math.nan
    untouched = copy.deepcopy(model)  # what `model` must still be after a failed call (and the PEFT base for EoRA)
    if case.method == "eora":
        peft_base = untouched
    before = snapshot(model)
    reference_before = snapshot(original)
    rng = torch.get_rng_state()
    # the model the calibration batches run on: CorDA's own, EoRA's reference unless calibrate_on="compressed"
    on_compressed = case.method == "corda" or case.options.get("calibrate_on") == "compressed"
    calibrated_on = untouched if on_compressed else original
    silent = []
    if case.method in ("corda", "eora") and case.expected_targets and case.nan_module is None:
        silent = silent_targets(calibrated_on, x_calib, case.expected_targets)
    expect_error = _expected_error(case, shapes, silent)
    info = case.describe()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notes on mixed Linear / Conv1D models
            pm = svdadapt.wrap(model, case.method, case.rank, alpha=case.alpha, use_rslora=case.use_rslora,
                               target_modules=_pass(case.target_modules, case.container),
                               exclude_modules=_pass(case.exclude_modules, case.container),
                               svd=case.svd, mode=case.mode, progress=False, **kw, **case.options)
    except (ValueError, TypeError) as e:
        # ---------------------------------------------------------------- (b) a documented error, model unchanged
        msg = f"{type(e).__name__}: {e}"
        event(f"(b) {next((w for w in expect_error or [] if w in str(e)), 'unexpected')[:26]}")
        assert expect_error is not None, f"wrap refused a valid example:\n{msg}\n{info}"
        assert any(s in str(e) for s in expect_error), \
            f"the error names none of {expect_error}:\n{msg}\n{info}"
        after = snapshot(model)
        assert after["tree"] == before["tree"], f"module tree changed by a failed wrap ({msg}):\n{info}"
        assert after["grad"] == before["grad"], f"trainable flags changed by a failed wrap ({msg}):\n{info}"
        changed = [k for k in before["state"] if after["state"].get(k) != before["state"][k]]
        assert not changed and after["state"].keys() == before["state"].keys(), \
            f"state_dict changed by a failed wrap ({msg}): {changed}\n{info}"
        assert not hooks_left(model) and not hooks_left(original), f"hooks left behind ({msg}):\n{info}"
        assert snapshot(original) == reference_before, f"the reference model changed ({msg}):\n{info}"
        assert torch.equal(torch.get_rng_state(), rng), f"wrap changed the global RNG ({msg}):\n{info}"
        return

    # -------------------------------------------------------------------- (a) success
    event(f"(a) {case.method} {case.dtype}")
    assert expect_error is None, \
        f"wrap accepted an invalid example (expected an error naming {expect_error}):\n{info}"
    assert isinstance(pm, peft.PeftModel), info
    assert torch.equal(torch.get_rng_state(), rng), f"wrap changed the global RNG:\n{info}"
    assert not hooks_left(pm) and not hooks_left(original), f"calibration hooks left behind:\n{info}"
    assert snapshot(original) == reference_before, f"wrap changed the reference/original model:\n{info}"
    targets = case.expected_targets
    assert pm.svdadapt.targets == targets, f"targets {pm.svdadapt.targets} != PEFT's rules {targets}:\n{info}"
    assert lora_names(pm) == targets, f"LoRA layers on {lora_names(pm)}, expected {targets}:\n{info}"
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    want = sorted(f"base_model.model.{t}.lora_{ab}.default.weight" for t in targets for ab in "AB")
    assert trainable == want, f"trainable {trainable} != {want}:\n{info}"

    tol = TOL[dtype]
    eff_gap: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per target: |base + s·B₀·A₀ − W| and its bound
    y_pm = run(pm, x)
    cast_note = ""
    if dtype == torch.bfloat16:  # for the reader: how much casting the fp32 model to bf16 moved its output
        cast = rel(run(original, x), run(build(case, torch.float32), x.to(torch.float32)))
        cast_note = f" (casting the fp32 weights to bf16 alone changes the output by {cast:.2e})"
    bound = rounding_bound(peft_base, pm, x, dtype)
    if case.method == "eora":
        # the compressed base is untouched, the compensation does not increase any target's error on the calibration
        base_now = {n: m.get_base_layer().weight for n, m in pm.base_model.model.named_modules() if n in targets}
        untouched_mods = dict(untouched.named_modules())
        for n in targets:
            assert bits(base_now[n]) == bits(untouched_mods[n].weight), f"eora rewrote the base of {n!r}:\n{info}"
        errors = _eora_layer_errors(pm, original, untouched, calibrated_on, x_calib, targets)
        for n, (e0, e1, slack) in errors.items():
            # "no worse": 1e-6 relative for fp64 norms of fp32 factors, plus the floor u·‖dW‖²·‖X‖² (_eora_layer_errors)
            assert e1 <= e0 * (1 + 1e-6) + slack, \
                f"eora increased the calibration error of {n!r}: {e1:.6e} > {e0:.6e} (slack {slack:.1e}):\n{info}"
        ratios = {n: (e1 / e0 if e0 else 0.0) for n, (e0, e1, _) in errors.items()}
        end_to_end = (rel(run(pm, x_calib), run(original, x_calib)), rel(run(untouched, x_calib), run(original, x_calib)))
        note(f"eora per-layer error after/before: {ratios}; end to end on the calibration (not guaranteed through "
             f"the nonlinearities): {end_to_end[0]:.3e} with the adapter, {end_to_end[1]:.3e} without")
        event(f"eora end to end on the calibration: {'better' if end_to_end[0] <= end_to_end[1] else 'WORSE'}")
    else:
        eff_gap = _check_effective_weights(pm, original, targets, dtype, info)
        check_close("not exact at init", y_pm, run(original, x), tol, bound, info, cast_note)
        if case.method == "corda":
            check_close("not exact at init on the calibration batch", run(pm, x_calib), run(original, x_calib), tol,
                        rounding_bound(peft_base, pm, x_calib, dtype), info, cast_note)

    # save -> plain PEFT on the original base (EoRA: the compressed base) -> the same outputs; svdadapt.load rebuilds
    # the state bit for bit. Once at init, once after a simulated training step (the factors moved off their init:
    # only then does the converted adapter B·A − B₀·A₀ carry anything, and its alpha matter)
    for step in ("at init", "after a training step"):
        if step != "at init":
            perturb(pm, case.seed + 3)
            y_pm = run(pm, x)
            bound = rounding_bound(peft_base, pm, x, dtype)
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            svdadapt.save(pm, d)
            plain = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), d)
            assert lora_names(plain) == targets, \
                f"PEFT put the saved adapter on {lora_names(plain)} ({step}):\n{info}"
            check_close(f"save -> PeftModel.from_pretrained changed the output {step}", run(plain, x), y_pm, tol,
                        bound, info, cast_note)
            loaded = svdadapt.load(copy.deepcopy(peft_base), d, progress=False)
        a, b = snapshot(loaded), snapshot(pm)
        changed = [k for k in a["state"] if a["state"][k] != b["state"].get(k)]
        assert a["state"].keys() == b["state"].keys(), f"svdadapt.load built another state_dict ({step}):\n{info}"
        assert not changed, \
            f"svdadapt.load did not rebuild the wrapped state bit for bit ({step}): {changed}:\n{info}"

    # unwrap(merge=True) of the reloaded model: the trained weights merged, the same outputs without PEFT
    merged = svdadapt.unwrap(loaded, merge=True)
    assert not lora_names_any(merged), f"unwrap(merge=True) left LoRA layers behind:\n{info}"
    check_close("unwrap(merge=True) changed the output", run(merged, x), y_pm, tol, bound, info, cast_note)

    # unwrap: the original model back (EoRA: the compressed one, bit for bit), within one rounding of each weight
    want = peft_base
    base_sd = {k: v.detach().to(torch.float64) for k, v in want.state_dict().items()}
    u_store = UNIT_ROUNDOFF[dtype]
    back = svdadapt.unwrap(pm)
    assert [(n, type(m).__name__) for n, m in back.named_modules()] == before["tree"], \
        f"unwrap gave another module tree:\n{info}"
    target_keys = {f"{n}.weight": n for n in targets}
    for k, v in back.state_dict().items():
        v = v.detach().to(torch.float64)
        if k in target_keys and case.method != "eora":
            _, wbound = eff_gap[target_keys[k]]  # (out, in)
            W = base_sd[k]
            conv = isinstance(dict(back.named_modules())[target_keys[k]], Conv1D)  # stored (in, out)
            limit = 1.01 * u_store * ((W.T if conv else W).abs() + wbound) + wbound
            limit = limit.T if conv else limit
            assert ((v - W).abs() <= limit).all(), \
                f"unwrap moved {k} by {float((v - W).abs().max()):.3e}, more than one rounding:\n{info}"
        else:
            assert bits(v) == bits(base_sd[k]), f"unwrap changed {k}:\n{info}"


def test_load_rebuilds_a_one_input_layer_bit_for_bit(one_thread, tmp_path):
    """The minimal case the property once shrank to: ``svdadapt.load`` rebuilds the wrapped state bit for bit, also
    for a layer with a single input feature (the plan's factors had the SVD's strides, B₀ (out, 1) with strides
    (1, out), and ``addmm`` rounds W − s·B₀·A₀ differently by layout; they are stored contiguous now)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 2, bias=False))
    original = copy.deepcopy(model)
    pm = svdadapt.wrap(model, "pissa", 1, alpha=3.0, progress=False)
    svdadapt.save(pm, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = svdadapt.load(copy.deepcopy(original), tmp_path, progress=False)
    a, b = snapshot(loaded)["state"], snapshot(pm)["state"]
    assert a == b
    assert not [w for w in caught if "not bit-identical" in str(w.message)]

"""One pure function per initialization method, and the registry ``METHODS``: each method owns its rules.

Every method maps one weight matrix (plus, where it needs them, a covariance and a reference weight) to LoRA
factors in PEFT's convention: ``B`` (out, r), ``A`` (r, in), with the adapter adding ``s·B·A`` (s the LoRA
scaling). A ``MethodSpec`` says everything else about a method: its modes and which end of the spectrum each keeps,
what it needs (calibration, a reference model), its typed options and their checks, whether it rewrites the
frozen base to ``W − s·B·A`` (:func:`finish` applies the rounding rules of DESIGN.md), and what its report shows.
Nothing outside this module asks which method it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import torch

from .linalg import DEFAULT_NITER, DEFAULT_OVERSAMPLE, TruncatedSVD, damped_cholesky, truncated_svd, whitening
from .patterns import layer_value

__all__ = ["Init", "SVDOptions", "CordaOptions", "EoraOptions", "MethodSpec", "METHODS", "get_method", "pissa",
           "milora", "corda", "eora", "eva", "finish", "lora_scaling", "layer_scaling", "truncated_stats", "SVD_CHOICES",
           "ReportColumn", "check_method_keywords", "method_keywords", "recorded_keywords", "mode_choices",
           "with_modes"]

SVD_CHOICES = ("auto", "full", "randomized")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SVDOptions:
    """How the truncated SVD is computed (see ``svdadapt.linalg.truncated_svd``)."""

    svd: str = "auto"
    niter: int | None = DEFAULT_NITER
    oversample: int = DEFAULT_OVERSAMPLE

    def __post_init__(self) -> None:
        if self.svd not in SVD_CHOICES:
            raise ValueError(f"svd must be one of {', '.join(SVD_CHOICES)}, got {self.svd!r}")
        if not (self.niter is None or (_is_int(self.niter) and self.niter >= 0)) or not (
                _is_int(self.oversample) and self.oversample >= 0):
            raise ValueError(f"niter and oversample must be integers >= 0 (niter may be None), got "
                             f"niter={self.niter!r}, oversample={self.oversample!r}")


@dataclass(frozen=True)
class CordaOptions:
    """CorDA: ``mode`` "ipa" (top-r, default) or "kpa" (bottom-r); initial ``damping`` λ of C + λ·mean(diag C)·I."""

    mode: str = "ipa"
    damping: float = 0.01

    def __post_init__(self) -> None:
        if not (_is_number(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")


@dataclass(frozen=True)
class EoraOptions:
    """EoRA: which model the calibration batches run on, ``"reference"`` (default) or ``"compressed"``."""

    calibrate_on: str = field(default="reference", metadata={"recorded": False})  # svdadapt.json never held it

    def __post_init__(self) -> None:
        if self.calibrate_on not in ("compressed", "reference"):
            raise ValueError(f"calibrate_on must be 'compressed' or 'reference', got {self.calibrate_on!r}")


@dataclass
class Init:
    """Result of one method on one layer.

    ``A`` (r, in) and ``B`` (out, r) in fp32 or fp64; ``sigma`` (r,) the singular values the adapter took;
    ``stats`` small per-layer numbers for reports (captured energy, damping, kept rank); ``total`` the energy of
    the decomposed matrix that ``sigma`` is part of (‖W‖²_F; CorDA ‖W·C‖²_F; EoRA ‖ΔW·S‖²_F), rank allocation's
    normaliser (None: not known).
    """

    A: torch.Tensor
    B: torch.Tensor
    sigma: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    total: float | None = None


def _factors(t: TruncatedSVD, scaling: float, right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·diag(√(S/s)), A = diag(√(S/s))·Vh (·right): s·B·A = U·diag(S)·Vh (·right)."""
    root = (t.S / scaling).sqrt()
    B = t.U * root  # (out, r)
    Vh = t.Vh if right is None else t.Vh @ right
    A = root[:, None] * Vh  # (r, in)
    return A, B


@torch.no_grad()
def pissa(W: torch.Tensor, *, rank: int, scaling: float, largest: bool = True, svd: SVDOptions = SVDOptions(),
          generator: torch.Generator | None = None) -> Init:
    """PiSSA: the top-``rank`` singular triplets of ``W`` (out, in); s·B·A = [W]_r (``largest=False``: MiLoRA)."""
    t = truncated_svd(W, rank, largest=largest, svd=svd.svd, niter=svd.niter, oversample=svd.oversample,
                      generator=generator)
    A, B = _factors(t, scaling)
    total = torch.linalg.vector_norm(W).square()  # ‖W‖², without a W-sized temporary
    return Init(A, B, t.S, {"energy": _fraction(t.S.pow(2).sum(), total)}, float(total))


@torch.no_grad()
def milora(W: torch.Tensor, *, rank: int, scaling: float, svd: SVDOptions = SVDOptions(),
           generator: torch.Generator | None = None, largest: bool = False) -> Init:
    """MiLoRA: the bottom-``rank`` singular triplets of ``W`` (out, in)."""
    return pissa(W, rank=rank, scaling=scaling, largest=largest, svd=svd, generator=generator)


def _fraction(part: torch.Tensor, total: torch.Tensor) -> float:
    """part / total, defined for a zero total (a zero weight: the adapter captures all of nothing)."""
    total = float(total)
    return float(part) / total if total > 0 else 1.0


@torch.no_grad()
def prepare_corda(C: torch.Tensor, *, options: CordaOptions = CordaOptions()) -> dict[str, Any]:
    """Per-covariance work shared by every layer that reads the same input: C_d and its Cholesky factor."""
    Cd = C.to(torch.float64, copy=True)  # C_d is formed in this copy: two d×d fp64 matrices in all
    L, lam = damped_cholesky(Cd, options.damping, inplace=True)
    return {"Cd": Cd, "L": L, "damping": lam}


@torch.no_grad()
def corda(W: torch.Tensor, *, rank: int, scaling: float, prepared: dict[str, Any], largest: bool = True,
          svd: SVDOptions = SVDOptions(), generator: torch.Generator | None = None) -> Init:
    """CorDA: SVD of W·C_d (out, in); IPA keeps the top ``rank`` triplets (``largest``), KPA the bottom.

    With V̂ᵀ = Vᵀ·C_d⁻¹ (a Cholesky solve, no explicit inverse), W = U·S·V̂ᵀ exactly and
    s·B·A = U_r·S_r·V̂_rᵀ.
    """
    Cd, L = prepared["Cd"], prepared["L"]
    WC = (W.to(torch.float64) @ Cd).to(W.dtype)  # (out, in)
    t = truncated_svd(WC, rank, largest=largest, svd=svd.svd, niter=svd.niter, oversample=svd.oversample,
                      generator=generator)
    Vhat_h = torch.cholesky_solve(t.Vh.to(torch.float64).mT, L).mT.to(W.dtype)  # (r, in) = Vh_r·C_d⁻¹
    t = TruncatedSVD(t.U, t.S, Vhat_h)
    A, B = _factors(t, scaling)
    total = WC.pow(2).sum()
    return Init(A, B, t.S, {"energy": _fraction(t.S.pow(2).sum(), total), "damping": prepared["damping"]}, float(total))


@torch.no_grad()
def prepare_eora(C: torch.Tensor, *, options: EoraOptions = EoraOptions()) -> dict[str, Any]:
    """Per-covariance whitening S (d, k) and S⁺ (k, d) in fp64."""
    S, S_pinv = whitening(C)
    return {"S": S, "S_pinv": S_pinv}


@torch.no_grad()
def eora(W: torch.Tensor, *, rank: int, scaling: float, prepared: dict[str, Any], reference: torch.Tensor,
         largest: bool = True, svd: SVDOptions = SVDOptions(), generator: torch.Generator | None = None) -> Init:
    """EoRA: the rank-``rank`` M minimizing ‖(ΔW − M)·X‖_F, ΔW = reference − W (out, in).

    M* = [ΔW·S]_r·S⁺ with S·Sᵀ = C; the base (the compressed ``W``) is left untouched. If C has fewer
    than ``rank`` usable directions the extra adapter rows are zero.
    """
    S, S_pinv = prepared["S"], prepared["S_pinv"]
    dW = reference.to(torch.float64) - W.to(torch.float64)
    M = (dW @ S).to(W.dtype)  # (out, k)
    k = min(rank, *M.shape)
    t = truncated_svd(M, k, largest=largest, svd=svd.svd, niter=svd.niter, oversample=svd.oversample,
                      generator=generator)
    A, B = _factors(t, scaling, right=S_pinv.to(W.dtype))
    if k < rank:  # rank-deficient calibration: pad with zero directions
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    err0 = M.pow(2).sum()
    resid = (err0 - t.S.pow(2).sum()).clamp_min(0)
    return Init(A, B, t.S, {"energy": _fraction(t.S.pow(2).sum(), err0),
                            "residual_error": _fraction(resid, err0) ** 0.5 if float(err0) > 0 else 0.0,
                            "kept_rank": float(S.shape[1])}, float(err0))


@torch.no_grad()
def prepare_eva(C: torch.Tensor, *, options: Any = None) -> dict[str, Any]:
    """Per-covariance eigendecomposition of the *centred* covariance C (in, in) in fp64: its eigenvalues λ
    (descending, clamped at 0) and eigenvectors as rows (in, in), and its trace (the total variance)."""
    evals, evecs = torch.linalg.eigh(C.to(torch.float64))
    return {"evals": evals.flip(0).clamp_min(0), "rows": evecs.flip(1).mT.contiguous(),
            "trace": float(C.to(torch.float64).diagonal().sum())}


@torch.no_grad()
def eva(W: torch.Tensor, *, rank: int, scaling: float, prepared: dict[str, Any], largest: bool = True,
        svd: SVDOptions = SVDOptions(), generator: torch.Generator | None = None) -> Init:
    """EVA (explained variance adaptation): A (r, in) = the top-``rank`` eigenvectors of the centred input
    covariance (the top right-singular vectors of the centred layer inputs), as rows; B (out, r) = 0, so the
    adapter adds nothing at init and the base is kept. ``sigma`` = √λ (λ the covariance's eigenvalues): rank
    allocation's gain σ² / total is λ / tr C, PEFT's explained variance ratio. ``rank`` is at most ``in``."""
    rows, evals, trace = prepared["rows"], prepared["evals"], prepared["trace"]
    if rank > rows.shape[0]:
        raise RuntimeError(f"rank {rank} exceeds the input width {rows.shape[0]}")
    A = rows[:rank].to(W.dtype)
    B = W.new_zeros(W.shape[0], rank)
    lam = evals[:rank]
    return Init(A, B, lam.sqrt(), {"energy": _fraction(lam.sum(), torch.tensor(trace))}, trace)


# ------------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class ReportColumn:
    """A per-layer number of the report: ``key`` in ``Init.stats``, its column label, and whether a high value is
    the bad end (the "worst layer" of a summary)."""

    key: str
    label: str
    high_is_bad: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: what a method computes, what it needs, its options, and what its report shows.

    ``modes`` maps each mode name to True if it keeps the top of the spectrum (largest singular values), False for
    the bottom; a method without modes has the single mode ``None``. The first mode is the default.
    ``options`` builds the typed per-method options from ``wrap``'s keywords; ``prepare(C, options=...)`` is the
    per-covariance work shared by layers that read the same input.
    """

    name: str
    init: Callable[..., Init]
    needs_calibration: bool
    needs_reference: bool
    rewrites_base: bool
    description: str
    prepare: Callable[..., dict[str, Any]] | None = None
    modes: dict[str | None, bool] = field(default_factory=lambda: {None: True})
    options_type: type | None = None
    mode_help: dict[str, str] = field(default_factory=dict)  # each named mode in a few words (the CLI's help)
    report: ReportColumn = ReportColumn("energy", "energy")
    extra_columns: tuple[str, ...] = ()
    allocation: str = "energy"  # the objective rank allocation maximizes (core/allocate.py OBJECTIVES)
    centered: bool = False  # its covariance is the centred one, C − μμᵀ (calibration's token means)
    scaled_factors: bool = True  # its factors depend on the LoRA scaling (s·B·A fixed); False: A, B as they are

    @property
    def default_mode(self) -> str | None:
        return next(iter(self.modes))

    def resolve_mode(self, mode: str | None) -> str | None:
        """``mode`` checked against this method's modes (None: the default)."""
        if mode is None:
            return self.default_mode
        if None in self.modes:
            names = " or ".join(map(repr, with_modes()))
            raise ValueError(f"mode={mode!r} only applies to method={names}, not {self.name!r}")
        if mode not in self.modes:
            raise ValueError(f"{self.name} mode must be {' or '.join(repr(m) for m in self.modes)}, got {mode!r}")
        return mode

    def largest(self, mode: str | None) -> bool:
        """True if ``mode`` keeps the largest singular triplets (a randomized sketch can find those only)."""
        return self.modes[mode]

    def options(self, mode: str | None, **given: Any) -> Any:
        """The method's typed options from ``wrap``'s keywords (``mode`` already resolved); None if it has none."""
        if self.options_type is None:
            return None
        fields = self.options_type.__dataclass_fields__
        kw = {k: v for k, v in given.items() if k in fields}
        if "mode" in fields:
            kw["mode"] = mode
        return self.options_type(**kw)


METHODS: dict[str, MethodSpec] = {
    "pissa": MethodSpec("pissa", pissa, needs_calibration=False, needs_reference=False, rewrites_base=True,
                        description="top-r singular triplets of W (principal components)"),
    "milora": MethodSpec("milora", milora, needs_calibration=False, needs_reference=False, rewrites_base=True,
                         description="bottom-r singular triplets of W (minor components)", modes={None: False}),
    "corda": MethodSpec("corda", corda, needs_calibration=True, needs_reference=False, rewrites_base=True,
                        description="context-oriented SVD of W·C: mode='ipa' top-r, mode='kpa' bottom-r",
                        prepare=prepare_corda, modes={"ipa": True, "kpa": False}, options_type=CordaOptions,
                        mode_help={"ipa": "keeps the top-r triplets of W*C (the task)",
                                   "kpa": "the bottom-r (keeps the knowledge in the calibration text frozen)"},
                        extra_columns=("damping",)),
    "eora": MethodSpec("eora", eora, needs_calibration=True, needs_reference=True, rewrites_base=False,
                       description="rank-r compensation of W_ref − W_c in the calibration-whitened space",
                       prepare=prepare_eora, options_type=EoraOptions,
                       report=ReportColumn("residual_error", "comp. error", True), allocation="eora"),
    "eva": MethodSpec("eva", eva, needs_calibration=True, needs_reference=False, rewrites_base=False,
                      description="A = top-r eigenvectors of the centred input covariance (explained variance), B = 0",
                      prepare=prepare_eva, report=ReportColumn("energy", "expl. var."), allocation="eva",
                      centered=True, scaled_factors=False),
}


def method_keywords() -> dict[str, tuple[Any, Any]]:
    """The flat keywords of the methods' options types (``mode``, ``damping``, ``calibrate_on``), in registry order:
    name -> (public default, annotation). Each default is its options type's own, except ``mode``'s, None (each
    method's default mode)."""
    out: dict[str, tuple[Any, Any]] = {"mode": (None, "str | None")}
    for spec in METHODS.values():
        for f in fields(spec.options_type or _NoOptions):
            out.setdefault(f.name, (f.default, f.type))
    return out


def recorded_keywords() -> list[str]:
    """The method keywords svdadapt.json's options record (``mode`` always, resolved; a field marked
    ``recorded: False`` never)."""
    hidden = {f.name for spec in METHODS.values() for f in fields(spec.options_type or _NoOptions)
              if not f.metadata.get("recorded", True)}
    return [k for k in method_keywords() if k not in hidden]


def mode_choices() -> list[str]:
    """Every named mode of the registry (the CLI's ``--mode`` choices)."""
    return list(dict.fromkeys(m for spec in METHODS.values() for m in spec.modes if m is not None))


def with_modes() -> list[str]:
    """The methods that have named modes."""
    return [spec.name for spec in METHODS.values() if None not in spec.modes]


@dataclass(frozen=True)
class _NoOptions:
    """A method without options: no fields."""


def check_method_keywords(**given: Any) -> None:
    """Validate every method-specific keyword of ``wrap`` by type and value, whichever method is chosen (a bad
    value is an error even where the method ignores it)."""
    for spec in METHODS.values():
        if spec.options_type is not None:
            fields = spec.options_type.__dataclass_fields__
            spec.options_type(**{k: v for k, v in given.items() if k in fields and k != "mode"})


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods are: {', '.join(METHODS)}")
    return METHODS[name]


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling s: alpha / r, or alpha / √r under rsLoRA (the same float PEFT computes)."""
    return alpha / (rank ** 0.5) if use_rslora else alpha / rank


def layer_scaling(name: str, rank: int, alpha: float, use_rslora: bool, rank_pattern: Mapping[str, int],
                  alpha_pattern: Mapping[str, float]) -> float:
    """The scaling PEFT gives module ``name``: ``lora_scaling`` of its own rank and alpha (its ``rank_pattern`` /
    ``alpha_pattern`` entries, else ``rank`` / ``alpha``)."""
    return lora_scaling(layer_value(rank_pattern, name, rank), layer_value(alpha_pattern, name, alpha), use_rslora)


def truncated_stats(stats: Mapping[str, float], energy: float) -> dict[str, float]:
    """A layer's ``Init.stats`` once its factors are cut to a lower rank that captures ``energy`` (a fraction of
    ``Init.total``): the captured ``energy``, and EoRA's relative ``residual_error`` √(1 − energy); the others as
    they were (rank allocation's truncation, engine/allocation.py)."""
    out = dict(stats, energy=energy)
    if "residual_error" in out:
        out["residual_error"] = max(0.0, 1.0 - energy) ** 0.5
    return out


@torch.no_grad()
def finish(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, base_dtype: torch.dtype) -> torch.Tensor:
    """The rewritten base W − s·B·A (out, in) from the factors *as the adapter stores them* (A (r, in), B (out, r)
    already rounded to the adapter dtype), computed in fp32 (fp64 for fp64 weights) and cast to ``base_dtype``
    once: the wrapped layer's output then equals the original's up to one rounding of the base (DESIGN.md)."""
    compute = torch.float64 if W.dtype == torch.float64 else torch.float32
    base = torch.addmm(W.to(compute), B.to(compute), A.to(compute), alpha=-scaling)  # one pass over W
    return base.to(base_dtype)

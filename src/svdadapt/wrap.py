"""``wrap()``: find the target Linears, let PEFT build plain LoRA layers, fill them from ``methods.py``."""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .linalg import DEFAULT_NITER, DEFAULT_OVERSAMPLE
from .methods import finish, get_method

__all__ = ["wrap", "resolve_targets", "SVD_CHOICES"]

SVD_CHOICES = ("auto", "full", "randomized")
ADAPTER = "default"


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def _matches(target_modules: str | Iterable[str], name: str) -> bool:
    """PEFT's matching rules: a string is a full-match regex; a list matches exact names or dotted suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(model: nn.Module, target_modules: str | Iterable[str] = "all-linear") -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that ``target_modules`` selects, by full module name.

    ``"all-linear"`` means every Linear except the output head (``get_output_embeddings()``); otherwise
    PEFT's rules apply (regex string, or names / dotted suffixes). Raises ``ValueError`` if nothing matches.
    """
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        skip = _output_head_names(model)
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _matches(target_modules, n)}
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}; "
            f"Linear modules are: {', '.join(linear[:12])}{' ...' if len(linear) > 12 else ''}"
        )
    return found


def _check_weight(name: str, module: nn.Linear, rank: int) -> None:
    w = module.weight
    packed = type(w).__name__ in {"Params4bit", "Int8Params"} or hasattr(w, "quant_state")
    if packed or not torch.is_floating_point(w):
        raise TypeError(
            f"module {name!r} has a {'packed-quantized ' if packed else ''}weight of dtype {w.dtype} "
            f"({type(module).__name__}); svdadapt decomposes floating-point weights only: "
            "load or dequantize the model in float32/bfloat16/float16 first"
        )
    out_f, in_f = w.shape
    if rank > min(out_f, in_f):
        raise ValueError(f"rank={rank} exceeds min(out, in) = {min(out_f, in_f)} of module {name!r} with weight {tuple(w.shape)}")


def _peft_target_list(model: nn.Module, names: list[str]) -> list[str]:
    """Short suffixes (``q_proj``…) when they select exactly ``names``; else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _matches(suffixes, n)}
    return suffixes if chosen == set(names) else sorted(names)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # one stream per layer, from the seed and the layer's name: a layer's sketch does not depend on which
    # other layers are targeted or in which order they are visited
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _reference_weights(reference: Any, names: list[str], targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    if isinstance(reference, nn.Module):
        mods = dict(reference.named_modules())
        get = lambda n: mods[n].weight if n in mods and hasattr(mods[n], "weight") else None  # noqa: E731
    elif isinstance(reference, Mapping):
        get = lambda n: reference.get(n + ".weight")  # noqa: E731
    else:
        raise TypeError(f"reference must be an nn.Module or a state dict, got {type(reference).__name__}")
    out = {}
    for n in names:
        w = get(n)
        if w is None:
            raise ValueError(f"reference has no weight for targeted module {n!r} (looked for {n + '.weight'!r})")
        if tuple(w.shape) != tuple(targets[n].weight.shape):
            raise ValueError(
                f"reference weight for {n!r} has shape {tuple(w.shape)}, the model's has {tuple(targets[n].weight.shape)}"
            )
        out[n] = w
    return out


@torch.no_grad()
def wrap(
    model: nn.Module,
    method: str,
    rank: int,
    *,
    alpha: float | None = None,
    target_modules: str | Iterable[str] = "all-linear",
    use_rslora: bool = False,
    svd: str = "auto",
    niter: int | None = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
    progress: bool = True,
    mode: str | None = None,
    damping: float = 0.01,
    calibration: Any = None,
    reference: Any = None,
    calibrate_on: str = "reference",
    task_type: str | None = None,
):
    """Wrap ``model`` in a PEFT LoRA model whose adapters are initialized by ``method``.

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` layers (a transformers model or a toy network). Its
            targeted weights are rewritten in place for methods that rewrite the base.
        method: one of ``svdadapt.METHODS``: ``"pissa"``, ``"milora"``, ``"corda"``, ``"eora"``.
        rank: LoRA rank r; 1 ≤ r ≤ min(out, in) of every target.
        alpha: LoRA alpha; None means alpha = rank (scaling 1).
        target_modules: ``"all-linear"`` (every Linear but the output head), a regex string, or a list of
            names / dotted suffixes, as in PEFT.
        use_rslora: scaling alpha/√r instead of alpha/r.
        svd: ``"auto"`` (per matrix: block-Krylov sketch for top-r of large matrices, else exact),
            ``"full"`` (exact LAPACK) or ``"randomized"``.
        niter, oversample: Krylov blocks beyond the first (default None: round(log2(short side)) per matrix)
            and extra columns per block (default 0; a block is at least 16 columns wide), see
            ``svdadapt.linalg.randomized_svd``.
        seed: seeds the sketches (a private generator per layer; the global RNG is left as it was).
        progress: show a progress bar over layers.
        mode: CorDA only, ``"ipa"`` (instruction-previewed: top-r, default) or ``"kpa"`` (knowledge-preserved:
            bottom-r).
        damping: CorDA's initial damping λ in C + λ·mean(diag C)·I (doubled until well conditioned).
        calibration: CorDA/EoRA: a ``Covariances`` (or mapping name -> (in, in) tensor), or an iterable of
            batches to collect one from (dicts passed as ``model(**batch)``, tensors as ``model(batch)``).
        reference: EoRA: the uncompressed model, or its state dict.
        calibrate_on: EoRA with batches: collect inputs on the ``"reference"`` (uncompressed) model, the
            default, or on the ``"compressed"`` one. The reference's inputs gave lower perplexity in 5 of 6
            settings on SmolLM2 (benchmarks/bench_eora.py, README), plausibly because the compensated model's
            activations are closer to the original's than to those of the uncompensated compressed model.
        task_type: PEFT task type; None picks ``"CAUSAL_LM"`` for ``*ForCausalLM`` models.

    Returns:
        ``peft.PeftModel``; only the LoRA factors require grad. ``peft_model.svdadapt`` holds the method,
        options, the initial factors (on CPU) and a per-layer report.
    """
    from peft import LoraConfig, get_peft_model

    spec = get_method(method)
    if _is_peft(model):
        raise TypeError(
            f"model is already a PEFT model ({type(model).__name__}); pass the base model (e.g. peft_model.get_base_model() "
            "after svdadapt.unwrap) to svdadapt.wrap"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if svd not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {', '.join(SVD_CHOICES)}, got {svd!r}")
    if (niter is not None and niter < 0) or oversample < 0:
        raise ValueError(f"niter and oversample must be >= 0, got niter={niter!r}, oversample={oversample!r}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if method == "corda":
        mode = "ipa" if mode is None else mode
        if mode not in ("ipa", "kpa"):
            raise ValueError(f"corda mode must be 'ipa' or 'kpa', got {mode!r}")
    elif mode is not None:
        raise ValueError(f"mode={mode!r} only applies to method='corda', not {method!r}")
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"method {method!r} needs calibration=: a svdadapt.Covariances or an iterable of batches")
    if spec.needs_reference and reference is None:
        raise ValueError(f"method {method!r} needs reference=: the uncompressed model or its state dict")
    if not (isinstance(damping, (int, float)) and 0 <= damping < float("inf")) or isinstance(damping, bool):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if calibrate_on not in ("compressed", "reference"):
        raise ValueError(f"calibrate_on must be 'compressed' or 'reference', got {calibrate_on!r}")
    largest = not (method == "milora" or mode == "kpa")
    if svd == "randomized" and not largest:
        raise ValueError(f"svd='randomized' cannot find the smallest singular triplets needed by {method!r}"
                         f"{' mode=kpa' if mode else ''}; use svd='full' or 'auto'")

    targets = resolve_targets(model, target_modules)
    names = list(targets)
    for n, m in targets.items():
        _check_weight(n, m, rank)

    refs = _reference_weights(reference, names, targets) if spec.needs_reference else {}
    cov_of: dict[str, torch.Tensor] = {}  # fetched once: a mapping that builds tensors on access keeps stable ids
    if spec.needs_calibration:
        from .calibration import as_covariances

        hook_model = model
        if calibrate_on == "reference" and spec.needs_reference:
            if not isinstance(reference, nn.Module) and not isinstance(calibration, (Mapping, str)):
                raise ValueError("calibrate_on='reference' (the default) collects on the reference model: pass "
                                 "reference= as an nn.Module (not a state dict), pass precomputed Covariances, or "
                                 "set calibrate_on='compressed'")
            hook_model = reference
        covs = as_covariances(calibration, hook_model, names, progress=progress)
        for n in names:
            if n not in covs:
                raise ValueError(f"calibration has no covariance for targeted module {n!r}")
            c, d = covs[n], targets[n].in_features
            cov_of[n] = c
            if tuple(c.shape) != (d, d):
                raise ValueError(f"covariance for {n!r} has shape {tuple(c.shape)}, expected ({d}, {d})")
            if not torch.isfinite(c).all():
                raise ValueError(f"covariance for {n!r} contains NaN or inf")
            if not c.diagonal().sum() > 0:  # checked before any weight is touched
                raise ValueError(f"covariance for {n!r} is zero: calibration saw no signal for this layer")

    from .export import attach, weight_checksum

    base_checksums = {n: weight_checksum(m.weight) for n, m in targets.items()}  # W before any rewrite, for export
    if task_type is None and type(model).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=_peft_target_list(model, names),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):  # PEFT's default init draws from the global RNG; ours is overwritten
        peft_model = get_peft_model(model, config)

    opts = dict(svd=svd, niter=niter, oversample=oversample)
    modules = dict(peft_model.base_model.model.named_modules())
    prepared: dict[int, dict[str, Any]] = {}
    # layers left per covariance: its preparation (fp64 C_d and Cholesky factor, or whitening) is dropped after
    # the last one, so at most a few are alive at a time instead of one per unique input
    users = Counter(id(c) for c in cov_of.values())
    report: dict[str, dict[str, Any]] = {}
    init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in tqdm(names, desc=f"svdadapt {method}", disable=not progress, unit="layer"):
        layer = modules[name]
        base = layer.get_base_layer()
        W = base.weight.detach().to(torch.float32)
        kw: dict[str, Any] = dict(rank=rank, scaling=float(layer.scaling[ADAPTER]), mode=mode,
                                  generator=_layer_generator(seed, name), **opts)
        if cov_of:
            C = cov_of[name]
            key = id(C)  # layers that read the same input share one covariance tensor and its preparation
            if key not in prepared:
                try:
                    prepared[key] = spec.prepare(C.to(W.device), damping=damping)
                except ValueError as e:
                    raise ValueError(f"covariance for {name!r}: {e}") from e
            kw["prepared"] = prepared[key]
            users[key] -= 1
            if users[key] == 0:
                del prepared[key]
        if spec.needs_reference:
            kw["reference"] = refs[name].detach().to(device=W.device, dtype=torch.float32)
        init = spec.init(W, **kw)
        lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        A, B, new_base = finish(W, init, kw["scaling"], lora_A.dtype, base.weight.dtype, spec.rewrites_base)
        lora_A.data.copy_(A)
        lora_B.data.copy_(B)
        if new_base is not None:
            base.weight.data.copy_(new_base)
        init_factors[name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
        report[name] = {"shape": tuple(W.shape), "sigma_max": float(init.sigma.max()) if init.sigma.numel() else 0.0,
                        **init.stats}
    peft_model.svdadapt = {
        "method": method,
        "rank": rank,
        "alpha": rank if alpha is None else alpha,
        "options": dict(opts, seed=seed, mode=mode, damping=damping, use_rslora=use_rslora),
        "targets": names,
        "init_factors": init_factors,
        "report": report,
    }
    attach(peft_model, peft_model.svdadapt, base_checksums)  # save_pretrained guard, see export.py
    return peft_model

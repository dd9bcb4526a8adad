"""GPTQModel's GPTQ quantizer and its EoRA, reimplemented compactly from its code (GPTQModel does not install here:
gptqmodel 7.7.0 needs torch ≥ 2.14.1, see docs/quantization.md).

Followed: github.com/ModelCloud/GPTQModel at commit f4c327a17eb3e24524d5a97a3d682e3696ae6a28 (2026-08-23):

- ``gptqmodel/quantization/gptq.py``: ``GPTQ.quantize`` (dead columns, the GAR / desc_act permutation, the column
  loop with lazy block updates, blocksize 128), ``GPTQ.hessian_inverse`` (H + damp·mean(diag H)·I, Cholesky,
  ``cholesky_inverse``, upper Cholesky of H⁻¹; damp raised by ``damp_auto_increment`` on failure),
  ``materialize_global_hessian`` (H = 2/n·Σ XᵀX in fp32);
- ``gptqmodel/quantization/quantizer.py``: ``Quantizer.find_params`` (per-row min/max, the symmetric grid
  scale = 2·max|x|/maxq with zero = (maxq+1)/2) and ``quantize`` (clamp(round(x/scale) + zero, 0, maxq));
- ``gptqmodel/quantization/gar.py``: group-aware reordering (within a group by diag H descending, the groups by
  their largest diag H descending, stable);
- ``gptqmodel/quantization/config.py``: the GPTQ defaults used here: bits 4, group_size 128, sym True,
  desc_act False, act_group_aware True (``GPTQConfig.__post_init__``: on for method GPTQ), static_groups False,
  mse 0, damp_percent 0.05, damp_auto_increment 0.01 (``_default_damp_percent``), true_sequential True;
- ``gptqmodel/eora/eora.py``: ``eora_process_input`` / the accumulation of ``looper/eora_processor.py`` (each
  batch's Σ XᵀX / num_batches, the running total scaled by num_batches / (num_batches + batch) before each add) and
  ``eora_compute_lora`` (fp64 eigh of the statistics, eigenvalues ≤ max(λ)·min(1, d·eps(fp32)) dropped, the
  scalings cast to fp32, full fp32 SVD of ΔW·S, B = U_r·√Σ_r, A = √Σ_r·V_r·S⁻¹).

Where this departs from it: CPU and fp32 throughout (GPTQModel runs on a GPU, with the layer in fp16 / bf16: there
its W_c and A, B are cast to the module's dtype; here the module is fp32, so nothing is cast); no multi-device
partial Hessians or chunked XᵀX (one fp32 sum, the same quantity); no diagonal-floor rescue in the Hessian inverse
(GPTQModel's second fallback after the damp loop fails; never reached on SmolLM2's layers, where the first damp
succeeds); no static_groups, mse search, GPTAQ / FOEM, tensor-parallel padding or Conv layers; the dequantized W_c is
returned instead of packed int4 codes, scales and zeros (the same values: scale·(q − zero)).
"""

from __future__ import annotations

import torch

__all__ = ["gptq_quantize", "rtn_quantize", "hessian_from_inputs", "gptqmodel_eora", "eora_statistics",
           "gar_permutation", "find_params"]


# --------------------------------------------------------------------------------------------- the 4-bit grid
def find_params(x: torch.Tensor, bits: int, sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``Quantizer.find_params(x, weight=True)`` per channel: (scale, zero), each (rows, 1), for x (rows, cols)."""
    maxq = 2 ** bits - 1
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1)[0], zeros)
    xmax = torch.maximum(x.max(1)[0], zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]  # a row with no negative value keeps xmin = 0 (GPTQModel's own rule)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``quantizer.quantize``: the dequantized value scale·(clamp(round(x/scale) + zero, 0, maxq) − zero)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def rtn_quantize(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> torch.Tensor:
    """Round-to-nearest on the grid GPTQ uses (the same ``find_params`` per group of the original W), W (out, in)."""
    W = W.float()
    out = torch.empty_like(W)
    step = group_size if group_size > 0 else W.shape[1]
    for g in range(0, W.shape[1], step):
        scale, zero = find_params(W[:, g:g + step], bits, sym)
        out[:, g:g + step] = _quantize(W[:, g:g + step], scale, zero, bits)
    return out


# --------------------------------------------------------------------------------------------- GPTQ
def hessian_from_inputs(inputs: list[torch.Tensor]) -> torch.Tensor:
    """H = 2/n·Σ XᵀX in fp32 over every token row of ``inputs`` (each (..., in)), as ``materialize_global_hessian``."""
    H, n = None, 0
    for x in inputs:
        x = x.reshape(-1, x.shape[-1]).float()
        H = x.T @ x if H is None else H.add_(x.T @ x)
        n += x.shape[0]
    return H.mul_(2.0 / n)


def gar_permutation(diag_h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering: p[new] = old; columns past the last whole group keep their place."""
    groups = diag_h.numel() // group_size
    values, local = torch.sort(diag_h[:groups * group_size].view(groups, group_size), dim=1, descending=True)
    order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = (torch.arange(groups) * group_size).view(groups, 1)
    perm = (local + base)[order].reshape(-1)
    return torch.cat([perm, torch.arange(perm.numel(), diag_h.numel())])


def _hessian_inverse(H: torch.Tensor, damp: float, increment: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, damp raised by ``increment`` until it exists."""
    mean = H.diagonal().mean()
    while 0 < damp < 1:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp += increment
    raise ValueError(f"gptq_quantize: the Hessian is not positive definite for any damp_percent below 1 "
                     f"(mean diagonal {float(mean):.3g})")


def _columns(W: torch.Tensor, Hinv: torch.Tensor, bits: int, group_size: int, sym: bool, blocksize: int,
             grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """GPTQ's column loop on (permuted) W (out, in) with H⁻¹'s upper Cholesky factor: each column rounded, its error
    spread over the later columns of the block at once and over the later blocks after the block. ``grid``: the
    per-row (scale, zero) of the whole W, used when ``group_size`` is -1."""
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    scale, zero = grid
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = find_params(W[:, i1 + i:i1 + i + group_size], bits, sym)
            w = W1[:, i]
            q = _quantize(w.unsqueeze(1), scale, zero, bits).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, *, sym: bool = True,
                  act_group_aware: bool = True, desc_act: bool = False, damp_percent: float = 0.05,
                  damp_auto_increment: float = 0.01, blocksize: int = 128) -> torch.Tensor:
    """GPTQModel's ``GPTQ.quantize`` with its defaults: the dequantized W_c (out, in), fp32, of W (out, in) given the
    Hessian H (in, in) of the layer's inputs (any positive scale: the result does not depend on it)."""
    W, H = W.detach().float().clone(), H.detach().float().clone()
    grid = find_params(W, bits, sym)  # before the dead columns are zeroed, as GPTQModel
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if desc_act:
        perm = torch.argsort(H.diagonal(), descending=True)
    elif act_group_aware and group_size > 0:
        perm = gar_permutation(H.diagonal().clone(), group_size)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Q = _columns(W, _hessian_inverse(H, damp_percent, damp_auto_increment), bits, group_size, sym, blocksize,
                 grid)
    return Q if perm is None else Q[:, torch.argsort(perm)]


# --------------------------------------------------------------------------------------------- EoRA
def eora_statistics(inputs: list[torch.Tensor], num_batches: int | None = None) -> torch.Tensor:
    """The EoRA processor's statistics over calibration batches, each (batch, seq, in): per batch
    c = Σ_b X_bᵀX_b / num_batches, and total ← total·num_batches/(num_batches + batch) + c (the first total = c),
    fp32. Earlier batches are thus weighted down geometrically (the first of K batches of size b by
    (n/(n+b))^(K−1)); ``num_batches`` defaults to ``len(inputs)``."""
    n = float(num_batches if num_batches is not None else len(inputs))
    total = None
    for x in inputs:
        x = x.float() if x.dim() == 3 else x.float().unsqueeze(0)
        c = torch.matmul(x.transpose(1, 2), x).sum(0) / n
        total = c if total is None else total.mul_(n / (n + x.shape[0])).add_(c)
    return total


@torch.no_grad()
def gptqmodel_eora(W: torch.Tensor, W_c: torch.Tensor, XtX: torch.Tensor, rank: int,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``eora_compute_lora``: (A (rank, in), B (out, rank)) in ``dtype`` with B·A ≈ ΔW = W − W_c in the norm of
    XtX (in, in); eigenvalues at or below max(λ)·min(1, in·eps(fp32)) are dropped (their scalings set to 0)."""
    delta = W.detach().float() - W_c.detach().float()
    L, Q = torch.linalg.eigh(XtX.to(torch.float64))
    if not torch.isfinite(L).all():
        raise FloatingPointError("gptqmodel_eora: the statistics' eigensolve produced non-finite eigenvalues")
    cutoff = L[-1].clamp_min(0.0) * min(1.0, max(1, L.numel()) * torch.finfo(torch.float32).eps)
    kept = L > cutoff
    root, inv_root = torch.zeros_like(L), torch.zeros_like(L)
    root[kept], inv_root[kept] = torch.sqrt(L[kept]), torch.rsqrt(L[kept])
    S = (Q * root.unsqueeze(0)).float()
    S_inv = (inv_root.unsqueeze(1) * Q.T).float()
    U, sigma, V = torch.linalg.svd(delta @ S, full_matrices=False)
    sqrt_s = torch.sqrt(torch.diag(sigma[:rank]))
    B = (U[:, :rank] @ sqrt_s).to(dtype)
    A = (sqrt_s @ (V[:rank] @ S_inv)).to(dtype)
    return A, B

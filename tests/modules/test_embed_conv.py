"""The layer kinds ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` (modules/conv.py, modules/layouts.py).

- The matrix svdadapt reads is the one PEFT's own ``get_delta_weight`` adds to: s·B·A read back through the kind
  is PEFT's delta, for an embedding (weightᵀ) and for 1-D, 2-D and 1×1 convolutions (the kernel as (out, in·∏k)).
- PiSSA / MiLoRA: exact at init, each layer's adapter the brute-force truncated SVD of its read matrix, on a small
  UNet-like conv net, a tiny ViT built from a config (its patch projection a 16×16 stride-16 conv) and a tiny Llama
  with ``embed_tokens`` targeted.
- Calibration: a conv's covariance is that of its unfolded patches, against patches cut out by hand in fp64 (two
  convs of different geometry reading one tensor get their own); CorDA on convs s·B·A·C_d = [W·C_d]_r; EoRA on
  convs optimal on the calibration patches.
- Lifecycle: save / load / export / unwrap round trips, PEFT's ``from_pretrained`` of the export on the original
  model reproduces the trained outputs, and the export never carries the rewritten (residual) embedding that PEFT's
  ``save_embedding_layers`` would add; the init directory's export of a PEFT-saved trained adapter likewise.
- The exact errors: groups, dilation, padding_mode; CorDA / EoRA on an embedding; ``"all-linear"`` leaves these
  kinds out.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

import svdadapt
from svdadapt.modules.layers import kind_of
from svdadapt.modules.layouts import as_matrices, lora_params

from bounds import gamma, gemm_error, half_ulp, truncated_svd_error, unit_roundoff
from helpers import make_tiny_llama, max_rel, raises_exactly, rel, token_ids, train

RANK, ALPHA = 3, 6  # s = 2: a forgotten scaling would show
U32 = unit_roundoff(torch.float32)


# ------------------------------------------------------------------------------------------------------ models
class TinyUNet(nn.Module):
    """Down (stride 2, padding 1), middle ('same'), an up-convolution (not adaptable), a 1×1 skip reading the same
    input as ``down`` (another patch geometry), a Conv1d head over the flattened image (padding 2)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(8, 8, 3, padding="same")
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.skip = nn.Conv2d(3, 4, 1)
            self.head = nn.Conv1d(4, 5, 3, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.mid(F.relu(self.down(x))))
        u = self.up(h) + self.skip(x)  # (b, 4, H, W)
        return self.head(u.flatten(2))  # (b, 5, H·W + 2)


CONVS = ["down", "mid", "skip", "head"]


def images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = ViTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=3)
        return ViTForImageClassification(config).eval()


def read(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a layer, through its kind, fp64."""
    return kind_of(module).read(module).double()


def product(layer: nn.Module) -> torch.Tensor:
    """s·B·A (out, in) of a PEFT LoRA layer of any kind, fp64, from its factors as matrices."""
    A, B = (t.detach().double() for t in as_matrices(*lora_params(layer, "default")))
    return layer.scaling["default"] * (B @ A)


def layers_of(peft_model, names) -> dict[str, nn.Module]:
    modules = dict(peft_model.base_model.model.named_modules())
    return {n: modules[n] for n in names}


def _check_truncations(peft_model, original: nn.Module, names, largest: bool) -> None:
    """Each layer: s·B·A = [W]_r (the top or bottom r triplets of its read matrix, fp64 brute force) within the fp32
    SVD's bound at the cut, and base + s·B·A = W within the residual's fp32 addmm (exact at init)."""
    for n, layer in layers_of(peft_model, names).items():
        W = read(original.get_submodule(n))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        keep = slice(0, RANK) if largest else slice(S.numel() - RANK, S.numel())
        truncation = (U[:, keep] * S[keep]) @ Vh[keep]
        P = product(layer)
        bound = truncated_svd_error(W.float(), RANK, largest, S=S)
        assert float((P - truncation).norm()) <= bound, n
        A, B = as_matrices(*lora_params(layer, "default"))
        fp32 = gemm_error(B, A, C=W, alpha=layer.scaling["default"])  # the residual W − s·B·A, one fp32 addmm
        assert bool(((read(layer.get_base_layer()) + P - W).abs() <= fp32).all()), n


# ------------------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("module", [nn.Embedding(11, 6), nn.Conv1d(4, 6, 3), nn.Conv2d(3, 5, (3, 2)),
                                    nn.Conv2d(6, 4, 1)], ids=["embedding", "conv1d", "conv2d", "conv2d-1x1"])
def test_read_matrix_is_peft_delta_convention(module):
    """PEFT's ``get_delta_weight`` (what it merges into the weight) read through the kind is s·B·A: the factors svdadapt
    writes mean what its matrix says. fp32 products of length r (ours) and PEFT's (a conv of A with B, length r)."""
    peft_model = svdadapt.wrap(nn.Sequential(copy.deepcopy(module)), "pissa", rank=2, alpha=4, target_modules=["0"],
                               progress=False)
    layer = layers_of(peft_model, ["0"])["0"]
    delta = layer.get_delta_weight("default").detach()
    kind = kind_of(layer.get_base_layer())
    as_read = (kind.as_matrix or (lambda w: w))(delta).double()
    P = product(layer)
    assert as_read.shape == P.shape == kind.shape(layer.get_base_layer())
    A, B = as_matrices(*lora_params(layer, "default"))
    bound = 2 * gemm_error(B, A, alpha=layer.scaling["default"])  # both fp32 products of length r
    assert bool(((as_read - P).abs() <= bound).all())


# ------------------------------------------------------------------------------------------------------ PiSSA / MiLoRA
@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_conv_net_exact_at_init_and_truncated_svd(method):
    model = TinyUNet()
    x = images(2, 1)
    want = model(x)
    peft_model = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, alpha=ALPHA, target_modules=CONVS,
                               progress=False)
    _check_truncations(peft_model, model, CONVS, method == "pissa")
    # 4 conv layers of reduction length k ≤ 72 each evaluated twice in fp32 (base·x and B·(A·x)): the probabilistic
    # √k·u ≈ 5e-7 per layer, relative to the output's largest entry; 1e-5 holds 4 layers with 5x margin
    assert max_rel(peft_model(x), want) <= 1e-5
    assert sorted(peft_model.svdadapt["report"]) == sorted(CONVS)
    assert peft_model.svdadapt["report"]["down"]["shape"] == (8, 27)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_is_one_rounding_of_the_residual(dtype):
    """As test_wrap's half-precision test, for convs and an embedding: the base is fl32(W − s·B·A) rounded once to
    the dtype (stored back in the kernel's / the embedding's own layout), so per element base + s·B·A is off W by at
    most half an ulp of the residual plus the fp32 addmm error γ_{r+2}·(|W| + s·|B|·|A|)."""
    net, llama = TinyUNet().to(dtype), make_tiny_llama(dtype=dtype)
    for model, names in ((net, CONVS), (llama, ["model.embed_tokens"])):
        original = {n: read(model.get_submodule(n)) for n in names}
        peft_model = svdadapt.wrap(model, "pissa", rank=RANK, alpha=ALPHA, target_modules=names, progress=False)
        for n, layer in layers_of(peft_model, names).items():
            base = layer.get_base_layer()
            assert base.weight.dtype == dtype, n
            A, B = as_matrices(*lora_params(layer, "default"))
            assert A.dtype == torch.float32
            residual = original[n] - product(layer)
            fp32 = gemm_error(B, A, C=original[n], alpha=layer.scaling["default"])
            assert bool(((read(base) - residual).abs() <= half_ulp(residual.abs() + fp32, dtype) + fp32).all()), n


def test_vit_patch_projection_and_linears():
    """A tiny ViT from a config: "all-linear" leaves the patch projection (a Conv2d) out; naming it adds it, read as
    (hidden, 3·16·16); exact at init."""
    model = tiny_vit()
    x = {"pixel_values": images(2, 3, size=32)}
    assert not any("projection" in n for n in svdadapt.resolve_targets(model, "all-linear"))
    targets = ["projection", "q_proj", "v_proj", "fc1"]
    peft_model = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA, target_modules=targets,
                               progress=False)
    name = "vit.embeddings.patch_embeddings.projection"
    assert peft_model.svdadapt["report"][name]["shape"] == (32, 768)
    _check_truncations(peft_model, model, [name], True)
    # as the conv net: a handful of fp32 layers of length ≤ 768 (√768·u ≈ 2e-6 each) through 2 blocks
    assert max_rel(peft_model(**x).logits, model(**x).logits) <= 1e-4


def _llama():
    return make_tiny_llama()  # untied (LlamaConfig's default in transformers 5)


def test_llama_embed_tokens_pissa_exact_and_truncated():
    model = _llama()
    ids = token_ids(2, 12, seed=3)
    peft_model = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA,
                               target_modules=["embed_tokens", "q_proj"], progress=False)
    assert peft_model.svdadapt["report"]["model.embed_tokens"]["shape"] == (64, 128)  # weightᵀ: (dim, vocab)
    _check_truncations(peft_model, model, ["model.embed_tokens"], True)
    # the tiny Llama's exact-at-init bound of test_wrap: two fp32 forwards, 2 blocks of width 64
    assert max_rel(peft_model(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5


def test_tied_embeddings_are_refused_for_rewriting_methods():
    model = make_tiny_llama(tie_word_embeddings=True)
    with raises_exactly(ValueError, "module 'model.embed_tokens' shares its weight with 'lm_head' (tied weights): "
                        "rewriting it would change 'lm_head' too; untie the weights or leave 'model.embed_tokens' "
                        "out of target_modules"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_modules=["embed_tokens"], progress=False)


# ------------------------------------------------------------------------------------------------------ calibration
def _patches_by_hand(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """(N, in·∏k) fp64 receptive fields of ``conv`` over ``x``, cut out position by position (no unfold): the
    zero-padded input sliced at each output position, flattened channel-major like the kernel."""
    k = tuple(conv.kernel_size)
    pad = [((kk - 1) // 2, kk - 1 - (kk - 1) // 2) for kk in k] if conv.padding == "same" else [(p, p) for p in conv.padding]
    xp = F.pad(x.double(), [p for pair in reversed(pad) for p in pair])
    rows = []
    if len(k) == 1:
        for i in range(0, xp.shape[-1] - k[0] + 1, conv.stride[0]):
            rows.append(xp[:, :, i:i + k[0]].reshape(x.shape[0], -1))
    else:
        for i in range(0, xp.shape[-2] - k[0] + 1, conv.stride[0]):
            for j in range(0, xp.shape[-1] - k[1] + 1, conv.stride[1]):
                rows.append(xp[:, :, i:i + k[0], j:j + k[1]].reshape(x.shape[0], -1))
    return torch.cat(rows)


def brute_force_patches(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """name -> every calibration patch (N, in·∏k) of each conv, fp64, from plain pre-hooks (svdadapt not involved)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, _n=n: rows[_n].append(_patches_by_hand(a[0], mod))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


CALIB = [images(4, 10), images(3, 11)]


def test_conv_covariances_are_those_of_the_patches():
    """C = XᵀX/N over the unfolded patches, to the fp32 sum's bound γ_(N+3)·|X|ᵀ|X|/N entrywise; ``down`` and
    ``skip`` read one tensor with different kernels, each gets its own covariance (of its own size)."""
    model = TinyUNet()
    covs = svdadapt.collect_covariances(model, CALIB, target_modules=CONVS, progress=False)
    X = brute_force_patches(model, CALIB, CONVS)
    assert covs["down"].shape == (27, 27) and covs["skip"].shape == (3, 3) and covs["head"].shape == (12, 12)
    for n in CONVS:
        N = X[n].shape[0]
        assert covs.token_count(n) == N, n
        want, scale = X[n].mT @ X[n] / N, X[n].abs().mT @ X[n].abs() / N
        assert bool(((covs[n].double() - want).abs() <= gamma(N + 3) * scale).all()), n


def _check_corda(peft_model, model, covs, largest: bool) -> None:
    """s·B·A·C_d = [W·C_d]_r per conv (C_d = C + λ·mean(diag C)·I), within test_corda's bound: W·C_d formed and
    rounded to fp32, an fp32 SVD at the cut, V̂ solved and rounded, multiplied back by C_d (γ_3·s·‖|B||A||C_d|‖)."""
    for n, layer in layers_of(peft_model, CONVS).items():
        lam = peft_model.svdadapt["report"][n]["damping"]
        C = covs[n].double()
        Cd = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
        WC = read(model.get_submodule(n)) @ Cd
        U, S, Vh = torch.linalg.svd(WC, full_matrices=False)
        keep = slice(0, RANK) if largest else slice(S.numel() - RANK, S.numel())
        truncation = (U[:, keep] * S[keep]) @ Vh[keep]
        A, B = (t.detach().double() for t in as_matrices(*lora_params(layer, "default")))
        factors = gamma(3) * layer.scaling["default"] * float(((B.abs() @ A.abs()) @ Cd.abs()).norm())
        bound = truncated_svd_error(WC.float(), RANK, largest, S=S, drift=U32 * float(WC.norm())) + factors
        assert float((product(layer) @ Cd - truncation).norm()) <= bound, n


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_on_convs_is_the_truncation_of_w_times_the_patch_covariance(mode):
    model = TinyUNet()
    x = images(2, 1)
    peft_model = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode,
                               target_modules=CONVS, calibration=CALIB, blockwise=False, progress=False)
    X = brute_force_patches(model, CALIB, CONVS)
    _check_corda(peft_model, model, {n: X[n].mT @ X[n] / X[n].shape[0] for n in CONVS}, mode == "ipa")
    # as the PiSSA conv net (exact at init)
    assert max_rel(peft_model(x), model(x)) <= 1e-5


def test_eora_on_convs_is_optimal_on_the_calibration_patches():
    """‖(ΔW − s·B·A)·Xᵀ‖ over the hand-cut patches X of the reference model equals the fp64 optimum, the tail of the
    spectrum of ΔW·Xᵀ (ΔW = W − W_c, W_c a 3-bit RTN of each conv). ``skip`` (in = 3) is left out: at rank 3 it is
    full rank, its optimum 0."""
    convs = ["down", "mid", "head"]
    model = TinyUNet()
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=None, target_modules=convs)
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=RANK, alpha=ALPHA, target_modules=convs,
                               reference=model, calibration=CALIB, blockwise=False, progress=False)
    X = brute_force_patches(model, CALIB, convs)
    for n, layer in layers_of(peft_model, convs).items():
        dW = read(model.get_submodule(n)) - read(qmodel.get_submodule(n))
        assert torch.equal(read(layer.get_base_layer()), read(qmodel.get_submodule(n)))  # W_c untouched
        err = ((dW - product(layer)) @ X[n].mT).norm()
        optimum = torch.linalg.svdvals(dW @ X[n].mT)[RANK:].pow(2).sum().sqrt()
        # as test_eora: fp32 factors of an fp64 optimum, the error second order in their rounding; 1e-3 leaves
        # the fp32 SVD's gap-dependent subspace error room
        assert abs(float(err / optimum) - 1) <= 1e-3, (n, float(err / optimum))


def test_vit_corda_block_by_block_equals_whole_model_and_patch_covariance():
    """CorDA on a ViT with its patch projection (outside the block stack) and linears inside it: the block-by-block
    path gives the whole-model path's factors bit for bit; the projection's covariance is that of its 16×16 patches
    (γ_(N+3) bound, as above)."""
    model = tiny_vit()
    batches = [{"pixel_values": images(3, s, size=32)} for s in (1, 2)]
    targets = ["projection", "q_proj", "v_proj", "fc1"]
    kw = dict(rank=RANK, alpha=ALPHA, target_modules=targets, calibration=batches, progress=False)
    blockwise = svdadapt.wrap(copy.deepcopy(model), "corda", **kw)
    whole = svdadapt.wrap(copy.deepcopy(model), "corda", blockwise=False, **kw)
    fa, fb = blockwise.svdadapt["init_factors"], whole.svdadapt["init_factors"]
    assert list(fa) == list(fb) and len(fa) == 7
    assert all(torch.equal(fa[n][0], fb[n][0]) and torch.equal(fa[n][1], fb[n][1]) for n in fa)
    name = "vit.embeddings.patch_embeddings.projection"
    covs = svdadapt.collect_covariances(model, batches, target_modules=["projection"], progress=False)
    rows = [_patches_by_hand(b["pixel_values"], model.get_submodule(name)) for b in batches]
    X = torch.cat(rows)
    assert X.shape == (6 * 4, 768) and covs.token_count(name) == 24
    want, scale = X.mT @ X / 24, X.abs().mT @ X.abs() / 24
    assert bool(((covs[name].double() - want).abs() <= gamma(24 + 3) * scale).all())


# ------------------------------------------------------------------------------------------------------ lifecycle
def _nudge(peft_model, seed: int = 0) -> None:
    """Move every trainable factor well away from its init (a stand-in for training: what matters is that the
    saved factors differ from the initial ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))


def test_conv_net_save_load_export_unwrap(tmp_path):
    model = TinyUNet()
    x = images(2, 5)
    peft_model = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA, target_modules=CONVS,
                               progress=False)
    _nudge(peft_model)
    trained = peft_model(x).detach()
    assert max_rel(trained, model(x)) > 1e-3  # the adapter moved: a round trip to the init would not pass
    svdadapt.save(peft_model, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "svdadapt.json").read_text())
    assert meta["layouts"] == {
        "down": {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": [3, 3, 3], "B_shape": [1, 1]},
        "mid": {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": [8, 3, 3], "B_shape": [1, 1]},
        "skip": {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": [3, 1, 1], "B_shape": [1, 1]},
        "head": {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": [4, 3], "B_shape": [1]}}
    saved = load_file(tmp_path / "s" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items() if k.startswith("base_model.model.head.")} == {
        "base_model.model.head.lora_A.weight": (2 * RANK, 4, 3), "base_model.model.head.lora_B.weight": (5, 2 * RANK, 1)}
    # PEFT's own loader on the ORIGINAL model: W·x + s·(B·A − B₀·A₀)·x against W_res·x + s·B·A·x, the same sums
    # regrouped in fp32 (as the exact-at-init bound above)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "s")
    assert max_rel(reloaded(x), trained) <= 1e-5
    loaded = svdadapt.load(copy.deepcopy(model), tmp_path / "s", progress=False)
    assert torch.equal(loaded(x), trained)  # the residual rebuilt as wrap computed it, the saved factors restored
    init = loaded.svdadapt["init_factors"]
    scaling = {n: float(m.scaling["default"]) for n, m in layers_of(loaded, CONVS).items()}
    plain = svdadapt.unwrap(loaded)
    for n in CONVS:
        W, A0, B0 = read(model.get_submodule(n)), init[n][0], init[n][1]
        # W_res = fl(W − s·B₀·A₀) (fp32 addmm), then W_res + s·B₀·A₀ in fp64 and one rounding to fp32
        bound = gemm_error(B0, A0, C=W, alpha=scaling[n]) + U32 * W.abs()
        assert bool(((read(plain.get_submodule(n)) - W).abs() <= bound).all()), n
    with pytest.raises(ValueError) as e:  # a compact export writes (out, in) products only
        svdadapt.export_lora(peft_model, tmp_path / "c", rank=1)
    assert str(e.value) == ("a compact export (rank= / energy= / round_to= / covariances=) writes linear layers only; "
                            "target 'down' is an embedding or convolution (its factors have their own layout): "
                            "export it without those keywords")


def test_llama_embed_tokens_save_export_without_the_residual_embedding(tmp_path):
    """The export holds the LoRA factors and nothing of the embedding's (rewritten) base, which PEFT's own
    save_pretrained adds (``save_embedding_layers="auto"``): PEFT's from_pretrained of it on the original model
    gives the trained logits."""
    model = _llama()
    ids = token_ids(2, 12, seed=4)
    peft_model = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA,
                               target_modules=["embed_tokens", "q_proj"], progress=False)
    train(peft_model, ids, steps=3)
    trained = peft_model(input_ids=ids).logits.detach()
    assert max_rel(trained, model(input_ids=ids).logits) > 1e-3  # trained away from the init
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        PeftModel.save_pretrained(peft_model, str(tmp_path / "raw"))
    raw = load_file(tmp_path / "raw" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in raw  # PEFT's: W_res, wrong on the original
    peft_model.save_pretrained(tmp_path / "s")  # svdadapt's guard: svdadapt.save
    saved = load_file(tmp_path / "s" / "adapter_model.safetensors")
    embed = {k: tuple(v.shape) for k, v in saved.items() if "embed_tokens" in k}
    assert embed == {"base_model.model.model.embed_tokens.lora_embedding_A": (2 * RANK, 128),
                     "base_model.model.model.embed_tokens.lora_embedding_B": (64, 2 * RANK)}
    reloaded = PeftModel.from_pretrained(_llama(), tmp_path / "s")
    # the same sums regrouped in fp32 through 2 blocks (as the exact-at-init bound of the tiny Llama)
    assert max_rel(reloaded(input_ids=ids).logits, trained) <= 1e-5
    loaded = svdadapt.load(_llama(), tmp_path / "s", progress=False)
    assert torch.equal(loaded(input_ids=ids).logits, trained)


def test_init_dir_export_of_a_peft_saved_adapter_drops_the_residual_embedding(tmp_path):
    """The init directory's flow: DIR/base + DIR/adapter trained and saved by plain PEFT (which adds DIR/base's
    embedding, the residual, to the adapter), then ``svdadapt export``: the export carries no base weight, and on
    the original model gives the trained logits."""
    from transformers import AutoModelForCausalLM

    from helpers import save_tiny_model
    from svdadapt.lifecycle.initdir import BASE_DIR, TRAINED_DIR, export_init_dir, write_init_dir

    model_dir = save_tiny_model(tmp_path / "tiny", 5, 128, tokenizer=False)
    peft_model = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(model_dir), "pissa", rank=RANK,
                               target_modules=["embed_tokens", "v_proj"], progress=False)
    init = write_init_dir(tmp_path / "init", peft_model, model_path=model_dir)
    assert not any("base_layer" in k for k in load_file(init / TRAINED_DIR / "adapter_model.safetensors"))
    ids = token_ids(2, 12, seed=6)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init / BASE_DIR), init / TRAINED_DIR,
                                   is_trainable=True)
    train(pm, ids, steps=3)
    trained = pm(input_ids=ids).logits.detach()
    assert max_rel(trained, AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits) > 1e-3
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        pm.save_pretrained(tmp_path / "trained")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "trained" / "adapter_model.safetensors")
    export_init_dir(init, tmp_path / "lora", tmp_path / "trained")
    exported = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in exported)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora")
    # as above: the same sums regrouped in fp32
    assert max_rel(reloaded(input_ids=ids).logits, trained) <= 1e-5


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("conv,message", [
    (nn.Conv2d(4, 4, 3, groups=2), "module '0' is a Conv2d with groups=2; svdadapt adapts convolutions with groups=1 "
     "only (PEFT's conv LoRA is not a product B·A there): leave it out of target_modules"),
    (nn.Conv2d(4, 4, 3, dilation=2), "module '0' is a Conv2d with dilation=(2, 2); PEFT's conv LoRA ignores dilation "
     "(its lora_A is undilated), so svdadapt adapts dilation=1 only: leave it out of target_modules"),
    (nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), "module '0' is a Conv1d with padding_mode='reflect'; "
     "PEFT's conv LoRA pads with zeros, so svdadapt adapts padding_mode='zeros' only: leave it out of target_modules"),
    (nn.Embedding(10, 4, max_norm=1.0), "module '0' is an Embedding with max_norm=1.0, which renormalizes its weight "
     "(and PEFT's lora_embedding_A) in place on every forward; svdadapt adapts embeddings with max_norm=None only: "
     "leave it out of target_modules"),
], ids=["groups", "dilation", "padding_mode", "max_norm"])
def test_settings_peft_cannot_compute_exactly_are_refused(conv, message):
    model = nn.Sequential(conv)
    before = copy.deepcopy(model.state_dict())
    with raises_exactly(ValueError, message):
        svdadapt.wrap(model, "pissa", rank=2, target_modules=["0"], progress=False)
    assert type(model[0]) is type(conv) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,extra", [("corda", {}), ("eora", {"reference": None})])
def test_calibrated_methods_refuse_an_embedding(method, extra):
    model = _llama()
    if "reference" in extra:
        extra = {"reference": _llama()}
    with raises_exactly(ValueError, f"method {method!r} needs each target's input covariance, but module "
                        "'model.embed_tokens' is an Embedding, whose input is a token index, not a vector: leave it "
                        "out of target_modules, or adapt it with pissa / milora"):
        svdadapt.wrap(model, method, rank=2, target_modules=["embed_tokens", "q_proj"],
                      calibration=[token_ids(2, 8, seed=1)], progress=False, **extra)


def test_all_linear_leaves_embeddings_and_convs_out():
    assert set(svdadapt.resolve_targets(TinyUNet(), ["down", "head"])) == {"down", "head"}
    with pytest.raises(ValueError, match=r"^target_modules='all-linear' matched no adaptable layer"):
        svdadapt.resolve_targets(TinyUNet(), "all-linear")
    assert "model.embed_tokens" not in svdadapt.resolve_targets(_llama(), "all-linear")


def test_quantize_refuses_embeddings_and_convs():
    with raises_exactly(ValueError, "quantize='nf4' replaces each target by a quantized linear layer, but module "
                        "'model.embed_tokens' is not a linear layer (nn.Embedding): leave it out of target_modules"):
        svdadapt.wrap(_llama(), "pissa", rank=2, target_modules=["embed_tokens"], quantize="nf4", progress=False)


def test_streaming_refuses_embeddings_and_convs(tmp_path):
    from helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", 5, 128, tokenizer=False)
    with raises_exactly(TypeError, "module 'model.embed_tokens' is not a linear layer (nn.Embedding): a checkpoint "
                        "is streamed for Linear / Conv1D weights only; adapt it in memory (svdadapt.wrap, svdadapt "
                        "init --in-memory)"):
        svdadapt.init_checkpoint(model_dir, tmp_path / "out", method="pissa", rank=2,
                                 target_modules=["embed_tokens"], progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_bad_layouts_field_is_refused(tmp_path):
    from svdadapt.lifecycle.checkpoint import read_metadata

    peft_model = svdadapt.wrap(TinyUNet(), "pissa", rank=2, target_modules=["head"], progress=False)
    svdadapt.save(peft_model, tmp_path)
    path = tmp_path / "svdadapt.json"
    record = json.loads(path.read_text())
    record["layouts"]["head"]["A_shape"] = [4, 0]
    path.write_text(json.dumps(record))
    field = repr("layouts['head']")  # "layouts['head']": the quotes repr picks for a name holding quotes
    with raises_exactly(ValueError, f"{str(path)!r}: field {field} must be a mapping of target to its factor "
                        "layout ({'A', 'B', 'A_shape', 'B_shape'}) of one of the targets, got {'A': 'lora_A.weight', "
                        "'B': 'lora_B.weight', 'A_shape': [4, 0], 'B_shape': [1]}"):
        read_metadata(tmp_path)

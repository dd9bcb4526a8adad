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

from bounds import gamma, gemm_error, truncated_svd_error, unit_roundoff
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
    from svdadapt.modules.layouts import as_matrices, lora_params

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
        from svdadapt.modules.layouts import as_matrices, lora_params
        A, B = as_matrices(*lora_params(layer, "default"))
        fp32 = gemm_error(B, A, C=W, alpha=layer.scaling["default"])  # the residual W − s·B·A in fp32
        assert bool(((read(layer.get_base_layer()) + P - W).abs() <= fp32 + 0.5 * U32 * W.abs()).all()), n


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
    from svdadapt.modules.layouts import as_matrices, lora_params
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


def test_vit_patch_projection_and_linears():
    """A tiny ViT from a config: "all-linear" leaves the patch projection (a Conv2d) out; naming it adds it, read as
    (hidden, 3·16·16); exact at init."""
    model = tiny_vit()
    x = {"pixel_values": images(2, 3, size=32)}
    assert not any("projection" in n for n in svdadapt.resolve_targets(model, "all-linear"))
    targets = ["projection", "query", "value", "dense"]
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

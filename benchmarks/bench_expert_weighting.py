"""Which statistic per-expert calibration should collect: EoRA's held-out error on MoE experts with covariances
weighted by the squared routing weight (``weighting="routing"``), unweighted (``"tokens"``), pooled over all experts
of a parameter (what the fallback gives), and no covariance (plain SVD of ΔW).

Random tiny MoE models built from configs (Mixtral: top-2 renormalized weights; Qwen2-MoE: top-2 of the raw softmax,
``norm_topk_prob=False``), routers drawn N(0, 0.5²) (peaked routing, unequal weights), embeddings with a decaying
spectrum (anisotropic hidden states, as trained models have). Every expert's gate_up_proj and down_proj quantized
RTN 3-bit groups of 32 (``svdadapt.compress.quantize(target_parameters=...)``), then each expert's EoRA rank 8
(``core.methods.eora``) from each covariance. Measured: Σ‖y − y'‖² / Σ‖y‖² of each MoE block's output on held-out
tokens, the block fed the reference model's input, summed over blocks.

    PYTHONPATH=src python benchmarks/bench_expert_weighting.py

Prints a table; writes benchmarks/results/expert_weighting.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import transformers

import svdadapt
from svdadapt.calibration.experts import expert_key, fallback_covariances
from svdadapt.core.methods import eora, prepare_eora

RESULTS = Path(__file__).resolve().parent / "results" / "expert_weighting.json"
PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
RANK, BITS, GROUP = 8, 3, 32


def build(family: str, seed: int) -> torch.nn.Module:
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "mixtral":
            model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
                **common, intermediate_size=128, num_local_experts=8))
        else:
            model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
                **common, intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=64,
                num_experts=8, norm_topk_prob=False, decoder_sparse_step=1))
    structure(model, seed)
    return model.eval()


@torch.no_grad()
def structure(model: torch.nn.Module, seed: int) -> None:
    """In place: embeddings (vocab, hidden) with a spectrum decaying from 1 to 0.01 (anisotropic hidden states, as
    trained models have) and every router N(0, 0.5²) (peaked routing, unequal weights), from generator ``seed``."""
    g = torch.Generator().manual_seed(seed)
    emb = model.model.embed_tokens.weight
    h = emb.shape[1]
    Q, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
    emb.data.copy_(torch.randn(emb.shape, generator=g) @ torch.diag(torch.logspace(0, -2, h)) @ Q.mT)
    for layer in model.model.layers:
        layer.mlp.gate.weight.data.normal_(0, 0.5, generator=g)


def batches(seed: int, n: int = 8, vocab: int = 512, shape: tuple[int, int] = (4, 64)) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random token ids (``shape`` = (batch, length)) below ``vocab``, from generator ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, shape, generator=g)} for _ in range(n)]


def block_io(model, data) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """layer -> [(MoE block input, output)] per held-out batch."""
    io = {i: [] for i in range(len(model.model.layers))}
    def keep(i, x, out):
        io[i].append((x, out[0] if isinstance(out, tuple) else out))

    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, _i=i: keep(_i, a[0], o))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    return io


def compensate(ref, comp, covs) -> torch.nn.Module:
    """A copy of ``comp`` whose every expert matrix is W_c + B·A, EoRA rank RANK from ``covs`` (None: identity)."""
    out = copy.deepcopy(comp)
    for i, (lr, lo) in enumerate(zip(ref.model.layers, out.model.layers)):
        for p in ("gate_up_proj", "down_proj"):
            Wr, Wo = getattr(lr.mlp.experts, p).detach(), getattr(lo.mlp.experts, p).data
            for e in range(Wr.shape[0]):
                key = expert_key(f"model.layers.{i}.mlp.experts.{p}", e)
                C = covs[key] if covs is not None else torch.eye(Wr.shape[2])
                init = eora(Wo[e], rank=RANK, scaling=1.0, prepared=prepare_eora(C.double()), reference=Wr[e])
                Wo[e] += init.B @ init.A
    return out


def error(model, io) -> float:
    num = den = 0.0
    with torch.no_grad():
        for i, pairs in io.items():
            for x, y in pairs:
                out = model.model.layers[i].mlp(x)
                out = out[0] if isinstance(out, tuple) else out
                num += float((out - y).double().pow(2).sum())
                den += float(y.double().pow(2).sum())
    return num / den


def run(family: str, seed: int) -> dict[str, float]:
    model = build(family, seed)
    calib, held = batches(100 + seed), batches(200 + seed)
    comp = svdadapt.compress.quantize(model, BITS, GROUP, target_modules=None, target_parameters=PARAMS)
    io = block_io(model, held)
    covs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in ("routing", "tokens"):
            covs[w] = svdadapt.collect_covariances(model, calib, target_modules=None, target_parameters=PARAMS,
                                                   weighting=w, progress=False)
        covs["pooled"] = fallback_covariances(covs["tokens"], min_tokens=10**9)
    row = {"compressed": error(comp, io), "svd": error(compensate(model, comp, None), io)}
    for name, C in covs.items():
        row[f"eora_{name}"] = error(compensate(model, comp, C), io)
    return row


def main() -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()
    results = {}
    for family in ("mixtral", "qwen2_moe"):
        rows = [run(family, s) for s in range(3)]
        results[family] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} | {"per_seed": rows}
    cols = ["compressed", "svd", "eora_pooled", "eora_tokens", "eora_routing"]
    print(f"held-out relative error of the MoE blocks' outputs (mean of 3 seeds), RTN {BITS}-bit g{GROUP}, "
          f"EoRA r{RANK}")
    print(f"{'model':<10}" + "".join(f"{c:>14}" for c in cols))
    for family, r in results.items():
        print(f"{family:<10}" + "".join(f"{r[c]:>14.4e}" for c in cols))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"load_avg": load, "torch_threads": 1, "bits": BITS, "group": GROUP, "rank": RANK,
                                   "results": results, "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()

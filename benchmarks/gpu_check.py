"""GPU check: svdadapt's decompositions on the device the model lives on.

On SmolLM2-135M (and a random h2048 Llama) moved to ``--device`` in fp32 and bf16:
  - exact at init: the wrapped model's logits against the original's (fp32 noise; bf16 no worse than casting W);
  - captured energy of every layer at rank 16 against the exact top-16 (≥ 99.5% expected, as on CPU);
  - the sketch is drawn on CPU from (seed, layer name), so the GPU factors match the CPU ones to float noise;
  - wall time of ``wrap(method="pissa", rank=16)`` against PEFT's ``pissa_niter_16`` on the same device.

    python benchmarks/gpu_check.py --device cuda        # writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick # the same checks on CPU, SmolLM2 only (a smoke test)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, random_llama, write_results  # noqa: E402

RANK = 16


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


@torch.no_grad()
def check(name: str, model, device: str, dtype: torch.dtype) -> dict:
    import svdadapt
    from peft import LoraConfig, get_peft_model

    cpu_factors = svdadapt.wrap(copy.deepcopy(model).float(), "pissa", RANK, progress=False).svdadapt.init_factors
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    before = model(ids).logits.float()
    W = {n: m.weight.detach().float().clone() for n, m in svdadapt.resolve_targets(model).items()}
    pm, wall = _timed(lambda: svdadapt.wrap(model, "pissa", RANK, progress=False), device)
    after = pm(ids).logits.float()
    worst_energy, worst_cpu = 1.0, 0.0
    for n, (A, B) in pm.svdadapt.init_factors.items():
        opt = torch.linalg.svdvals(W[n])[:RANK].pow(2).sum()
        got = torch.linalg.matrix_norm(B.to(device).float() @ A.to(device).float()).pow(2)
        worst_energy = min(worst_energy, float(got / opt))
        A0, B0 = cpu_factors[n]
        worst_cpu = max(worst_cpu, float((B.float() @ A.float() - B0 @ A0).norm() / (B0 @ A0).norm()))
    peft_model = copy.deepcopy(model)
    _, peft_wall = _timed(lambda: get_peft_model(peft_model, LoraConfig(r=RANK, target_modules="all-linear",
                                                                         init_lora_weights="pissa_niter_16")), device)
    return {"model": name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "init_rel_change": float((after - before).norm() / before.norm()),
            "worst_energy": worst_energy, "gpu_vs_cpu_factors": worst_cpu, "svdadapt_s": wall,
            "peft_pissa_niter_16_s": peft_wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="SmolLM2 in fp32 only")
    args = p.parse_args()
    from svdadapt.loading import load_smollm2

    models = {"smollm2": load_smollm2()[0]}
    if not args.quick:
        models["llama2048"] = random_llama(hidden=2048, intermediate=5632, layers=4, heads=32)
    rows = [check(n, copy.deepcopy(m), args.device, dt) for n, m in models.items()
            for dt in ([torch.float32] if args.quick else [torch.float32, torch.bfloat16])]
    cols = [("model", "model", "{}"), ("dtype", "dtype", "{}"), ("init_rel_change", "init change", "{:.2e}"),
            ("worst_energy", "worst energy", "{:.4f}"), ("gpu_vs_cpu_factors", "vs CPU factors", "{:.1e}"),
            ("svdadapt_s", "svdadapt (s)", "{:.2f}"), ("peft_pissa_niter_16_s", "PEFT niter_16 (s)", "{:.2f}")]
    print(markdown_table(rows, cols))
    if not args.quick:
        write_results("gpu_check", {"rows": rows})


if __name__ == "__main__":
    main()

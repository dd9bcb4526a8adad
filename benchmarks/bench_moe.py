"""PiSSA on MoE experts (``target_parameters``) at a realistic shape: a random Mixtral (hidden 1024, 8 experts,
4 layers, built from a config, transformers 5's 3-D ``experts.gate_up_proj`` / ``experts.down_proj``), rank 16,
experts only. In the same run, each in a fresh process (its own peak RSS):

- ``svdadapt``: ``wrap(model, "pissa", rank=16, target_modules=[], target_parameters=[...])``, each expert
  decomposed on its own (block Krylov, ``svd="auto"``);
- ``peft``: ``get_peft_model`` with ``LoraConfig(target_parameters=[...], init_lora_weights="pissa_niter_16")``,
  what PEFT 0.21 does there (measured: it fails; its error is recorded);
- ``svd_lowrank``: ``torch.svd_lowrank(W_e, q=16, niter=16)`` per expert (PEFT's ``pissa_niter_16`` for a 2-D
  layer), the decompositions only.

Reported: init time (wall and CPU, one BLAS thread), peak RSS, and the captured energy Σσ̃² of the rank-16 factors
relative to the exact Σσ² (fp32 LAPACK ``svdvals`` per expert), mean and worst over the experts.

Then, in the same run, from a checkpoint of the same model that transformers 5's ``save_pretrained`` writes into a
temporary directory (its per-expert layout ``block_sparse_moe.experts.{e}.w1/w2/w3``; deleted at the end), the
init directory written two ways, each in a fresh process (its own peak RSS, and the RSS after the imports):

- ``in memory``: what ``svdadapt init --in-memory`` does: ``from_pretrained``, ``wrap``, ``write_init_dir``;
- ``streamed``: ``svdadapt.init_checkpoint`` (one parameter of one layer in memory at a time);

and whether the two adapters are bit for bit the same.

``--eora`` runs the EoRA part instead (one fresh process): the same model with structured embeddings and peaked
routers (``bench_expert_weighting.structure``), the experts scaled by one factor so that their output is of the
residual stream's size (``_scale_experts``), every expert RTN 3-bit groups of 64
(``compress.quantize(target_parameters=...)``), then rank 16 per expert by

- ``eora``: ``wrap(compressed, "eora", rank=16, reference=original, calibration=batches, target_modules=[],
  target_parameters=[...])`` (routed, routing-weighted covariances per expert; init time and peak RSS measured);
- ``svd``: plain truncated SVD of each expert's ΔW_e = W_ref[e] − W_c[e] (fp32 LAPACK), added to W_c[e];
- ``compressed``: no adapter.

Measured on held-out random-token batches: Σ‖y − y_ref‖²/Σ‖y_ref‖² of each MoE block's output, the block fed the
reference's input (``bench_expert_weighting.block_io/error``), and of the final logits.

    python benchmarks/bench_moe.py                    # ~3 min on one quiet core
    python benchmarks/bench_moe.py --intermediate 3584 --layers 2
    python benchmarks/bench_moe.py --eora             # the EoRA part; keeps the PiSSA rows of the JSON

Writes ``benchmarks/results/bench_moe.json`` (the EoRA part: its ``"eora"`` key, the other keys kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, markdown_table, run_job, write_results  # noqa: E402

RANK = 16
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _model(hidden: int, intermediate: int, layers: int, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=4, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=128)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a decaying spectrum per expert, as trained weights have (a flat one makes every
        for p in model.parameters():  # rank-16 energy ~ 16/n and hides the sketches' differences)
            if p.dim() == 3:
                n = min(p.shape[1:])
                U = torch.linalg.qr(torch.randn(p.shape[0], p.shape[1], n)).Q
                V = torch.linalg.qr(torch.randn(p.shape[0], p.shape[2], n)).Q
                s = torch.logspace(0, -2, n)
                p.copy_((U * s) @ V.mT * 0.05)
    return model


def _exact_energy(model) -> list[float]:
    """Σ of the top-16 σ² of every expert (fp32 LAPACK), in model order."""
    out = []
    for p in (p for p in model.parameters() if p.dim() == 3):
        for e in range(p.shape[0]):
            out.append(float(torch.linalg.svdvals(p[e].detach()).pow(2)[:RANK].sum()))
    return out


def job_svdadapt(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    import svdadapt

    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    exact, keys = _exact_energy(model), [n for n, _ in _model_keys(model)]
    t0, c0 = time.perf_counter(), time.process_time()
    pm = svdadapt.wrap(model, "pissa", RANK, target_modules=[], target_parameters=EXPERTS, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    by_key = {}
    for n, (A, B) in pm.svdadapt.init_factors.items():  # per expert ‖s·B_e·A_e‖² (s = 1: alpha = rank)
        info = pm.svdadapt.parameters[n]
        E = info["experts"]  # PEFT's layout: lora_A (E·r, in) blocks, lora_B column j·E + e (docs/experts.md)
        a, b = A.double().reshape(E, RANK, -1), B.double().reshape(B.shape[0], RANK, E).permute(2, 0, 1)
        by_key[info["key"]] = [float((b[e] @ a[e]).pow(2).sum()) for e in range(E)]
    got = [v for k in keys for v in by_key[k]]
    return {"wall_s": wall, "cpu_s": cpu, "ratios": [g / x for g, x in zip(got, exact)], "ok": True}


def _model_keys(model):
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 3]


def job_peft(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=[], target_parameters=EXPERTS,
                     init_lora_weights="pissa_niter_16")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        get_peft_model(model, cfg)
        error = None
    except Exception as e:  # what PEFT does there, recorded
        error = f"{type(e).__name__}: {e}"
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "ok": error is None,
            "error": error}


def job_lowrank(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    exact = _exact_energy(model)
    got = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _, p in _model_keys(model):
        for e in range(p.shape[0]):
            _, S, _ = torch.svd_lowrank(p[e].detach(), q=RANK, niter=16)
            got.append(float(S.pow(2).sum()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "ratios": [g / x for g, x in zip(got, exact)], "ok": True}


def job_write_checkpoint(hidden: int, intermediate: int, layers: int, experts: int, out: str) -> dict:
    """The model saved by transformers 5's ``save_pretrained`` into ``out`` (its per-expert checkpoint layout)."""
    torch.set_num_threads(1)
    _model(hidden, intermediate, layers, experts).save_pretrained(out)
    return {"bytes": sum(f.stat().st_size for f in Path(out).iterdir())}


def _init_run(fn) -> dict:
    """``fn()`` timed (wall, CPU) with the RSS before it (after the imports both ways need: svdadapt, peft,
    transformers' model classes) and the peak after."""
    import peft  # noqa: F401
    import svdadapt.stream.init  # noqa: F401
    from _common import current_rss_mb, peak_rss_mb
    from transformers import MixtralForCausalLM  # noqa: F401

    torch.set_num_threads(1)
    rss0 = current_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "rss_start_mb": rss0,
            "peak_rss_mb": peak_rss_mb()}


def job_init_in_memory(checkpoint: str, out: str) -> dict:
    """``svdadapt init --in-memory``: the model loaded, wrapped (experts only, rank 16), its init directory written."""
    import svdadapt
    from svdadapt.lifecycle.initdir import write_init_dir
    from transformers import AutoModelForCausalLM

    def run() -> None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        pm = svdadapt.wrap(model, "pissa", RANK, target_modules=[], target_parameters=EXPERTS, progress=False)
        write_init_dir(out, pm, model_path=checkpoint)

    return _init_run(run)


def job_init_streamed(checkpoint: str, out: str) -> dict:
    """``svdadapt.init_checkpoint``: the same init directory, streamed tensor by tensor."""
    import svdadapt

    return _init_run(lambda: svdadapt.init_checkpoint(checkpoint, out, method="pissa", rank=RANK, target_modules=[],
                                                      target_parameters=EXPERTS, progress=False))


def _same_adapters(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def stream_rows(shape: dict) -> tuple[list[dict], dict]:
    """The in-memory and streamed init directories of a temporary checkpoint: (rows, checkpoint info)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "checkpoint"
        info = run_job("bench_moe:job_write_checkpoint", env={"OMP_NUM_THREADS": "1"}, out=str(ck), **shape)
        rows = []
        for name, target in (("in memory (from_pretrained + wrap + write_init_dir)", "bench_moe:job_init_in_memory"),
                             ("streamed (init_checkpoint)", "bench_moe:job_init_streamed")):
            out = Path(tmp) / target.rsplit("_", 1)[1]
            rows.append({"variant": name, **run_job(target, env={"OMP_NUM_THREADS": "1"}, checkpoint=str(ck),
                                                    out=str(out))})
        same = _same_adapters(Path(tmp) / "memory", Path(tmp) / "streamed")
    return rows, {"checkpoint_bytes": info["bytes"], "adapters_bit_identical": same}


BITS, GROUP = 3, 64
CALIB, CALIB_SHAPE, HELD, HELD_SHAPE = 16, (8, 64), 4, (8, 64)  # 8192 calibration tokens: ~2048 per expert


@torch.no_grad()
def _add_plain_svd(ref, comp) -> None:
    """In place: every expert matrix of ``comp`` (its 3-D parameters, in ``ref``'s order) becomes W_c[e] + the
    rank-16 truncated SVD (fp32 LAPACK) of W_ref[e] − W_c[e]."""
    for (_, Wr), Wo in zip(_model_keys(ref), (p for p in comp.parameters() if p.dim() == 3)):
        for e in range(Wr.shape[0]):
            U, S, Vh = torch.linalg.svd(Wr[e] - Wo[e], full_matrices=False)
            Wo[e] += (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]


@torch.no_grad()
def _scale_experts(model, batch, block_io) -> float:
    """Multiply every expert parameter by one c so that layer 0's MoE output has the rms of the embeddings (the
    residual stream it adds to): the output is ~cubic in c (silu(g)·u then down), so c = (rms_emb / rms_out)^(1/3).
    The decaying-spectrum experts of ``_model`` alone give outputs ~1e-6 of the stream, which leaves the logits
    blind to the experts. Returns c."""
    x, y = block_io(model, [batch])[0][0]
    emb = model.model.embed_tokens(batch["input_ids"])
    c = float((emb.pow(2).mean().sqrt() / y.pow(2).mean().sqrt()) ** (1 / 3))
    for _, p in _model_keys(model):
        p.mul_(c)
    return c


def _logits_error(model, ref_logits, data) -> float:
    """Σ‖logits − logits_ref‖² / Σ‖logits_ref‖² over the held-out batches."""
    num = den = 0.0
    with torch.no_grad():
        for y, b in zip(ref_logits, data):
            out = model(**b, use_cache=False).logits
            num += float((out - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
    return num / den


def job_eora(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    import warnings

    import svdadapt
    from _common import current_rss_mb, peak_rss_mb
    from bench_expert_weighting import batches, block_io, error, structure

    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    structure(model, 0)
    vocab = model.config.vocab_size
    calib, held = batches(100, CALIB, vocab, CALIB_SHAPE), batches(200, HELD, vocab, HELD_SHAPE)
    scale = _scale_experts(model, batches(300, 1, vocab, (2, 64))[0], block_io)
    comp = svdadapt.compress.quantize(model, BITS, GROUP, target_modules=None, target_parameters=EXPERTS)
    io = block_io(model, held)
    with torch.no_grad():
        ref_logits = [model(**b, use_cache=False).logits for b in held]
    rows = {"compressed": (error(comp, io), _logits_error(comp, ref_logits, held))}
    rss0 = current_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = svdadapt.wrap(comp, "eora", RANK, reference=model, calibration=calib, target_modules=[],
                           target_parameters=EXPERTS, progress=False)
    wall, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb()
    rows["eora"] = (error(pm.base_model.model, io), _logits_error(pm, ref_logits, held))
    with pm.disable_adapter():  # EoRA leaves the base W_c as it is: plain SVD added to it, adapters off
        _add_plain_svd(model, pm)
        rows["svd"] = (error(pm.base_model.model, io), _logits_error(pm, ref_logits, held))
    return {"errors": {k: {"blocks": b, "logits": lg} for k, (b, lg) in rows.items()},
            "expert_scale": scale, "eora_wall_s": wall, "eora_cpu_s": cpu, "eora_rss_start_mb": rss0,
            "eora_peak_rss_mb": peak,
            "warnings": sorted({str(w.message)[:200] for w in caught})}


def main_eora(shape: dict) -> None:
    r = run_job("bench_moe:job_eora", env={"OMP_NUM_THREADS": "1"}, **shape)
    names = {"compressed": f"compressed RTN {BITS}-bit g{GROUP}, no adapter",
             "svd": f"plain SVD of ΔW_e, rank {RANK} per expert", "eora": f"EoRA rank {RANK} per expert (routed)"}
    rows = [{"variant": names[k], **r["errors"][k]} for k in names]
    rows[-1].update(init_wall_s=r["eora_wall_s"], init_cpu_s=r["eora_cpu_s"], peak_rss_mb=r["eora_peak_rss_mb"])
    print(markdown_table(rows, [("variant", "variant", "{}"), ("blocks", "MoE blocks' held-out rel. error", "{:.4e}"),
                                ("logits", "logits' held-out rel. error", "{:.4e}"),
                                ("init_wall_s", "init wall s", "{:.1f}"), ("init_cpu_s", "init CPU s", "{:.1f}"),
                                ("peak_rss_mb", "peak RSS MiB", "{:.0f}")]))
    for w in r["warnings"]:
        print("warning:", w)
    path = RESULTS_DIR / "bench_moe.json"
    old = json.loads(path.read_text()) if path.exists() else {}  # the PiSSA part's keys (and machine) kept
    eora = {"shape": shape, "rank": RANK, "bits": BITS, "group_size": GROUP,
            "calibration": {"batches": CALIB, "shape": CALIB_SHAPE}, "held_out": {"batches": HELD, "shape": HELD_SHAPE},
            "machine": machine_info(), "command": " ".join(["python benchmarks/bench_moe.py", *sys.argv[1:]]),
            "rows": rows,
            **{k: r[k] for k in ("job_s", "expert_scale", "eora_rss_start_mb", "warnings")}}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old | {"eora": eora}, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--eora", action="store_true", help="run the EoRA part (held-out error vs plain SVD) instead")
    args = p.parse_args(argv)
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, experts=args.experts)
    if args.eora:
        return main_eora(shape)
    rows = []
    for name, target in (("svdadapt pissa (per expert, block Krylov)", "bench_moe:job_svdadapt"),
                         ("PEFT target_parameters pissa_niter_16", "bench_moe:job_peft"),
                         ("torch.svd_lowrank niter 16 per expert", "bench_moe:job_lowrank")):
        r = run_job(target, env={"OMP_NUM_THREADS": "1"}, **shape)
        ratios = r.get("ratios") or []
        rows.append({"variant": name, **r, "mean_energy": sum(ratios) / len(ratios) if ratios else None,
                     "min_energy": min(ratios) if ratios else None})
    print(markdown_table(rows, [("variant", "variant", "{}"), ("wall_s", "init wall s", "{:.1f}"),
                                ("cpu_s", "init CPU s", "{:.1f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
                                ("mean_energy", "energy / optimal (mean)", "{:.5f}"),
                                ("min_energy", "(worst expert)", "{:.5f}")]))
    for r in rows:
        if r.get("error"):
            print(f"{r['variant']}: {r['error']}")
    for r in rows:
        r.pop("ratios", None)
    streamed, ck = stream_rows(shape)
    print(markdown_table(streamed, [("variant", "init directory", "{}"), ("wall_s", "wall s", "{:.1f}"),
                                    ("cpu_s", "CPU s", "{:.1f}"), ("rss_start_mb", "RSS after imports MiB", "{:.0f}"),
                                    ("peak_rss_mb", "peak RSS MiB", "{:.0f}")]))
    print(f"checkpoint {ck['checkpoint_bytes'] / 2**20:.0f} MiB; adapters bit-identical: {ck['adapters_bit_identical']}")
    path = RESULTS_DIR / "bench_moe.json"
    kept = {k: v for k, v in json.loads(path.read_text()).items() if k == "eora"} if path.exists() else {}
    path = write_results("bench_moe", {"shape": shape, "rank": RANK, "rows": rows, "streaming": {"rows": streamed, **ck},
                                       "command": " ".join(["python benchmarks/bench_moe.py", *sys.argv[1:]]),
                                       **kept})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

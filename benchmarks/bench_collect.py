"""The cost of collecting CorDA / EoRA covariances against the bare forward over the same tokens, on SmolLM2-135M.

One process, the model loaded once; the rows run interleaved, ``--repeats`` times each, and the minimum counts
(the machine may be shared):

- bare forward: ``model(**batch, use_cache=False)`` under ``torch.no_grad``, every batch (logits of every position);
- forward, last logits only: the same with ``logits_to_keep=1`` (what the collection runs when no target is the
  output head);
- ``collect_covariances``: hooks on all 210 Linears (120 unique inputs), the covariances of every one.

The ratio is collection / bare forward, of the process's CPU time (with one thread the steadier figure) and of the
wall time. Calibration as ``bench_corda.py``: ``--seqs`` sequences of ``--seq-len`` tokens of pydoc text, 4 per
batch.

    python benchmarks/bench_collect.py --threads 1                  # 8 x 256 tokens, 5 repeats
    python benchmarks/bench_collect.py --threads 1 --seqs 32 --repeats 3

Writes ``benchmarks/results/bench_collect.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, smollm2, write_results  # noqa: E402
from bench_corda import _batches  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of ``fn()``."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import svdadapt

    model, tok = smollm2()
    batches = _batches(tok, args.seqs, args.seq_len)

    @torch.no_grad()
    def forward(**extra) -> None:
        for b in batches:
            model(**b, use_cache=False, **extra)

    rows = {"bare forward": forward,
            "forward, last logits only": lambda: forward(logits_to_keep=1),
            "collect_covariances": lambda: svdadapt.collect_covariances(model, batches, progress=False)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    loads = [open("/proc/loadavg").read().split()[0]] if Path("/proc/loadavg").exists() else []
    rows["bare forward"]()  # warm-up: first-call costs out of every row
    for _ in range(args.repeats):
        for name, fn in rows.items():
            times[name].append(_timed(fn))
    if loads:
        loads.append(open("/proc/loadavg").read().split()[0])
    base_cpu = min(c for c, _ in times["bare forward"])
    base_wall = min(w for _, w in times["bare forward"])
    out = [{"row": name, "cpu_s": min(c for c, _ in t), "wall_s": min(w for _, w in t),
            "cpu_ratio": min(c for c, _ in t) / base_cpu, "wall_ratio": min(w for _, w in t) / base_wall}
           for name, t in times.items()]
    table = markdown_table(out, [("row", "", "{}"), ("cpu_s", "CPU (s)", "{:.2f}"), ("wall_s", "wall (s)", "{:.2f}"),
                                 ("cpu_ratio", "CPU / bare forward", "{:.2f}"),
                                 ("wall_ratio", "wall / bare forward", "{:.2f}")])
    config = {"model": "SmolLM2-135M-Instruct (fp32)", "seqs": args.seqs, "seq_len": args.seq_len,
              "tokens": args.seqs * args.seq_len, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "loadavg_1min_start_end": loads}
    path = write_results("bench_collect", {"config": config, "rows": out, "table": table})
    print(table)
    print(f"\nload (1-min average, start / end): {' / '.join(loads)}\nwrote {path}")
    return {"rows": out, "table": table}


if __name__ == "__main__":
    main()

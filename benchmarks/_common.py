"""Shared machinery for the benchmarks: isolated runs, Markdown tables, JSON results.

Every configuration runs in a fresh Python subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to it alone and one row's allocator state or warm
caches cannot help the next one. A job is any importable function ``module:function`` that takes keyword
arguments (JSON-able) and returns a JSON-able dict; it times the part it cares about with :class:`Stopwatch`
(model loading is then excluded from ``wall_s`` but included in the process's peak RSS, which is reported
next to the RSS at the start of the timed part).

Typical use from a benchmark script::

    from _common import run_job, markdown_table, write_results
    row = run_job("bench_init:job", model="smollm2", impl="svdadapt")
    print(markdown_table([row], [("impl", "impl", "{}"), ("wall_s", "wall (s)", "{:.2f}")]))
    write_results("bench_init", {"rows": [row]})

Run a single job by hand: ``python benchmarks/_common.py bench_init:job '{"model": "smollm2"}'``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "BENCH_DIR",
    "RESULTS_DIR",
    "Stopwatch",
    "Measured",
    "peak_rss_mb",
    "current_rss_mb",
    "run_job",
    "markdown_table",
    "machine_info",
    "write_results",
    "random_llama",
    "smollm2",
]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_RESULT_ENV = "SVDADAPT_BENCH_RESULT"


# --------------------------------------------------------------------------------------------- memory, time
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float:
    """Current resident set size in MiB (from /proc on Linux; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


class Stopwatch:
    """Times named sections of a job: ``with sw("init"): ...`` records ``init_s`` (wall), ``init_cpu_s`` (this
    process's CPU time, all threads: with one thread and other jobs on the machine it is the steadier number)
    and the RSS at its start.

    ``sw.results()`` returns ``{"<name>_s": s, "<name>_cpu_s": s, "<name>_rss_start_mb": MiB, ...}``.
    """

    def __init__(self) -> None:
        self._out: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._out[f"{name}_rss_start_mb"] = current_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._out[f"{name}_s"] = time.perf_counter() - t0
            self._out[f"{name}_cpu_s"] = time.process_time() - c0

    def results(self) -> dict[str, float]:
        return dict(self._out)


class Measured:
    """One section timed and its memory watched inside a running process: ``with Measured() as m: ...`` gives
    ``m.cpu_s`` (this process's CPU time, all threads), ``m.wall_s``, ``m.rss_start_mb`` and ``m.rss_peak_mb``, the
    highest RSS a background thread saw, sampling ``/proc/self/statm`` every ``interval`` s (a peak shorter than
    that can be missed; the sampler's own CPU time, a file read per interval, is counted in ``cpu_s``). For the peak
    of a whole job use :func:`run_job` (``ru_maxrss`` of a fresh process)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self.cpu_s = self.wall_s = self.rss_start_mb = self.rss_peak_mb = 0.0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss_peak_mb = max(self.rss_peak_mb, current_rss_mb())

    def __enter__(self) -> "Measured":
        self.rss_start_mb = self.rss_peak_mb = current_rss_mb()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu_s, self.wall_s = time.process_time() - self._c0, time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.rss_peak_mb = max(self.rss_peak_mb, current_rss_mb())


# --------------------------------------------------------------------------------------------- subprocess
def _resolve(target: str) -> Callable[..., dict[str, Any]]:
    module, _, func = target.partition(":")
    if not module or not func:
        raise ValueError(f"job target must look like 'module:function', got {target!r}")
    return getattr(importlib.import_module(module), func)


def _child(target: str, kwargs_json: str) -> None:
    """Entry point in the subprocess: run the job, add wall time and peak RSS, write JSON where the parent said."""
    fn = _resolve(target)
    kwargs = json.loads(kwargs_json)
    t0 = time.perf_counter()
    out = dict(fn(**kwargs) or {})
    out.setdefault("job_s", time.perf_counter() - t0)
    out["peak_rss_mb"] = peak_rss_mb()
    path = os.environ.get(_RESULT_ENV)
    text = json.dumps(out, default=float)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def run_job(target: str, *, timeout: float | None = None, env: dict[str, str] | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Run ``target`` (``"module:function"``, importable from ``benchmarks/``) with ``kwargs`` in a fresh
    Python process and return its dict plus ``peak_rss_mb`` (the child's peak RSS) and ``job_s``.

    The child's stdout/stderr (progress bars) pass through; a failing child raises ``RuntimeError`` with
    the target and exit code.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        child_env = dict(os.environ, **(env or {}))
        child_env[_RESULT_ENV] = str(result)
        # benchmarks/ first on the path, so jobs import each other and this module as top-level modules
        child_env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, str(Path(__file__).resolve()), target, json.dumps(kwargs)]
        proc = subprocess.run(cmd, env=child_env, cwd=str(BENCH_DIR.parent), timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"benchmark job {target} {kwargs} failed with exit code {proc.returncode}")
        return json.loads(result.read_text())


# --------------------------------------------------------------------------------------------- reporting
def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A GitHub Markdown table: ``columns`` are ``(key, header, format)``; a missing or None value prints "—".

    Numeric columns (format other than ``"{}"``) are right-aligned.
    """
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        v = row.get(key)
        if v is None:
            return "—"
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were taken, including the 1-minute load average (other processes count)."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for pkg in ("transformers", "peft"):
        with contextlib.suppress(Exception):
            info[pkg] = importlib.import_module(pkg).__version__
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus ``machine_info()`` to ``benchmarks/results/<name>.json``; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=float) + "\n")
    return path


# ------------------------------------------------------------------------------------ fine-tuning protocol
def add_finetune_arguments(p: Any, *, lrs: str, out: Path) -> None:
    """The options of the fine-tuning protocol that bench_finetune and bench_quant share (a learning-rate sweep on
    seed 0, each start's best rate on the other seeds), and how a run is stored and reported."""
    p.add_argument("--lrs", default=lrs, help="shared learning-rate sweep, run on seed 0")
    p.add_argument("--seeds", default="0,1", help="seed 0 sweeps; the others run each start's best rate")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--target-loss", type=float, default=0.5)
    p.add_argument("--n-val", type=int, default=128, help="held-out items that pick the learning rate")
    p.add_argument("--n-test", type=int, default=256, help="held-out items scored at the end")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(out))
    p.add_argument("--fresh", action="store_true", help="ignore what --out holds")
    p.add_argument("--report-only", action="store_true", help="print the tables and redraw the PNG from --out")
    p.add_argument("--no-progress", action="store_true")


def parse_seeds(p: Any, text: str) -> list[int]:
    seeds = [int(s) for s in text.split(",")]
    if 0 not in seeds:
        p.error("--seeds must include 0 (the sweep seed)")
    return seeds


def best_lr(runs: list[dict], method: str) -> float | None:
    """The sweep (seed 0) learning rate with the highest validation accuracy; ties: lower final training loss."""
    cands = [r for r in runs if r["method"] == method and r["seed"] == 0]
    if not cands:
        return None
    return min(cands, key=lambda r: (-r["val_accuracy"], r["final_train_loss"]))["lr"]


def sweep_grid(runs: list[dict], methods: Sequence[str], label: str = "method") -> str:
    """Markdown grid of the seed-0 sweep: a row per method, a column per learning rate, cells "val / test"
    exact match, the chosen rate in bold."""
    lrs = sorted({r["lr"] for r in runs if r["seed"] == 0})
    lines = [f"| {label} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for m in methods:
        cells = []
        for lr in lrs:
            r = next((r for r in runs if r["method"] == m and r["lr"] == lr and r["seed"] == 0), None)
            cell = "—" if r is None else f"{r['val_accuracy']:.3f} / {r['test_accuracy']:.3f}"
            cells.append(f"**{cell}**" if r is not None and lr == best_lr(runs, m) else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(out: Path, payload: dict[str, Any], report: Callable[[dict], str], plot: Callable[[dict, Path], None]
         ) -> dict[str, Any]:
    """The tables printed and the PNG (next to ``out``) drawn."""
    print(report(payload))
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return payload


def report_only(out: Path, report: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> dict[str, Any]:
    """``--report-only``: the tables printed and the PNG redrawn from the stored results."""
    return show(out, json.loads(out.read_text()), report, plot)


# --------------------------------------------------------------------------------------------- models
def random_llama(hidden: int = 2048, intermediate: int = 5632, layers: int = 4, heads: int = 32,
                 kv_heads: int | None = None, vocab: int = 32000, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` (fp32, eval) built from a config, seeded without touching the
    global RNG's state for the caller. The default is the 4-layer, hidden-2048 model of the init benchmark."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def smollm2():
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct, fp32, eval (via ``svdadapt.loading``)."""
    from svdadapt.loading import load_smollm2

    return load_smollm2()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/_common.py module:function '<json kwargs>'")
    sys.path.insert(0, str(BENCH_DIR))
    _child(sys.argv[1], sys.argv[2])

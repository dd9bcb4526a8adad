"""Where the time of ``wrap(model, "pissa", 16)`` goes: CPU time of each part, one torch thread, the first call in a
fresh process and a second call on a freshly loaded model (steady state).

    python benchmarks/profile_wrap.py smollm2     # SmolLM2-135M, saved once to a temporary directory and reloaded
    python benchmarks/profile_wrap.py llama       # the random Llama h2048/i5632/4 layers of bench_init.py

Each part is ``time.thread_time`` around the function that does it (patched in for the run); "imports inside the
call" is the time of the imports ``wrap`` triggers of modules not yet loaded. Prints one JSON object per call
(docs/benchmarks.md, "Where the time of wrap goes", takes the fastest of 3 runs).
"""

from __future__ import annotations

import builtins
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import random_llama  # noqa: E402

T: dict[str, float] = collections.defaultdict(float)


def timed(key, fn):
    def call(*a, **k):
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            T[key] += time.thread_time() - t
    call.__wrapped__ = fn
    return call


def _timed_imports() -> None:
    original, depth = builtins.__import__, [0]

    def imp(name, globals=None, locals=None, fromlist=(), level=0):
        if depth[0] or level or name in sys.modules:
            return original(name, globals, locals, fromlist, level)
        depth[0] += 1
        t = time.thread_time()
        try:
            return original(name, globals, locals, fromlist, level)
        finally:
            depth[0] -= 1
            T["imports inside the call"] += time.thread_time() - t
    builtins.__import__ = imp


def _instrument(method: str) -> None:
    from svdadapt.core.methods import METHODS
    import svdadapt.engine.apply as apply

    wrap = sys.modules["svdadapt.wrap"]
    spec = METHODS[method]
    object.__setattr__(spec, "init", timed("decompositions", spec.init))
    for module, name, key in [(wrap.checks, "scan_layer", "finiteness + checksums (one pass)"),
                              (wrap.checks, "check_target_weights", "checks of the weights"),
                              (apply, "_write_bases", "residual write"), (apply, "apply", "apply (all)"),
                              (apply, "get_peft_model", "PEFT construction")]:
        if hasattr(module, name):
            setattr(module, name, timed(key, getattr(module, name)))
    wrap.apply = apply.apply


def main(model: str, method: str = "pissa") -> None:
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="profile_wrap_")
    try:
        if model == "smollm2":
            from svdadapt.loading import load_model, load_smollm2

            load_smollm2()[0].save_pretrained(tmp)
            load = lambda: load_model(tmp)  # noqa: E731
        else:
            load = lambda: random_llama(hidden=2048, intermediate=5632, layers=4, heads=32)  # noqa: E731
        c = time.process_time()
        import svdadapt
        import_cpu = time.process_time() - c
        _instrument(method)
        _timed_imports()
        for call in ("first", "steady"):
            net = load()
            T.clear()
            before = set(sys.modules)
            c = time.process_time()
            svdadapt.wrap(net, method, 16, progress=False)
            cpu = time.process_time() - c
            parts = {k: round(v, 3) for k, v in T.items()}
            print(json.dumps({"model": model, "call": call, "cpu_s": round(cpu, 3), "import_svdadapt_cpu_s":
                              round(import_cpu, 3), "parts": parts, "imported": sorted(set(sys.modules) - before),
                              "load": open("/proc/loadavg").read().split()[0]}))
            del net
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

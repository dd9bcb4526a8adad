"""The ``svdadapt`` command line: ``init``, ``calibrate``, ``export``, ``report`` over the library functions.

``svdadapt init MODEL ... --out DIR`` writes what any trainer can use without svdadapt installed::

    DIR/base/                        the rewritten base (EoRA: the compressed model) as an ordinary HF model dir
    DIR/adapter/                     the initial rank-r adapter in PEFT format, for DIR/base
    DIR/svdadapt.json                method, options, rank-r LoRA config, sha256 of the ORIGINAL weights, report
    DIR/svdadapt_state.safetensors   the initial factors A₀, B₀ (and A, B = A₀, B₀)
    DIR/report.json                  per-layer captured energy (EoRA: compensation error)

``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter, is_trainable=True)`` is
the wrapped model. Train it with any tool and save the trained adapter with plain PEFT ``save_pretrained``, either
over DIR/adapter or elsewhere (then pass ``--adapter``); ``svdadapt export DIR --out LORA_DIR`` then writes a plain
LoRA for the ORIGINAL model (the same directory :func:`svdadapt.save` writes, so ``svdadapt.load`` resumes from it).

Exit status: 0 success; 2 the command line is wrong (unknown method, missing option, option that the method does
not take, missing input file, output that would be overwritten); 1 the run failed (e.g. rank above a layer's
size, a trained adapter that does not fit the init directory). Errors are one line on stderr, never a traceback
(set ``SVDADAPT_DEBUG=1`` to get it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]

_TEXT_HINT = "text files, or a covariances .safetensors from `svdadapt calibrate`"


class UsageError(Exception):
    """A bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that raise instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:  # argparse prefixes "argument --rank: "
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return n


def _positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {v!r}")
    return x


def _parser() -> _Parser:
    from .methods import METHODS

    p = _Parser(prog="svdadapt", description="LoRA adapters initialized from a model's own weights and activations.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def calib_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                       help="module names or dotted suffixes (q_proj v_proj ...); default all-linear (every Linear "
                            "but the output head)")
        q.add_argument("--seq-len", type=_positive, default=512, help="calibration sequence length")
        q.add_argument("--batch-size", type=_positive, default=4, help="calibration batch size")
        q.add_argument("--max-tokens", type=_positive, default=None,
                       help="use at most this many calibration tokens (rounded up to whole batches)")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")

    q = sub.add_parser("init", help="wrap MODEL and write DIR/base, DIR/adapter, DIR/report.json",
                       description="Initialize an adapter from MODEL (a local Hugging Face directory or a .gguf file).")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--method", required=True, choices=list(METHODS))
    q.add_argument("--rank", required=True, type=_positive)
    q.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default: rank)")
    q.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) instead of alpha/r")
    q.add_argument("--mode", choices=["ipa", "kpa"], default=None, help="corda only (default ipa)")
    q.add_argument("--calib", nargs="+", default=None, metavar="FILE", help=f"corda/eora: {_TEXT_HINT}")
    q.add_argument("--reference", default=None, metavar="MODEL", help="eora: the uncompressed model")
    q.add_argument("--svd", choices=["auto", "full", "randomized"], default="auto")
    q.add_argument("--seed", type=int, default=0, help="seeds the randomized sketches")
    q.add_argument("--out", required=True, metavar="DIR")
    calib_options(q)

    q = sub.add_parser("calibrate", help="collect input covariances into a .safetensors file",
                       description="Run MODEL on text files and save the input covariance of every target Linear.")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--calib", nargs="+", required=True, metavar="FILE", help="text files")
    q.add_argument("--float64", action="store_true", help="accumulate in float64")
    q.add_argument("--out", required=True, metavar="FILE.safetensors")
    calib_options(q)

    q = sub.add_parser("export", help="plain LoRA for the ORIGINAL model from an init directory after training",
                       description="Convert the trained adapter of an init directory into a plain PEFT LoRA for the "
                                   "original model (rank 2r; EoRA: rank r for the compressed model).")
    q.add_argument("dir", metavar="DIR", help="a directory written by `svdadapt init`")
    q.add_argument("--adapter", default=None, metavar="TRAINED_DIR",
                   help="the trained adapter (PEFT save_pretrained of the model built from DIR/base + DIR/adapter); "
                        "default DIR/adapter")
    q.add_argument("--out", required=True, metavar="LORA_DIR")

    q = sub.add_parser("report", help="print the per-layer report of an init or save directory")
    q.add_argument("dir", metavar="DIR")
    q.add_argument("--layers", action="store_true", help="one row per layer instead of per module kind")
    return p


# ------------------------------------------------------------------------------------------------------- helpers


def _must_exist_model(path: str, what: str = "model") -> None:
    p = Path(path)
    ok = p.is_file() if p.suffix == ".gguf" else p.is_dir()
    if not ok:
        raise UsageError(f"no such {what} directory or .gguf file: {path!r}")


def _calib_files(files: Sequence[str]) -> tuple[str | None, list[str]]:
    """(covariances path or None, text files); checks they exist."""
    for f in files:
        if not Path(f).is_file():
            raise UsageError(f"no such calibration file: {f!r}")
    covs = [f for f in files if f.endswith(".safetensors")]
    if covs and len(files) > 1:
        raise UsageError(f"--calib takes either one covariances .safetensors file or text files, got {list(files)}")
    return (covs[0] if covs else None), [f for f in files if not f.endswith(".safetensors")]


def _fresh_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UsageError(f"output {path!r} exists and is not an empty directory")
    return p


def _targets(values: Sequence[str]) -> Any:
    return "all-linear" if list(values) == ["all-linear"] else list(values)


def _text_batches(tokenizer: Any, files: Sequence[str], args: argparse.Namespace) -> list[dict]:
    from .calibration import text_batches

    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    per_batch = args.seq_len * args.batch_size
    max_batches = None if args.max_tokens is None else max(1, -(-args.max_tokens // per_batch))
    return text_batches(tokenizer, texts, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=max_batches)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _is_number(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Columns of numbers right-aligned (headers too), text left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(str(r[i])) for r in rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if num else str(c).ljust(w)  # noqa: E731
                               for c, w, num in zip(r, widths, numeric)).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _kv(title: str, rows: list[tuple[str, str]]) -> str:
    """A key/value summary block."""
    w = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k.ljust(w)}  {v}" for k, v in rows)])


def format_report(method: str, layers: dict[str, dict[str, Any]], per_layer: bool = False) -> str:
    """A table of the per-layer numbers of ``wrap``'s report, per layer or grouped by module kind (min / mean / max).

    The column is the method's own (``MethodSpec.report``): the captured energy ‖s·B·A‖²/‖W‖² (CorDA: of W·C) for the
    methods that decompose the weight, and for EoRA the remaining compensation error ‖(ΔW − M)·S‖ / ‖ΔW·S‖ in the
    calibration-whitened space."""
    from .methods import get_method

    spec = get_method(method)
    key, label = spec.report.key, spec.report.label
    if per_layer:
        header = ["module", "shape", "sigma_max", label, *spec.extra_columns]
        rows = [[n, "x".join(map(str, r.get("shape", ()))), f"{r.get('sigma_max', float('nan')):.4g}",
                 f"{r.get(key, float('nan')):.4f}", *(f"{r.get(c, float('nan')):.3g}" for c in spec.extra_columns)]
                for n, r in layers.items()]
        return _table(rows, header)
    groups: dict[str, list[tuple[str, float]]] = {}
    for n, r in layers.items():
        groups.setdefault(n.rsplit(".", 1)[-1], []).append((n, float(r.get(key, float("nan")))))
    rows = []
    pick_worst = max if spec.report.high_is_bad else min
    for kind, vals in groups.items():
        xs = [v for _, v in vals]
        worst = pick_worst(vals, key=lambda t: t[1])
        rows.append([kind, str(len(xs)), f"{min(xs):.4f}", f"{sum(xs) / len(xs):.4f}", f"{max(xs):.4f}", worst[0]])
    return _table(rows, ["kind", "layers", f"min {label}", f"mean {label}", f"max {label}", "worst layer"])


# ------------------------------------------------------------------------------------------------------ commands


def _cmd_init(args: argparse.Namespace) -> int:
    from .methods import METHODS

    spec = METHODS[args.method]
    _must_exist_model(args.model)
    if args.mode is not None and None in spec.modes:
        with_modes = " or ".join(m.name for m in METHODS.values() if None not in m.modes)
        raise UsageError(f"--mode applies to --method {with_modes} only, not {args.method}")
    if spec.needs_calibration and not args.calib:
        raise UsageError(f"--method {args.method} needs calibration data: --calib FILE ... ({_TEXT_HINT})")
    if not spec.needs_calibration and args.calib:
        raise UsageError(f"--method {args.method} takes no calibration data; drop --calib")
    if spec.needs_reference and args.reference is None:
        raise UsageError(f"--method {args.method} needs --reference MODEL: the uncompressed model (MODEL is the "
                         "compressed one)")
    if not spec.needs_reference and args.reference is not None:
        raise UsageError(f"--reference applies to --method eora only, not {args.method}")
    if args.reference is not None:
        _must_exist_model(args.reference, "reference model")
    covs_path, texts = _calib_files(args.calib or [])
    out = _fresh_dir(args.out)

    import torch
    from peft import PeftModel

    from . import loading
    from .checkpoint import write_checkpoint
    from .export import checkpoint_meta
    from .wrap import wrap

    progress = not args.no_progress
    _say(f"loading {args.model}")
    model = loading.load_model(args.model)
    try:
        tokenizer = loading.load_tokenizer(args.model)
    except Exception as e:  # a bare weights directory: fine unless text has to be tokenized
        if texts:
            raise ValueError(f"cannot load a tokenizer from {args.model!r} to tokenize --calib text: {e}") from e
        _say(f"warning: no tokenizer in {args.model!r} ({type(e).__name__}); {out / 'base'} will have none")
        tokenizer = None
    reference = None
    if args.reference is not None:
        _say(f"loading reference {args.reference}")
        reference = loading.load_model(args.reference)
    calibration: Any = covs_path
    if texts:
        calibration = _text_batches(tokenizer, texts, args)
        n_tok = sum(int(b["attention_mask"].sum()) for b in calibration)
        _say(f"calibration: {len(texts)} file(s), {n_tok} tokens in {len(calibration)} batch(es) of "
             f"{args.batch_size}x{args.seq_len}")

    with torch.no_grad():
        pm = wrap(model, method=args.method, rank=args.rank, alpha=args.alpha, use_rslora=args.rslora,
                  target_modules=_targets(args.target_modules), svd=args.svd, seed=args.seed, mode=args.mode,
                  calibration=calibration, reference=reference, progress=progress)
    info = pm.svdadapt
    meta = checkpoint_meta(pm)
    meta["source"] = {"model": os.path.abspath(args.model),
                      "reference": os.path.abspath(args.reference) if args.reference else None}

    out.mkdir(parents=True, exist_ok=True)
    # config first: PEFT's save looks for base_model_name_or_path/config.json (else it may ask the Hub)
    pm.get_base_model().config.save_pretrained(str(out / "base"))
    # the raw rank-r adapter, correct on DIR/base (PEFT's own save, bypassing the guard that converts for W)
    cfg = pm.peft_config["default"]
    cfg.base_model_name_or_path, original_name = str((out / "base").resolve()), cfg.base_model_name_or_path
    PeftModel.save_pretrained(pm, str(out / "adapter"))
    cfg.base_model_name_or_path = original_name
    # resume record in DIR itself (no portable adapter: untrained, ΔW = 0); `svdadapt export` completes it
    write_checkpoint(out, meta, info.init_factors, info.init_factors, resume=True, portable=False)
    report = {"method": args.method, "rank": args.rank, "alpha": info.alpha, "options": info.options,
              "model": meta["source"]["model"], "layers": info.report}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=list))
    _say(f"saving base to {out / 'base'}")
    base = pm.unload()  # adapters out, rewritten weights in: an ordinary transformers model
    base.save_pretrained(str(out / "base"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "base"))

    print(format_report(args.method, info.report))
    print()
    print(_kv("svdadapt init", [
        ("method", args.method + (f" ({info.options['mode']})" if info.options["mode"] else "")),
        ("rank / alpha", f"{args.rank} / {info.alpha:g}" + (" (rsLoRA)" if args.rslora else "")),
        ("layers", str(len(info.targets))),
        ("base", str(out / "base")),
        ("adapter", str(out / "adapter")),
        ("report", str(out / "report.json")),
    ]))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    _must_exist_model(args.model)
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"--out must be a .safetensors file, got {args.out!r}")
    covs_path, texts = _calib_files(args.calib)
    if covs_path is not None:
        raise UsageError(f"calibrate reads text files, got covariances {covs_path!r}")
    if Path(args.out).exists():
        raise UsageError(f"output {args.out!r} exists")

    import torch

    from . import loading
    from .calibration import collect_covariances

    _say(f"loading {args.model}")
    model = loading.load_model(args.model)
    tokenizer = loading.load_tokenizer(args.model)
    batches = _text_batches(tokenizer, texts, args)
    covs = collect_covariances(model, batches, target_modules=_targets(args.target_modules),
                               dtype=torch.float64 if args.float64 else torch.float32, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    covs.save(args.out)
    rows = [[g[0] if len(g) == 1 else f"{g[0]} (+{len(g) - 1})", str(covs[g[0]].shape[0]),
             str(covs.token_count(g[0])), f"{float(covs[g[0]].diagonal().sum()):.4g}"] for g in covs.groups]
    print(_table(rows, ["input of", "dim", "tokens", "trace"]))
    print(f"\n{covs.summary()} -> {args.out}")
    return 0


def _read_trained_adapter(adapter: Path, meta: dict[str, Any], init: dict) -> tuple[dict, dict]:
    """(name -> trained (A, B), the adapter's other tensors by key) of a PEFT adapter directory."""
    from safetensors.torch import load_file

    from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_key, adapter_keys

    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{str(adapter)!r} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    want = meta["lora_config"]
    for k in ("r", "lora_alpha", "use_rslora"):
        if cfg.get(k) != want.get(k):
            raise ValueError(f"trained adapter {str(adapter)!r} has {k}={cfg.get(k)!r}, the init directory has "
                             f"{want.get(k)!r}: it was not trained from this init")
    sd = load_file(str(adapter / ADAPTER_WEIGHTS))
    current = {}
    for n in meta["targets"]:
        ka, kb = adapter_key(n, "A"), adapter_key(n, "B")
        if ka not in sd or kb not in sd:
            raise ValueError(f"trained adapter {str(adapter)!r} has no LoRA factors for module {n!r} (key {ka!r})")
        if sd[ka].shape != init[n][0].shape or sd[kb].shape != init[n][1].shape:
            raise ValueError(f"trained adapter {str(adapter)!r}: module {n!r} has shapes {tuple(sd[ka].shape)}, "
                             f"{tuple(sd[kb].shape)}; expected {tuple(init[n][0].shape)}, {tuple(init[n][1].shape)}")
        current[n] = (sd[ka], sd[kb])
    lora = adapter_keys(meta["targets"])
    return current, {k: v for k, v in sd.items() if k not in lora}


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint, write_checkpoint

    d = Path(args.dir)
    if not d.is_dir():
        raise UsageError(f"no such init directory: {args.dir!r}")
    adapter = Path(args.adapter) if args.adapter is not None else d / "adapter"
    if not adapter.is_dir():
        raise UsageError(f"no such adapter directory: {str(adapter)!r}")
    out = Path(args.out)
    if out.exists() and out.resolve() in {adapter.resolve(), d.resolve(), (d / "base").resolve()}:
        raise UsageError(f"--out {args.out!r} would overwrite the input; choose a new directory")
    saved = read_checkpoint(d)
    meta, init = saved.meta, saved.init
    current, extras = _read_trained_adapter(adapter, meta, init)
    meta = {k: v for k, v in meta.items() if k not in ("format", "init_checksum")}
    write_checkpoint(out, meta, init, current, resume=True, extras=extras)
    moved = sum(int(not (a.equal(init[n][0]) and b.equal(init[n][1]))) for n, (a, b) in current.items())
    rank = meta["rank"] * (2 if meta["rewrites_base"] else 1)
    print(_kv("svdadapt export", [
        ("method", meta["method"]),
        ("trained adapter", str(adapter)),
        ("layers changed by training", f"{moved} / {len(current)}"),
        ("exported rank", f"{rank}" + (" (= [A; A0], [B, -B0])" if meta["rewrites_base"] else "")),
        ("applies to", "the ORIGINAL model" if meta["rewrites_base"] else "the compressed model (as trained)"),
        ("written", str(out)),
    ]))
    if moved == 0:
        _say("warning: the adapter equals its initialization (no training?): the exported LoRA is zero")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .checkpoint import META_FILE, read_metadata

    d = Path(args.dir)
    if not (d / META_FILE).is_file():
        raise UsageError(f"{args.dir!r} has no {META_FILE} (not an init or save directory)")
    meta = read_metadata(d)
    layers = meta.get("report") or {}
    if not layers:
        raise ValueError(f"{args.dir!r} has an empty report")
    print(f"{meta['method']}, rank {meta['rank']}, alpha {meta['alpha']:g}, {len(layers)} layers")
    print(format_report(meta["method"], layers, per_layer=args.layers))
    return 0


_COMMANDS = {"init": _cmd_init, "calibrate": _cmd_calibrate, "export": _cmd_export, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``svdadapt`` command line; returns the exit status (0 ok, 2 bad command line, 1 failed run)."""
    debug = os.environ.get("SVDADAPT_DEBUG", "") not in ("", "0")
    try:
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        if debug:
            raise
        print(f"svdadapt: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if debug:
            raise
        kind = "" if isinstance(e, (ValueError, TypeError, FileNotFoundError, KeyError)) else f"{type(e).__name__}: "
        print(f"svdadapt: error: {kind}{_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

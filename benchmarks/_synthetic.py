"""Random-weight Llama checkpoints of any size, written tensor by tensor (never the whole model in memory).

For the streaming-init benchmarks: a checkpoint on disk in exactly the layout ``LlamaForCausalLM.save_pretrained``
writes (config.json, ``model.safetensors`` or an index and ``model-0000k-of-0000N.safetensors`` shards, the same
tensor names and shapes, untied ``lm_head``), built through :class:`svdadapt.storage.shards.ShardWriter` with the
layout known up front (each shard written in place), so that peak memory is one tensor whatever the model's size::

    from _synthetic import write_random_llama, llama_for_size, LLAMA_7B
    write_random_llama("/tmp/llama-4gb", **llama_for_size(4))          # about 4 GB in fp32
    write_random_llama("/tmp/llama-7b", **LLAMA_7B, dtype=torch.bfloat16)

Weights are N(0, 0.02) (norm weights ones). Every tensor has its own ``torch.Generator`` seeded from
``(seed, name)``, so a tensor does not depend on the others, on the shard size or on the order of writing, and
:func:`random_tensor` recomputes any of them without reading the checkpoint.

Command line: ``python benchmarks/_synthetic.py OUT_DIR --gb 4 [--dtype bfloat16] [--shard-gb 1] [--resume]``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from pathlib import Path

import torch

from svdadapt.storage.shards import ShardWriter

__all__ = ["write_random_llama", "llama_tensor_specs", "llama_nbytes", "llama_for_size", "random_tensor",
           "LLAMA_7B", "INIT_STD"]

INIT_STD = 0.02

# Llama-2-7B's shape: 6,738,415,616 parameters, 26.95 GB in fp32, 13.5 GB in bf16.
LLAMA_7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, kv_heads=32)


def llama_tensor_specs(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                       kv_heads: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of ``LlamaForCausalLM`` (untied embeddings), in model order."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}), and heads of kv_heads ({kv_heads})")
    kv = kv_heads * (hidden // heads)
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def llama_nbytes(cfg: dict, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of tensor data of the checkpoint that ``write_random_llama(**cfg, dtype=dtype)`` writes."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * sum(math.prod(shape) for _, shape in llama_tensor_specs(**cfg))


def llama_for_size(gb: float) -> dict:
    """Keyword arguments of :func:`write_random_llama` for about ``gb`` GB (10⁹ bytes) in fp32.

    The width grows in three steps and the depth makes up the size: below 1.5 GB hidden 1024 /
    intermediate 2816 (51 MB a layer); up to 8 GB hidden 2048 / intermediate 5632 / 32 heads (206 MB a layer, the
    Linears of ``bench_init``'s random Llama); above, Llama-7B's 4096 / 11008 (810 MB a layer). Vocabulary 32000,
    shrunk when the embeddings would take more than half of a very small budget. At least one layer.
    """
    if not gb > 0:
        raise ValueError(f"gb must be positive, got {gb!r}")
    if gb < 1.5:
        base = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=16)
    elif gb <= 8:
        base = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=32)
    else:
        base = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32)
    target = gb * 1e9
    vocab = 32000
    if 2 * vocab * base["hidden"] * 4 > target / 2:
        vocab = max(256, int(target / 2 / (2 * base["hidden"] * 4)) // 64 * 64)
    fixed = llama_nbytes(dict(base, layers=0, vocab=vocab))
    per_layer = llama_nbytes(dict(base, layers=1, vocab=vocab)) - fixed
    layers = max(1, round((target - fixed) / per_layer))
    return dict(base, layers=layers, vocab=vocab)


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``write_random_llama`` writes under ``name``: ones for norm weights (1-D), else N(0, 0.02) drawn
    in fp32 from a generator seeded by ``(seed, name)``, then cast to ``dtype``."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(INIT_STD)
    return t if dtype == torch.float32 else t.to(dtype)


def write_random_llama(out_dir: str | os.PathLike, *, hidden: int, intermediate: int, layers: int, vocab: int,
                       heads: int, kv_heads: int, dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int = 1 << 30, seed: int = 0, resume: bool = False,
                       progress: bool = False) -> Path:
    """Write a random-weight Llama checkpoint into ``out_dir`` (config.json + safetensors shards) one tensor at a
    time; returns ``out_dir``. Peak memory: one fp32 tensor and its cast (the shards are written in place). ``resume=True`` continues an
    interrupted write (see :class:`svdadapt.storage.shards.ShardWriter`); the same arguments give the same files."""
    from transformers import LlamaConfig

    out = Path(out_dir)
    specs = llama_tensor_specs(hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, heads=heads,
                               kv_heads=kv_heads)
    writer = ShardWriter(out, max_shard_bytes=max_shard_bytes, resume=resume,
                         layout=[(name, dtype, shape) for name, shape in specs])
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch.")).save_pretrained(out)
    for i, (name, shape) in enumerate(specs):
        if name in writer.done:
            continue
        writer.add(name, random_tensor(name, shape, seed=seed, dtype=dtype))
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(specs)} tensors", file=sys.stderr, flush=True)
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="write a random-weight Llama checkpoint tensor by tensor")
    ap.add_argument("out_dir")
    ap.add_argument("--gb", type=float, help="about this many GB in fp32 (llama_for_size)")
    ap.add_argument("--7b", dest="llama7b", action="store_true", help="Llama-7B's shape")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shard-gb", type=float, default=1.0, help="max shard size in GiB (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.llama7b == (args.gb is not None):
        ap.error("pass exactly one of --gb and --7b")
    cfg = LLAMA_7B if args.llama7b else llama_for_size(args.gb)
    dtype = getattr(torch, args.dtype)
    print(f"{cfg} {args.dtype}: {llama_nbytes(cfg, dtype) / 1e9:.2f} GB -> {args.out_dir}", file=sys.stderr)
    write_random_llama(args.out_dir, **cfg, dtype=dtype, max_shard_bytes=int(args.shard_gb * (1 << 30)),
                       seed=args.seed, resume=args.resume, progress=True)


if __name__ == "__main__":
    main()

"""Token batches for calibration: text packed into fixed-length chunks (``text_batches``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["text_batches"]


def text_batches(tokenizer: Any, texts: str | Iterable[str], seq_len: int = 512, batch_size: int = 4, *,
                 max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Packed token batches for calibration: the texts are tokenized (no special tokens), joined with EOS after
    each, and cut into ``seq_len`` chunks, ``batch_size`` chunks per batch, in order (deterministic).

    The last chunk is padded (pad token, else EOS, else 0) with ``attention_mask`` 0 on the padding, and the
    last batch may hold fewer rows; ``max_batches`` stops early (tokenizing only what is needed).

    Returns:
        list of dicts with ``input_ids`` and ``attention_mask``, each (rows, seq_len) int64.
    """
    for arg, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    need = None if max_batches is None else max_batches * batch_size * seq_len
    ids: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    if not ids:
        raise ValueError("text_batches: the texts gave no tokens")
    if need is not None:
        ids = ids[:need]
    n_chunks = -(-len(ids) // seq_len)
    flat = torch.full((n_chunks * seq_len,), pad, dtype=torch.long)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(n_chunks * seq_len, dtype=torch.long)
    mask[: len(ids)] = 1
    flat, mask = flat.view(n_chunks, seq_len), mask.view(n_chunks, seq_len)
    return [{"input_ids": flat[i:i + batch_size].clone(), "attention_mask": mask[i:i + batch_size].clone()}
            for i in range(0, n_chunks, batch_size)]

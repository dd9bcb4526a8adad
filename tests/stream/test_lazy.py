"""svdadapt.stream.lazy: a meta-device skeleton run from a checkpoint, one decoder block in memory at a time."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from svdadapt.stream.lazy import LazyBlocks
from svdadapt.storage.shards import CheckpointReader
from svdadapt.stream.init import _skeleton
from helpers import make_tiny_llama, token_ids


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="svdadapt-lazy-") as d:
        yield Path(d)


def _blocks_in_memory(model) -> int:
    return sum(any(not p.is_meta for p in b.parameters()) for b in model.model.layers)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_equals_the_loaded_model_one_block_at_a_time(tmp, tied):
    model = make_tiny_llama(3, tie_word_embeddings=tied)
    model.save_pretrained(tmp, max_shard_size="100KB")
    skeleton, seen = _skeleton(tmp), []
    for block in skeleton.model.layers:
        block.register_forward_hook(lambda m, a, o: seen.append(_blocks_in_memory(skeleton)))
    ids = token_ids(2, 9, 0)
    with torch.no_grad(), LazyBlocks(skeleton, CheckpointReader(tmp), "model.layers", skeleton.model.layers) as lazy:
        assert skeleton.lm_head.weight.is_meta  # after the stack: loaded on its first call
        got = skeleton(input_ids=ids).logits
        assert (skeleton.lm_head.weight is skeleton.model.embed_tokens.weight) == tied
        assert lazy.loads == len(skeleton.model.layers)
    assert torch.equal(got, model(input_ids=ids).logits)
    assert seen == [1] * len(skeleton.model.layers)
    assert all(p.is_meta for p in skeleton.parameters())  # closed: everything back on the meta device


def test_a_calibration_that_stops_after_the_stack_never_reads_the_head(tmp, monkeypatch):
    import svdadapt

    make_tiny_llama(4).save_pretrained(tmp / "ck")
    read: list[str] = []
    real = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: read.append(name) or real(self, name))
    batches = [token_ids(2, 8, s) for s in range(2)]
    svdadapt.init_checkpoint(tmp / "ck", tmp / "out", method="corda", rank=2, calibration=batches, progress=False)
    calibration = read[: read.index("lm_head.weight")]  # the base writer copies it afterwards
    assert "lm_head.weight" not in calibration and "model.norm.weight" not in calibration
    assert "model.embed_tokens.weight" in calibration


def test_a_missing_tensor_is_named(tmp):
    from safetensors.torch import load_file, save_file

    make_tiny_llama(5).save_pretrained(tmp)
    sd = load_file(str(tmp / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    skeleton = _skeleton(tmp)
    with LazyBlocks(skeleton, CheckpointReader(tmp), "model.layers", skeleton.model.layers) as lazy:
        lazy.use(0)
        with pytest.raises(ValueError, match=r"has no tensor 'model.layers.1.mlp.up_proj.weight'"):
            lazy.use(1)

"""EoRA streamed from a compressed-tensors checkpoint (stream/quantized.py).

A tiny Llama, W4A16 pack-quantized (groups of 32) by compressed-tensors' own ModelCompressor and saved as transformers
saves it: the streamed adapter equals wrap on the loaded quantized model bit for bit (both run the same float
computation on the same decompressed W_c), the W_c read equals what transformers' loaded model holds after the
library's decompression, the base is the input checkpoint byte for byte, PEFT reloads it with the same logits, and the
refusals are one line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import svdadapt
from svdadapt.storage.shards import CheckpointReader
from svdadapt.stream.quantized import open_reader

from helpers import make_tiny_llama, save_compressed_llama, token_ids

pytest.importorskip("compressed_tensors")
RANK = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity between runs holds at equal thread counts."""


def _loaded(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d))


def _decompressed(model):
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    ModelCompressor.from_pretrained_model(model).decompress_model(model)
    return model


def _calibration() -> list[dict]:
    return [{"input_ids": token_ids(2, 16, s), "attention_mask": torch.ones(2, 16, dtype=torch.long)} for s in range(3)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    make_tiny_llama().save_pretrained(root / "ref")
    return save_compressed_llama(root / "q", make_tiny_llama()), root / "ref"


def _factors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def test_the_weight_read_is_the_loaded_models_decompressed_weight(dirs):
    q, _ = dirs
    model = _decompressed(_loaded(q))
    reader = open_reader(CheckpointReader(q), make_tiny_llama())  # the float model of its config
    names = list(svdadapt.resolve_targets(make_tiny_llama()))
    assert sorted(reader.modules) == sorted(names)
    for n in names:
        W, want = reader.get(n + ".weight"), model.get_submodule(n).weight
        assert W.dtype == want.dtype and torch.equal(W, want), n  # the same compressor on the same tensors


@pytest.mark.parametrize("calibrate_on, sequential", [("reference", None), ("compressed", None),
                                                      ("reference", False)])
def test_streamed_eora_equals_wrap_on_the_loaded_quantized_model(dirs, tmp_path, calibrate_on, sequential):
    from peft import PeftModel

    from svdadapt.blockwise import BlockwiseOptions

    q, ref = dirs
    blockwise = None if sequential is None else BlockwiseOptions(sequential=sequential)
    out = svdadapt.init_checkpoint(q, tmp_path / "s", method="eora", rank=RANK, reference=ref, calibration=_calibration(),
                                   calibrate_on=calibrate_on, blockwise=blockwise, progress=False)
    pm = svdadapt.wrap(_loaded(q), "eora", RANK, reference=make_tiny_llama(), calibration=_calibration(),
                       calibrate_on=calibrate_on, blockwise=blockwise, progress=False)
    factors = _factors(out)
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n
    assert json.loads((out / "svdadapt.json").read_text())["base_checksums"] == pm.svdadapt.base_checksums
    # the base is the quantized checkpoint itself, byte for byte, with its quantization_config
    assert (out / "base" / "model.safetensors").read_bytes() == (q / "model.safetensors").read_bytes()
    assert (out / "base" / "config.json").read_text() == (q / "config.json").read_text()
    x = token_ids(2, 12, 9)
    with torch.no_grad():
        want = pm(x).logits
        peft = PeftModel.from_pretrained(_decompressed(_loaded(out / "base")), str(out / "adapter"))
        assert torch.equal(peft(x).logits, want)  # the same float computation on the same W_c and factors
        assert torch.equal(svdadapt.load(_loaded(out / "base"), out)(x).logits, want)


def test_an_interrupted_run_resumes_to_the_same_files(dirs, tmp_path, monkeypatch):
    import svdadapt.stream.calibrated as stream_journal  # plans each block's targets

    q, ref = dirs
    kw = dict(method="eora", rank=RANK, reference=ref, calibration=_calibration(), progress=False)
    svdadapt.init_checkpoint(q, tmp_path / "whole", **kw)
    calls, real = [], stream_journal.plan_layer

    def plan(job, layer, *a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(layer.name)
        return real(job, layer, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(stream_journal, "plan_layer", plan)
        with pytest.raises(KeyboardInterrupt):
            svdadapt.init_checkpoint(q, tmp_path / "s", **kw)
    svdadapt.init_checkpoint(q, tmp_path / "s", **kw)
    for f in ("adapter/adapter_model.safetensors", "svdadapt_state.safetensors", "base/model.safetensors"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


def test_refusals(dirs, tmp_path):
    q, ref = dirs
    with pytest.raises(ValueError, match=rf"^pissa rewrites the base weights, but module 'model.layers.0.self_attn."
                                         rf"q_proj' is stored quantized in checkpoint '{q}' \(compressed-tensors "
                                         r"'pack-quantized'\), which init_checkpoint keeps as the base: run pissa on "
                                         r"the full-precision checkpoint, or method='eora' with reference= on this one$"):
        svdadapt.init_checkpoint(q, tmp_path / "o", method="pissa", rank=RANK)
    with pytest.raises(ValueError, match=rf"^the reference checkpoint '{q}' is quantized \(quant_method "
                                         r"'compressed-tensors'\): EoRA compensates"):
        svdadapt.init_checkpoint(q, tmp_path / "o", method="eora", rank=RANK, reference=q, calibration=_calibration())
    gptq = tmp_path / "gptq"
    make_tiny_llama().save_pretrained(gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^checkpoint '{gptq}' is quantized with quant_method 'gptq' \(config.json "
                                         r"quantization_config\), which init_checkpoint cannot read: it reads "
                                         r"floating-point checkpoints and the compressed-tensors format; load the "
                                         r"model with transformers and use svdadapt.wrap$"):
        svdadapt.init_checkpoint(gptq, tmp_path / "o", method="pissa", rank=RANK)
    assert not (tmp_path / "o").exists()

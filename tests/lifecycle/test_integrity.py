"""The manifest of every directory svdadapt writes (svdadapt.json's ``files``): what it lists, and that load, the
Trainer's resume, ``svdadapt export`` and ``svdadapt verify`` name the file that differs from it, while an init
directory's adapter/ overwritten by training is told apart from corruption."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.lifecycle.checkpoint import META_FILE, STATE_FILE, read_checkpoint
from svdadapt.cli import main
from svdadapt.storage.manifest import file_entry

from helpers import make_tiny_llama, save_tiny_model, token_ids, train

SEED, VOCAB, RANK = 3, 300, 4
TARGETS = ["q_proj", "v_proj"]
X = token_ids(2, 16, seed=1, vocab=VOCAB)


def _wrapped(steps: int):
    pm = svdadapt.wrap(make_tiny_llama(SEED, vocab_size=VOCAB), "pissa", rank=RANK, target_modules=TARGETS,
                       progress=False)
    return train(pm, X, steps=steps) if steps else pm


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> tuple[Path, Path]:
    """Two save directories of the same init, trained 3 and 5 steps."""
    root = tmp_path_factory.mktemp("saves")
    svdadapt.save(_wrapped(3), root / "a")
    svdadapt.save(_wrapped(5), root / "b")
    return root / "a", root / "b"


@pytest.fixture
def save_dir(saves, tmp_path) -> Path:
    return Path(shutil.copytree(saves[0], tmp_path / "save"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), SEED, VOCAB)


@pytest.fixture(scope="module", params=["streamed", "in-memory"])
def inits(request, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param) / "init"
    extra = ["--in-memory"] if request.param == "in-memory" else []
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", str(RANK), "--target-modules", *TARGETS,
                 "--out", str(out), "--no-progress", *extra]) == 0
    return out


@pytest.fixture
def init_dir(inits, tmp_path) -> Path:
    # copies keep the adapter's base_model_name_or_path, which names the original's base/: fine for these checks
    return Path(shutil.copytree(inits, tmp_path / "init"))


def _manifest(d: Path) -> dict:
    return json.loads((d / META_FILE).read_text())["files"]


def _flip_in_tensor(path: Path, key: str) -> None:
    """Flip the lowest bit of the first byte of tensor ``key``'s data in a safetensors file."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = 8 + n + json.loads(raw[8:8 + n])[key]["data_offsets"][0]
    raw[start] ^= 1
    path.write_bytes(bytes(raw))


def _msg(path: Path, what: str) -> str:
    return re.escape(f"{str(path)!r} does not match the manifest in svdadapt.json ({what}: ")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ------------------------------------------------------------------------------------------------ what is listed


def test_save_manifest_lists_every_other_file(saves):
    d = saves[0]
    files = _manifest(d)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors", STATE_FILE]
    assert all(files[n] == file_entry(d / n) for n in files)
    assert svdadapt.verify(d).checked == sorted(files)
    assert "trained_dir" not in json.loads((d / META_FILE).read_text())


def test_init_manifest_lists_every_file_once(inits):
    files = _manifest(inits)
    on_disk = sorted(p.relative_to(inits).as_posix() for p in inits.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in on_disk if f != META_FILE]  # no journal or sidecar left behind
    assert {"base/config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", STATE_FILE,
            "report.json"} <= set(files)
    assert any(f.startswith("base/model") and f.endswith(".safetensors") for f in files)
    assert all(files[n] == file_entry(inits / n) for n in files)
    assert json.loads((inits / META_FILE).read_text())["trained_dir"] == "adapter"


def test_round_trip_still_bit_identical(saves, tmp_path):
    """save -> load -> save: the same files, byte for byte, the same manifest."""
    d = saves[0]
    again = svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), d, progress=False)
    svdadapt.save(again, tmp_path / "again")
    for name in [*_manifest(d), META_FILE]:
        assert (tmp_path / "again" / name).read_bytes() == (d / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ a save directory


def test_flipped_bit_in_a_trained_factor_is_an_error(save_dir, capsys):
    _flip_in_tensor(save_dir / STATE_FILE, "model.layers.1.self_attn.v_proj.A")
    with pytest.raises(ValueError, match=_msg(save_dir / STATE_FILE, "sha256") + r"sha256 \w{12}…, recorded "):
        svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), save_dir, progress=False)
    with pytest.raises(ValueError, match=_msg(save_dir / STATE_FILE, "sha256")):
        svdadapt.verify(save_dir)
    code, _, err = _run(["verify", str(save_dir)], capsys)
    assert code == 1 and err.startswith(f"svdadapt: error: {str(save_dir / STATE_FILE)!r} does not match")
    assert err.count("\n") == 1


def test_resume_guard_refuses_a_changed_state(save_dir):
    """The Trainer resumes through load_adapter: the same check."""
    _flip_in_tensor(save_dir / STATE_FILE, "model.layers.0.self_attn.q_proj.B")
    pm = _wrapped(0)
    with pytest.raises(ValueError, match=_msg(save_dir / STATE_FILE, "sha256")):
        pm.load_adapter(str(save_dir), "default")


def test_state_symlinked_to_another_runs(saves, save_dir):
    (save_dir / STATE_FILE).unlink()
    (save_dir / STATE_FILE).symlink_to(saves[1] / STATE_FILE)
    want = _msg(save_dir / STATE_FILE, "sha256") + r".*\(a symbolic link to " + re.escape(repr(str(saves[1] / STATE_FILE)))
    with pytest.raises(ValueError, match=want):
        svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), save_dir, progress=False)


def test_truncated_adapter_config(save_dir, capsys):
    cfg = save_dir / "adapter_config.json"
    cfg.write_bytes(cfg.read_bytes()[:100])
    want = _msg(cfg, "size") + re.escape(f"100 bytes, recorded {_manifest(save_dir)['adapter_config.json']['size']})")
    with pytest.raises(ValueError, match=want):
        svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), save_dir, progress=False)
    code, _, err = _run(["verify", str(save_dir)], capsys)
    assert code == 1 and "adapter_config.json' does not match the manifest in svdadapt.json (size: 100 bytes" in err


def test_missing_adapter_weights(save_dir):
    (save_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=_msg(save_dir / "adapter_model.safetensors", "missing") + "missing\\)"):
        svdadapt.verify(save_dir)


def test_changed_record_field_is_found(save_dir):
    """svdadapt.json is not in its own manifest: its fields are bound to the state file by a digest there."""
    meta = json.loads((save_dir / META_FILE).read_text())
    meta["options"]["seed"] = 1
    (save_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{str(save_dir / META_FILE)!r} was changed after it was "
                                                   f"written: its fields do not match the record digest in {STATE_FILE}")):
        svdadapt.verify(save_dir)


def test_verify_cli_ok_and_usage(saves, tmp_path, capsys):
    code, out, _ = _run(["verify", str(saves[0])], capsys)
    assert (code, out) == (0, f"svdadapt verify: {saves[0]}: 3 files match svdadapt.json\n")
    code, _, err = _run(["verify", str(tmp_path)], capsys)
    assert code == 2 and f"{str(tmp_path)!r} has no svdadapt.json (not an init or save directory)" in err


def test_directory_without_manifest_loads_with_a_warning(save_dir, capsys):
    """Directories written before the manifest: loaded, saying that only the initial factors are verified."""
    meta = json.loads((save_dir / META_FILE).read_text())
    del meta["files"]
    (save_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="has no file manifest in svdadapt.json \\(written by an older svdadapt\\): "
                                         "only its initial factors are verified"):
        svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), save_dir, progress=False)
    with pytest.raises(ValueError, match="has no file manifest in svdadapt.json .*: its files cannot be verified"):
        svdadapt.verify(save_dir)
    code, _, err = _run(["verify", str(save_dir)], capsys)
    assert code == 1 and "cannot be verified" in err


# ------------------------------------------------------------------------------------------------ an init directory


def _train_in_place(init: Path) -> None:
    """What a trainer without svdadapt does: plain transformers + PEFT, saved over DIR/adapter."""
    base = AutoModelForCausalLM.from_pretrained(init / "base")
    pm = PeftModel.from_pretrained(base, init / "adapter", is_trainable=True)
    train(pm, X, steps=3).save_pretrained(init / "adapter")


def test_trained_adapter_in_place_is_said_not_refused(init_dir, tmp_path, capsys):
    _train_in_place(init_dir)
    v = svdadapt.verify(init_dir)
    assert "adapter/adapter_model.safetensors" in v.trained and "base/config.json" in v.checked
    code, out, err = _run(["verify", str(init_dir)], capsys)
    assert code == 0 and f"{len(v.trained)} changed by training (a trained adapter of this init)" in out
    assert f"{init_dir / 'adapter'}: changed since init: a trained adapter of this init" in err
    code, _, err = _run(["export", str(init_dir), "--out", str(tmp_path / "lora")], capsys)
    assert code == 0 and "changed since init: a trained adapter of this init" in err
    with pytest.warns(UserWarning, match="changed since init \\(a trained adapter of this init\\)"):
        svdadapt.load(make_tiny_llama(SEED, vocab_size=VOCAB), init_dir, progress=False)


def test_foreign_adapter_in_place_is_refused(init_dir, tmp_path, capsys):
    cfg = init_dir / "adapter" / "adapter_config.json"
    c = json.loads(cfg.read_text())
    c["r"] = 2 * RANK
    cfg.write_text(json.dumps(c))
    want = (f"{str(init_dir / 'adapter')!r} changed since init (adapter/adapter_config.json) and is not a trained "
            f"adapter of this init: trained adapter {str(init_dir / 'adapter')!r} has r={2 * RANK}, the init "
            f"directory has {RANK}: it was not trained from this init")
    with pytest.raises(ValueError, match=re.escape(want)):
        svdadapt.verify(init_dir)
    code, _, err = _run(["export", str(init_dir), "--out", str(tmp_path / "lora")], capsys)
    assert code == 1 and want in err


def test_truncated_adapter_weights_in_place_are_refused(init_dir):
    w = init_dir / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"{str(init_dir / 'adapter')!r} changed since init "
                                                   "(adapter/adapter_model.safetensors) and is not a trained adapter "
                                                   f"of this init: {str(w)!r} is not a readable safetensors file")):
        svdadapt.verify(init_dir)


def test_changed_base_shard(init_dir, tmp_path, capsys):
    """base/ must match exactly: verify and export read it; load does not (it takes the original model)."""
    shard = next(f for f in sorted(_manifest(init_dir)) if f.startswith("base/model") and f.endswith(".safetensors"))
    raw = bytearray((init_dir / shard).read_bytes())
    raw[-1] ^= 1
    (init_dir / shard).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=_msg(init_dir / shard, "sha256")):
        svdadapt.verify(init_dir)
    code, _, err = _run(["export", str(init_dir), "--out", str(tmp_path / "lora")], capsys)
    assert code == 1 and f"{str(init_dir / shard)!r} does not match the manifest" in err
    saved = read_checkpoint(init_dir)  # what load reads
    assert shard in saved.verified.skipped


def test_changed_state_in_init_dir(init_dir, capsys):
    _flip_in_tensor(init_dir / STATE_FILE, "model.layers.0.self_attn.q_proj.A")
    code, _, err = _run(["export", str(init_dir), "--out", str(init_dir.parent / "lora")], capsys)
    assert code == 1 and f"{str(init_dir / STATE_FILE)!r} does not match the manifest in svdadapt.json (sha256:" in err

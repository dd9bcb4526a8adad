"""Resuming ``svdadapt.init_checkpoint`` from damaged journals, changed inputs, and two runs on one directory.

A journal entry flipped or truncated is decomposed again (the result equals an uninterrupted run, bit for bit); an
input tensor changed since the interrupted run is an error naming it; an unreadable job or progress journal is one
line naming the file and the way out; a second run into a directory in use is refused while the first holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import svdadapt
import svdadapt.lifecycle.initdir as initdir
import svdadapt.stream.init as stream
import svdadapt.stream.inputs as stream_inputs
import svdadapt.stream.journal as stream_journal
from svdadapt.storage.shards import JOURNAL_FILE, CheckpointReader, written_tensors

from helpers import make_tiny_llama, output_bytes

FILES = ["adapter/adapter_model.safetensors", "svdadapt_state.safetensors", "svdadapt.json", "report.json"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity between runs holds at equal thread counts."""


class _Crash(RuntimeError):
    pass


def _checkpoint(d: Path, seed: int) -> Path:
    make_tiny_llama(seed).save_pretrained(d, max_shard_size="100KB")
    return d


def _run(ck: Path, out_dir: Path, **kw) -> Path:
    return svdadapt.init_checkpoint(ck, out_dir, method="pissa", rank=4, max_shard_bytes=40_000, progress=False, **kw)


def _interrupt(monkeypatch, ck: Path, out_dir: Path, after: int) -> list[str]:
    """A run that raises before decomposing its ``after``-th target (0-based): a deterministic kill."""
    calls: list[str] = []
    real = stream_journal.plan_layer

    def plan(job, layer, *a, **kw):
        if len(calls) == after:
            raise _Crash(layer.name)
        calls.append(layer.name)
        return real(job, layer, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(stream_journal, "plan_layer", plan)
        with pytest.raises(_Crash):
            _run(ck, out_dir)
    return calls


def _counting(monkeypatch) -> list[str]:
    """Record each target decomposed from now on."""
    calls: list[str] = []
    real = stream_journal.plan_layer

    def plan(job, layer, *a, **kw):
        calls.append(layer.name)
        return real(job, layer, *a, **kw)

    monkeypatch.setattr(stream_journal, "plan_layer", plan)
    return calls


def _file_bytes(d: Path) -> dict[str, bytes]:
    """Every output file's bytes but adapter_config.json (its base path names the directory; svdadapt.json's manifest
    entry of it is left out too)."""
    return {str(f.relative_to(d)): output_bytes(f) for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "adapter_config.json"}


def _layers(out_dir: Path) -> list[Path]:
    return sorted((out_dir / stream.STREAM_DIR / "layers").glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- damaged journal


def test_a_flipped_byte_in_every_journal_entry_is_decomposed_again(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", 1)
    _run(ck, tmp / "whole")
    done = _interrupt(monkeypatch, ck, tmp / "s", after=9)
    entries = _layers(tmp / "s")
    assert len(entries) == 9 and sorted(f.stem for f in entries) == sorted(done)
    for k, f in enumerate(entries):  # one byte per file: in the tensor data, or (every third) in the header
        data = bytearray(f.read_bytes())
        at = len(data) - 1 - k if k % 3 else 40
        data[at] ^= 0x01
        f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"damaged resume journal entry .*layers/.*\.safetensors .*is decomposed "
                                         r"again") as caught:
        _run(ck, tmp / "s")
    named = {w.message.args[0].split("module ")[1].split(" is")[0].strip("'") for w in caught
             if "damaged" in str(w.message)}
    assert named == set(done)  # every damaged entry named, and each decomposed again
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")  # bit for bit an uninterrupted run's files


def test_journal_entries_with_sha256_checksums_resume_as_an_uninterrupted_run(tmp, monkeypatch):
    """An interrupted run of an earlier version journaled each weight's sha256: the entries are taken (the weight
    checked against it), the output equals an uninterrupted run's but for the record of those layers' checksums,
    which keeps their sha256 (still verified, as sha256, by svdadapt.load)."""
    import torch
    from safetensors import safe_open

    from svdadapt.core.record import weight_checksum

    ck = _checkpoint(tmp / "ck", 1)
    _run(ck, tmp / "whole")
    with monkeypatch.context() as m:  # the journal as an earlier version wrote it
        m.setattr(stream_journal, "scan_weight", lambda w, algorithm: (weight_checksum(w), bool(w.isfinite().all())))
        _interrupt(monkeypatch, ck, tmp / "s", after=9)
    entries = _layers(tmp / "s")
    assert len(entries) == 9
    for f in entries:
        with safe_open(str(f), framework="pt") as g:
            assert len(g.metadata()["base_checksum"]) == 64  # a bare sha256
    calls = _counting(monkeypatch)
    _run(ck, tmp / "s")
    assert len(calls) == 14 - 9  # the journaled layers taken
    got, want = _file_bytes(tmp / "s"), _file_bytes(tmp / "whole")
    record = ("svdadapt.json", "svdadapt_state.safetensors")  # the state file carries the record's sha256
    assert {k: v for k, v in got.items() if k not in record} == {k: v for k, v in want.items() if k not in record}
    sums = json.loads((tmp / "s" / "svdadapt.json").read_text())["base_checksums"]
    assert sorted(n for n, v in sums.items() if not v.startswith("crc32:")) == sorted(f.stem for f in entries)
    re = svdadapt.load(make_tiny_llama(1), tmp / "s", progress=False)  # every checksum verified, in its algorithm
    ref = svdadapt.load(make_tiny_llama(1), tmp / "whole", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(re.state_dict().values(), ref.state_dict().values()))


def test_a_truncated_journal_entry_is_decomposed_again(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", 2)
    _run(ck, tmp / "whole")
    _interrupt(monkeypatch, ck, tmp / "s", after=4)
    f = _layers(tmp / "s")[0]
    f.write_bytes(f.read_bytes()[:50])
    with pytest.warns(UserWarning, match=rf"damaged resume journal entry {f} \(not a readable safetensors file"):
        _run(ck, tmp / "s")
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")


def test_a_damaged_entry_after_the_base_is_written_is_made_again(tmp, monkeypatch):
    """Killed after the last shard: a damaged entry of a layer whose base is on disk is made again from W."""
    ck = _checkpoint(tmp / "ck", 3)
    _run(ck, tmp / "whole")
    with monkeypatch.context() as m:
        m.setattr(initdir, "write_checkpoint", lambda *a, **kw: (_ for _ in ()).throw(_Crash("records")))
        with pytest.raises(_Crash):
            _run(ck, tmp / "s")
    f = _layers(tmp / "s")[5]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x80
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"module '{f.stem}' is decomposed again"):
        _run(ck, tmp / "s")
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")


def test_unreadable_job_and_progress_journals_are_named_with_the_way_out(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", 4)
    _run(ck, tmp / "whole")
    _interrupt(monkeypatch, ck, tmp / "s", after=9)
    progress = tmp / "s" / "base" / JOURNAL_FILE
    progress.write_text(progress.read_text()[:30])
    with pytest.raises(ValueError, match=rf"^{progress}: unreadable progress journal of the base \(truncated or "
                                         rf"corrupt\); delete {tmp / 's' / 'base'} to write the base again"):
        _run(ck, tmp / "s")
    shutil.rmtree(tmp / "s" / "base")  # the way out the message gives: the journaled layers are kept
    calls = _counting(monkeypatch)
    _run(ck, tmp / "s")
    assert len(calls) == 14 - 9  # only the layers not journaled
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")


def test_unreadable_job_journal(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", 5)
    _interrupt(monkeypatch, ck, tmp / "s", after=3)
    job = tmp / "s" / stream.STREAM_DIR / "job.json"
    job.write_text(job.read_text()[:40])
    with pytest.raises(ValueError, match=rf"^{job}: unreadable resume journal \(truncated or corrupt: .*\); the "
                                         rf"interrupted run cannot be continued: delete {tmp / 's'} and start again$"):
        _run(ck, tmp / "s")


# ------------------------------------------------------------------------------------------- changed inputs


def _rewrite(file: Path, key: str, change) -> None:
    """``file`` (a checkpoint shard) written again with tensor ``key`` replaced by ``change(tensor)``."""
    tensors = load_file(str(file))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("which", ["copied", "target"])
def test_a_changed_input_whose_base_is_written_is_named(tmp, monkeypatch, which):
    ck = _checkpoint(tmp / "ck", 6)
    done = _interrupt(monkeypatch, ck, tmp / "s", after=9)
    written = written_tensors(tmp / "s" / "base")
    key = next(k for k in written if (k[: -len(".weight")] in done) == (which == "target"))
    file = CheckpointReader(ck).file_of(key)
    _rewrite(file, key, lambda t: t + 1)
    what = f"the weight of '{key[:-len('.weight')]}' \\('{key}' in {file}\\)" if which == "target" else \
        f"tensor '{key}' in {file}"
    with pytest.raises(ValueError, match=rf"^{what} changed since the interrupted run in '{tmp / 's'}': restore it, "
                                         rf"or delete '{tmp / 's'}' and start again$"):
        _run(ck, tmp / "s")


def test_an_input_file_rewritten_unchanged_resumes(tmp, monkeypatch):
    """New mtime and inode, same tensors: checked once (read again and compared), then recorded anew."""
    ck = _checkpoint(tmp / "ck", 7)
    _run(ck, tmp / "whole")
    _interrupt(monkeypatch, ck, tmp / "s", after=9)
    key = next(iter(written_tensors(tmp / "s" / "base")))
    file = CheckpointReader(ck).file_of(key)
    _rewrite(file, key, lambda t: t.clone())
    job = tmp / "s" / stream.STREAM_DIR / "job.json"
    assert json.loads(job.read_text())["inputs"]["model"][str(file)] != list(_stat(file))
    with monkeypatch.context() as m:  # a second interruption, after the check: the stats were recorded anew
        m.setattr(initdir, "write_checkpoint", lambda *a, **kw: (_ for _ in ()).throw(_Crash("records")))
        with pytest.raises(_Crash):
            _run(ck, tmp / "s")
    assert json.loads(job.read_text())["inputs"]["model"][str(file)] == list(_stat(file))
    with monkeypatch.context() as m:  # unchanged stats: no tensor is read to check them
        m.setattr(stream_inputs, "_checker", lambda *a, **kw: pytest.fail("an unchanged input was read"))
        _run(ck, tmp / "s")
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")


def _stat(f: Path) -> tuple[int, ...]:
    s = os.stat(f)
    return s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino


# ------------------------------------------------------------------------------------------- one run at a time

_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from svdadapt.stream.journal import locked
    with locked(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_run_into_a_directory_in_use_is_refused(tmp):
    ck = _checkpoint(tmp / "ck", 8)
    env = dict(os.environ, PYTHONPATH=str(Path(svdadapt.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp / "s")], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"^output directory '{tmp / 's'}' is in use by another "
                                               r"init_checkpoint run \(it holds the directory's lock\): wait for "
                                               r"that run to end, or pass another out_dir$"):
            _run(ck, tmp / "s")
        assert list((tmp / "s").iterdir()) == []  # nothing written by the refused run
    finally:
        holder.kill()  # the lock goes with the process
        holder.wait()
    _run(ck, tmp / "s")
    assert (tmp / "s" / "svdadapt.json").is_file()


def test_a_truncated_shard_of_a_finished_base_is_written_again(tmp, monkeypatch):
    """Killed after the base was finished (its progress journal gone): a shard cut short is not a finished base."""
    ck = _checkpoint(tmp / "ck", 9)
    _run(ck, tmp / "whole")
    with monkeypatch.context() as m:
        m.setattr(stream.Journal, "mark_base_complete", lambda self: (_ for _ in ()).throw(_Crash("base")))
        with pytest.raises(_Crash):
            _run(ck, tmp / "s")
    shard = sorted((tmp / "s" / "base").glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    calls = _counting(monkeypatch)
    _run(ck, tmp / "s")
    assert calls == []  # every layer's factors come from the journal
    assert _file_bytes(tmp / "s") == _file_bytes(tmp / "whole")

"""svdadapt.json's fields checked on read (``checkpoint.read_metadata``): types, ranges and agreement between the
record's fields, one line naming the field; ``svdadapt report`` gives the same line (exit 1)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import svdadapt
from svdadapt.lifecycle.checkpoint import META_FILE, read_metadata
from svdadapt.cli import main

from helpers import make_tiny_llama

RANK = 4
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    pm = svdadapt.wrap(make_tiny_llama(2), "pissa", rank=RANK, target_modules=["q_proj", "v_proj"], progress=False)
    return svdadapt.save(pm, tmp_path_factory.mktemp("saved") / "d")


def _set(path: list[Any], value: Any) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        obj = meta
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


def _both(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        for e in edits:
            e(meta)
    return edit


def _drop(key: str, name: str) -> Callable[[dict], None]:
    return lambda meta: meta[key].pop(name)


CASES = {
    "rank 2**24": (_both(_set(["rank"], 2 ** 24), _set(["lora_config", "r"], 2 ** 24)),
                   f"field 'rank' = 16777216 exceeds min(out, in) = 64 of target '{Q0}' (shape (64, 64))"),
    "a rank_pattern rank above the shape": (
        _set(["lora_config", "rank_pattern"], {"q_proj": 65}),
        f"field 'lora_config.rank_pattern'['q_proj'] = 65 exceeds min(out, in) = 64 of target '{Q0}' (shape (64, 64))"),
    "a rank_pattern rank a float": (_set(["lora_config", "rank_pattern"], {"q_proj": 2.5}),
                                    "field 'lora_config': rank_pattern['q_proj'] must be an integer >= 1, got 2.5"),
    "an alpha_pattern a list": (_set(["lora_config", "alpha_pattern"], [1]),
                                "field 'lora_config': alpha_pattern must be a mapping of module-name pattern to alpha, "
                                "got list"),
    "rank a string": (_set(["rank"], "4"), "field 'rank' must be a positive integer, got '4'"),
    "rank true": (_set(["rank"], True), "field 'rank' must be a positive integer, got True"),
    "lora_alpha doubled in lora_config only": (_set(["lora_config", "lora_alpha"], 2 * RANK),
                                               f"field 'lora_config' has lora_alpha={2 * RANK}, the record has {RANK}"),
    "r of lora_config only": (_set(["lora_config", "r"], 8), f"field 'lora_config' has r=8, the record has {RANK}"),
    "use_rslora of lora_config only": (_set(["lora_config", "use_rslora"], True),
                                       "field 'lora_config' has use_rslora=True, the record has False"),
    "lora_config targets other modules": (
        _set(["lora_config", "target_modules"], ["q_proj"]),
        "field 'lora_config' has target_modules=['q_proj'], which does not cover target "
        "'model.layers.0.self_attn.v_proj' of the record"),
    "targets a string": (_set(["targets"], Q0),
                         f"field 'targets' must be a non-empty list of module names (strings), got '{Q0}'"),
    "targets ints": (_set(["targets"], [1, 2]),
                     "field 'targets' must be a non-empty list of module names (strings), got [1, 2]"),
    "a checksum entry missing": (_drop("base_checksums", Q0),
                                 f"field 'base_checksums' has no checksum for target '{Q0}'"),
    "a residual checksum missing": (_drop("residual_checksums", Q0),
                                    f"field 'residual_checksums' has no checksum for target '{Q0}'"),
    "alpha a string": (_set(["alpha"], "4"), "field 'alpha' must be a finite positive number, got '4'"),
    "alpha infinite": (_set(["alpha"], float("inf")), "field 'alpha' must be a finite positive number, got inf"),
    "alpha zero": (_set(["alpha"], 0), "field 'alpha' must be a finite positive number, got 0"),
    "lora_config a list": (_set(["lora_config"], [1, 2]),
                           "field 'lora_config' must be a mapping (a PEFT LoraConfig as a dict), got [1, 2]"),
    "report an int": (_set(["report"], 3), "field 'report' must be a mapping of module name to a mapping of numbers, "
                                           "got 3"),
    "report of ints": (_set(["report", Q0], 1), "field 'report' must be a mapping of module name to a mapping of "
                                                "numbers, got a dict"),
    "files a list": (_set(["files"], []), "'files' must be a mapping of file names to size and sha256, got list"),
    "files outside the directory": (_set(["files", "../x"], {"size": 1, "sha256": "0" * 64}),
                                    "'files' entry '../x' is not a path inside the directory"),
}


def _crafted(saved: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    d = Path(shutil.copytree(saved, tmp_path / "crafted"))
    meta = json.loads((d / META_FILE).read_text())
    edit(meta)
    (d / META_FILE).write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_record_is_refused_naming_the_field(saved, tmp_path, case):
    edit, message = CASES[case]
    d = _crafted(saved, tmp_path, edit)
    want = re.escape(f"{str(d / META_FILE)!r}: {message}")
    with pytest.raises(ValueError, match=f"^{want}$"):
        read_metadata(d)
    with pytest.raises(ValueError, match=f"^{want}$"):  # load reads the record first
        svdadapt.load(make_tiny_llama(2), d, progress=False)


@pytest.mark.parametrize("case", ["targets ints", "report of ints", "alpha a string", "rank 2**24"])
def test_report_on_a_crafted_record(saved, tmp_path, case, capsys):
    edit, message = CASES[case]
    d = _crafted(saved, tmp_path, edit)
    assert main(["report", str(d)]) == 1
    assert capsys.readouterr().err == f"svdadapt: error: {str(d / META_FILE)!r}: {message}\n"


def test_written_records_pass(saved):
    meta = read_metadata(saved)
    assert (meta["rank"], meta["lora_config"]["r"], meta["alpha"]) == (RANK, RANK, RANK)

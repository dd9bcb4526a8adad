"""``svdadapt init --allocate`` (and --budget, --min-rank, --max-rank, --objective), ``svdadapt report`` with the
ranks table and ``--plot``: the directory carries the ranks wrap(..., allocate=...) chose on the same model."""

from __future__ import annotations

import json

import pytest

import svdadapt
from svdadapt.cli import main
from svdadapt.loading import load_model

from cli_model import RANK

pytestmark = pytest.mark.usefixtures("one_thread")


def test_init_allocate_writes_the_wrap_ranks_and_report_prints_them(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "init"
    argv = ["init", str(tiny_dir), "--method", "pissa", "--rank", str(RANK), "--allocate", "--budget", "20000",
            "--max-rank", "12", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    pm = svdadapt.wrap(load_model(str(tiny_dir)), "pissa", RANK, progress=False,
                       allocate=svdadapt.AllocateOptions(budget=20000, max_rank=12))
    meta = json.loads((out / "svdadapt.json").read_text())
    assert meta["lora_config"]["rank_pattern"] == pm.svdadapt.rank_pattern
    assert meta["allocation"] == pm.svdadapt.allocation and meta["allocation"]["cost"] <= 20000
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == pm.svdadapt.allocation
    assert {n: r["rank"] for n, r in report["layers"].items()} == pm.svdadapt.rank_pattern
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["rank_pattern"] == pm.svdadapt.rank_pattern  # plain PEFT builds each layer at its rank
    capsys.readouterr()
    png = tmp_path / "plots" / "ranks.png"
    assert main(["report", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    k = pm.svdadapt.rank_pattern["model.layers.0.self_attn.k_proj"]
    assert "depth  q_proj  k_proj" in printed and "rank allocation" in printed
    assert f"budget / cost  20,000 / {pm.svdadapt.allocation['cost']:,} parameters" in printed
    row = next(line for line in printed.splitlines() if line.strip().startswith("0 "))
    assert row.split()[2] == str(k)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("flags, message", [
    (["--budget", "100"], "--budget applies with --allocate only"),
    (["--objective", "energy_raw"], "--objective applies with --allocate only"),
    (["--allocate", "--rank-pattern", "q_proj=2"], "--allocate writes every layer's rank as the rank pattern; drop "
                                                  "--rank-pattern"),
])
def test_allocate_usage_errors(tiny_dir, tmp_path, capsys, flags, message) -> None:
    argv = ["init", str(tiny_dir), "--method", "pissa", "--rank", str(RANK), *flags, "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"svdadapt: error: {message}"

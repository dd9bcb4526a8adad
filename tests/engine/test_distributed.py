"""Several processes through torch.distributed (gloo on CPU): wrap() splits the decompositions over the ranks and
gathers the factors; every rank ends with the model one process would build."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import svdadapt
from svdadapt.lifecycle.checkpoint import RECORD_DIGEST
from svdadapt.engine.distributed import layer_cost, split_by_cost
from svdadapt.engine.plan import Job
from svdadapt.core.methods import METHODS, SVDOptions
from dist_harness import as_rank, free_port
from helpers import TEST_THREADS, make_tiny_llama, output_bytes, token_ids

RANK = 4
BATCHES = [{"input_ids": token_ids(2, 12, seed=s), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
           for s in range(4)]


def _wrap(method: str):
    kw = {"calibration": BATCHES} if method == "corda" else {}
    return svdadapt.wrap(make_tiny_llama(hidden_size=256, intermediate_size=512), method, RANK, progress=False, **kw)


def _train_ddp(method: str, rank: int, out_dir: str) -> None:
    pm = _wrap(method)
    torch.save({"init": pm.svdadapt.init_factors, "state": pm.state_dict()}, f"{out_dir}/wrap{rank}.pt")
    ddp = torch.nn.parallel.DistributedDataParallel(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    ids = token_ids(2, 12, seed=10 + rank)  # each rank its own data
    losses = []
    for _ in range(3):
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    trained = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    torch.save({"trained": trained, "losses": losses}, f"{out_dir}/train{rank}.pt")


def _worker(rank: int, size: int, port: int, method: str, out_dir: str) -> None:
    as_rank(rank, size, port, lambda: _train_ddp(method, rank, out_dir))


@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_two_ranks_build_the_one_process_model_then_train_in_ddp(method: str, tmp_path, one_thread) -> None:
    mp.spawn(_worker, args=(2, free_port(), method, str(tmp_path)), nprocs=2, join=True)
    single = _wrap(method)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"wrap{rank}.pt")
        assert got["init"].keys() == single.svdadapt.init_factors.keys()
        for n, (A, B) in single.svdadapt.init_factors.items():
            if method == "pissa":  # the factors are computed by one rank with its (seed, name) generator
                assert torch.equal(got["init"][n][0], A) and torch.equal(got["init"][n][1], B), n
            else:  # covariances are all-reduced sums: equal up to the order of float additions (measured 1.7e-4)
                prod = lambda f: f[1].double() @ f[0].double()  # noqa: E731
                # not derived: the covariance's other summation order moves W·C_d, amplified by σ_c/gap at the cut
                # (bounds.truncated_svd_error); a constant 6x over the measured 1.7e-4
                assert float((prod(got["init"][n]) - prod((A, B))).norm() / prod((A, B)).norm()) < 1e-3, n
    a, b = (torch.load(tmp_path / f"train{r}.pt") for r in (0, 1))
    assert a["trained"].keys() == b["trained"].keys() and a["trained"]
    for k in a["trained"]:
        assert torch.equal(a["trained"][k], b["trained"][k]), k  # DDP keeps the ranks identical
    assert a["losses"][-1] < a["losses"][0]


def test_split_balances_cost_not_count() -> None:
    job = Job(METHODS["pissa"], rank=4, scaling=1.0, svd=SVDOptions("full"))
    shapes = {"big": (512, 512), "a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 64)}
    costs = {n: layer_cost(s, job) for n, s in shapes.items()}
    assert split_by_cost(costs, 2) == [["big"], ["a", "b", "c", "d"]]
    assert split_by_cost(costs, 1) == [list(shapes)]


MOE_BATCHES = [{"input_ids": token_ids(2, 10, seed=s, vocab=64)} for s in range(4)]


def _init_checkpoint(src, out, method: str, experts: bool = False) -> None:
    """The tiny Llama at RANK, or (``experts``) a tiny Mixtral's experts and layers at rank 2."""
    from moe_models import EXPERTS

    kw = {"calibration": MOE_BATCHES if experts else BATCHES} if method == "corda" else {}
    if experts:
        kw.update(target_parameters=EXPERTS)
    svdadapt.init_checkpoint(src, out, method=method, rank=2 if experts else RANK,
                             max_shard_bytes=8_000 if experts else 1 << 20, progress=False, **kw)


def _stream_worker(rank: int, size: int, port: int, src: str, out: str, method: str, experts: bool = False) -> None:
    as_rank(rank, size, port, lambda: _init_checkpoint(src, out, method, experts))


def _assert_one_process_files(one, two, method: str, min_shards: int) -> None:
    """The same files in ``one`` (one process) and ``two`` (two ranks), several base shards: byte for byte for
    PiSSA, for CorDA within ``_assert_close_corda``."""
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert sum(f.name.startswith("model-") for f in files) >= min_shards  # several shards, split over the ranks
    for f in files:
        if f.name == "adapter_config.json":  # names its own base directory
            continue
        if method == "pissa":
            assert output_bytes(one / f) == output_bytes(two / f), f
        elif f.suffix == ".safetensors":
            _assert_close_corda(_safetensors(one / f), _safetensors(two / f), f)


def _safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_init_checkpoint_on_two_ranks_writes_the_one_process_files(method: str, tmp_path, one_thread) -> None:
    """Each rank writes its own shards of the base; the files are those of one process: byte for byte for PiSSA;
    for CorDA up to the order in which the ranks' covariance sums are added."""
    src = tmp_path / "model"
    make_tiny_llama(hidden_size=256, intermediate_size=512).save_pretrained(src, max_shard_size="1MB")
    mp.spawn(_stream_worker, args=(2, free_port(), str(src), str(tmp_path / "two"), method), nprocs=2, join=True)
    _init_checkpoint(src, tmp_path / "one", method)
    _assert_one_process_files(tmp_path / "one", tmp_path / "two", method, min_shards=4)


_PAIRS = {"lora_A.weight": "lora_B.weight", ".A0": ".B0", ".A": ".B"}  # adapter file; svdadapt_state: init, current


def _assert_close_corda(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], f) -> None:
    """Adapters by their products B·A (the factors' signs and near-equal directions are free), within 1e-3 as for
    wrap(); every other tensor within 1e-3 too (the bases W − s·B·A differ by what the products differ)."""
    assert a.keys() == b.keys(), f
    rel = lambda x, y: float((x.double() - y.double()).norm() / y.double().norm())  # noqa: E731
    factors = set()
    for k in a:
        end = next((e for e in _PAIRS if k.endswith(e)), None)
        if end is not None:
            kb = k[: -len(end)] + _PAIRS[end]
            factors |= {k, kb}
            # as above: another summation order of the covariance, amplified by σ_c/gap (not derived)
            assert rel(b[kb].double() @ b[k].double(), a[kb].double() @ a[k].double()) < 1e-3, (f, k)
    for k in a.keys() - factors - {RECORD_DIGEST}:  # the digest hashes the report, whose floats differ too
        # bases W − s·B·A differ by the products' difference, as above
        assert rel(b[k], a[k]) < 1e-3, (f, k)


def test_cli_under_torchrun_writes_the_one_process_files(tmp_path) -> None:
    """``torchrun --nproc_per_node 2 -m svdadapt.cli init``: the CLI joins the process group itself."""
    import subprocess
    import sys

    from svdadapt.cli import main as cli_main

    src = tmp_path / "model"
    make_tiny_llama(hidden_size=256, intermediate_size=512).save_pretrained(src, max_shard_size="1MB")
    args = ["init", str(src), "--method", "pissa", "--rank", str(RANK), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(TEST_THREADS))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "svdadapt.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("svdadapt init") == 1  # one process group: rank 0 alone reports
    torch.set_num_threads(TEST_THREADS)  # as the ranks: bit-identity needs the same summation order
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for f in files:
        if f.name != "adapter_config.json":  # names its own base directory
            assert output_bytes(tmp_path / "one" / f) == output_bytes(tmp_path / "two" / f), f


def _wrap_experts():
    from moe_models import EXPERTS, moe

    return svdadapt.wrap(moe("mixtral", seed=2), "pissa", RANK // 2, target_parameters=EXPERTS, progress=False)


def _experts_worker(rank: int, size: int, port: int, out_dir: str) -> None:
    def body() -> None:
        pm = _wrap_experts()
        torch.save({"init": pm.svdadapt.init_factors, "report": pm.svdadapt.report}, f"{out_dir}/experts{rank}.pt")
    as_rank(rank, size, port, body)


def test_two_ranks_split_the_experts_and_build_the_one_process_model(tmp_path, one_thread) -> None:
    """target_parameters under a process group: each rank decomposes its share of the experts (split by cost like
    the layers), the plans are all-gathered, and every rank packs the factors one process packs, bit for bit (each
    expert's factors come from one rank with its (seed, expert name) generator)."""
    mp.spawn(_experts_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _wrap_experts()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"experts{rank}.pt")
        assert got["init"].keys() == single.svdadapt.init_factors.keys()
        for n, (A, B) in single.svdadapt.init_factors.items():
            assert torch.equal(got["init"][n][0], A) and torch.equal(got["init"][n][1], B), n
        assert got["report"] == single.svdadapt.report



@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_init_checkpoint_of_experts_on_two_ranks_writes_the_one_process_files(method: str, tmp_path,
                                                                               one_thread) -> None:
    """target_parameters streamed under a process group: every parameter planned by the ranks together (each its
    share of the experts; CorDA: the routed-token covariances all-reduced), each rank writing its own shards'
    residuals; the files are one process's: byte for byte for PiSSA, for CorDA up to the order in which the ranks'
    covariance sums are added (as above)."""
    from moe_models import moe

    src = tmp_path / "model"
    moe("mixtral", seed=3).save_pretrained(src, max_shard_size="20KB")
    mp.spawn(_stream_worker, args=(2, free_port(), str(src), str(tmp_path / "two"), method, True), nprocs=2,
             join=True)
    _init_checkpoint(src, tmp_path / "one", method, experts=True)
    _assert_one_process_files(tmp_path / "one", tmp_path / "two", method, min_shards=3)

"""Two gloo ranks given different arguments, or one rank failing: every rank raises the same one-line error, and
no rank is left waiting in a collective (the group runs a correct call afterwards).

All cases run in one pair of spawned processes (starting them costs more than the cases), each rank recording
what every case raised; the tests then read those records. Collectives time out after 30 s and the pair is killed
after 240 s, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

import svdadapt
from dist_harness import as_rank, free_port, run_ranks
from helpers import make_tiny_llama, token_ids

RANK = 4
BATCHES = [{"input_ids": token_ids(2, 12, seed=s), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
           for s in range(4)]
NAN_MODULE = "model.layers.1.mlp.down_proj"


def _model():
    return make_tiny_llama()


def _nan_model():
    model = _model()
    with torch.no_grad():
        dict(model.named_modules())[NAN_MODULE].weight[0, 0] = math.nan
    return model


def _wrap(rank: int, paths: dict, method: str = "pissa", r: int = RANK, **kw):
    return svdadapt.wrap(_model(), method, r, progress=False, **kw)


def _init(rank: int, paths: dict, case: str, src: str = "model", **kw):
    return svdadapt.init_checkpoint(paths[src], Path(paths["out"]) / case, rank=RANK, max_shard_bytes=1 << 16,
                                    progress=False, **kw)


def _failing_plan_layer(rank: int):
    """wrap's engine call, failing on rank 1 in the second decoder block (as an out-of-memory there would)."""
    module = importlib.import_module("svdadapt.wrap")
    original = module.plan_layer

    def plan_layer(job, layer, prepared=None):
        if rank == 1 and layer.name.startswith("model.layers.1."):
            raise RuntimeError(f"out of memory planning {layer.name} (simulated)")
        return original(job, layer, prepared)

    return module, original, plan_layer


def _fails_mid_plan(rank: int, paths: dict):
    module, original, failing = _failing_plan_layer(rank)
    module.plan_layer = failing
    try:
        _wrap(rank, paths, "corda", calibration=BATCHES)
    finally:
        module.plan_layer = original


def _objects_over_gloo_beside_nccl(rank: int, paths: dict):
    """A default group without a CPU backend (NCCL, here only reported as such): outcomes, jobs and plans travel
    through one gloo group made beside it, and the result is that of the default group."""
    from unittest import mock

    from svdadapt.engine import distributed

    direct = _wrap(rank, paths).svdadapt.init_factors
    with mock.patch.object(torch.distributed, "get_backend", return_value="nccl"):
        beside = _wrap(rank, paths).svdadapt.init_factors
    group = distributed._CPU_GROUP
    if len(group) != 2 or group[0] is not torch.distributed.group.WORLD or group[1] is None:
        raise AssertionError(f"no gloo group made beside the default one: {group}")
    if direct.keys() != beside.keys() or not all(torch.equal(direct[n][i], beside[n][i]) for n in direct for i in (0, 1)):
        raise AssertionError("other factors through the gloo group")


CASES = {
    "seed": lambda rank, paths: _wrap(rank, paths, seed=rank),
    "method": lambda rank, paths: _wrap(rank, paths, ["pissa", "milora"][rank]),
    "rank": lambda rank, paths: _wrap(rank, paths, r=[4, 8][rank]),
    "targets": lambda rank, paths: _wrap(rank, paths, target_modules=[["q_proj"], ["v_proj"]][rank]),
    "own_batches": lambda rank, paths: _wrap(rank, paths, "corda", calibration=BATCHES[rank::2]),
    "nan_on_one_rank": lambda rank, paths: svdadapt.wrap(_nan_model() if rank == 1 else _model(), "pissa", RANK,
                                                         progress=False),
    "fails_mid_plan": _fails_mid_plan,
    "one_batch": lambda rank, paths: _wrap(rank, paths, "corda", calibration=BATCHES[:1]),
    "stream_seed": lambda rank, paths: _init(rank, paths, "stream_seed", method="pissa", seed=rank),
    "stream_own_batches": lambda rank, paths: _init(rank, paths, "stream_own_batches", method="corda",
                                                    calibration=BATCHES[rank::2]),
    "stream_nan": lambda rank, paths: _init(rank, paths, "stream_nan", src="nan_model", method="pissa"),
    "stream_one_batch": lambda rank, paths: _init(rank, paths, "stream_one_batch", method="corda",
                                                  calibration=BATCHES[:1]),
    "objects_over_gloo": _objects_over_gloo_beside_nccl,
    "afterwards": lambda rank, paths: _wrap(rank, paths),  # the group still works: nobody left in a collective
}


def _record(rank: int, paths: dict) -> None:
    """Every case in turn; what it raised (type: message, or "ok") into ``out/rank<rank>.json`` after each."""
    seen: dict[str, str] = {}
    for name, case in CASES.items():
        try:
            case(rank, paths)
            seen[name] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded for the tests
            seen[name] = f"{type(e).__name__}: {e}"
        (Path(paths["out"]) / f"rank{rank}.json").write_text(json.dumps(seen))


def _worker(rank: int, size: int, port: int, paths: dict) -> None:
    as_rank(rank, size, port, lambda: _record(rank, paths), timeout_s=30)


@pytest.fixture(scope="module")
def raised(tmp_path_factory) -> dict[str, list[str]]:
    """case -> [what rank 0 raised, what rank 1 raised]."""
    root = tmp_path_factory.mktemp("ranks")
    paths = {"model": str(root / "model"), "nan_model": str(root / "nan_model"), "out": str(root / "out")}
    _model().save_pretrained(paths["model"], max_shard_size="100KB")
    _nan_model().save_pretrained(paths["nan_model"], max_shard_size="100KB")
    Path(paths["out"]).mkdir()
    threads = torch.get_num_threads()
    try:
        run_ranks(_worker, (2, free_port(), paths), nprocs=2, timeout_s=240)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {name: [records[0].get(name), records[1].get(name)] for name in CASES}


def _same_on_every_rank(raised: dict, case: str) -> str:
    on_ranks = raised[case]
    assert on_ranks[0] == on_ranks[1], on_ranks
    return on_ranks[0]


@pytest.mark.parametrize("case, message", [
    ("seed", "ValueError: wrap: the ranks disagree on seed: 0 on rank 0, 1 on rank 1; every rank must pass the "
             "same arguments"),
    ("method", "ValueError: wrap: the ranks disagree on method: 'pissa' on rank 0, 'milora' on rank 1; every rank "
               "must pass the same arguments"),
    ("rank", "ValueError: wrap: the ranks disagree on rank: 4 on rank 0, 8 on rank 1; every rank must pass the "
             "same arguments"),
    ("targets", "ValueError: wrap: the ranks disagree on target_modules: ['q_proj'] on rank 0, ['v_proj'] on "
                "rank 1; every rank must pass the same arguments"),
    ("stream_seed", "ValueError: init_checkpoint: the ranks disagree on seed: 0 on rank 0, 1 on rank 1; every "
                    "rank must pass the same arguments"),
])
def test_ranks_given_different_arguments_all_raise_the_first_difference(raised, case: str, message: str) -> None:
    assert _same_on_every_rank(raised, case) == message


@pytest.mark.parametrize("case, what", [("own_batches", "wrap"), ("stream_own_batches", "init_checkpoint")])
def test_ranks_given_their_own_batches_are_told_every_rank_passes_the_same(raised, case: str, what: str) -> None:
    pattern = (rf"ValueError: {what}: the ranks were given different calibration data \(sha256 [0-9a-f]{{12}} on "
               r"rank 0, [0-9a-f]{12} on rank 1\): under torch.distributed every rank passes the same batches, and "
               r"svdadapt splits them over the ranks \(rank i collects on batches i, i\+2, \.\.\.\)")
    assert re.fullmatch(pattern, _same_on_every_rank(raised, case))


def test_a_nan_weight_on_one_ranks_copy_is_raised_on_every_rank(raised) -> None:
    assert _same_on_every_rank(raised, "nan_on_one_rank") == (
        f"ValueError: rank 1: ValueError: module {NAN_MODULE!r} has a weight with NaN or inf (1 of 8192 entries); "
        "svdadapt cannot decompose it")


def test_a_rank_failing_between_collectives_is_raised_on_every_rank(raised) -> None:
    """Rank 1 fails in block 1's planning, after block 0's covariances were all-reduced and its plans gathered."""
    assert re.fullmatch(r"RuntimeError: rank 1: RuntimeError: out of memory planning model\.layers\.1\.\S+ "
                        r"\(simulated\)", _same_on_every_rank(raised, "fails_mid_plan"))


def test_a_nan_weight_in_a_streamed_checkpoint_is_raised_on_every_rank(raised) -> None:
    """Only the rank whose shard holds the weight reads it; the others hear of it at the next collective."""
    assert re.fullmatch(rf"ValueError: rank [01]: ValueError: module {re.escape(repr(NAN_MODULE))} has a weight with "
                        r"NaN or inf \(1 of 8192 entries\) in \S+model-\d+-of-\d+\.safetensors; svdadapt cannot "
                        r"decompose it", _same_on_every_rank(raised, "stream_nan"))


@pytest.mark.parametrize("case", ["one_batch", "stream_one_batch"])
def test_fewer_batches_than_ranks_is_one_error_on_every_rank(raised, case: str) -> None:
    assert _same_on_every_rank(raised, case) == (
        "ValueError: ranks 0, 1: ValueError: calibration has 1 batch for 2 ranks: svdadapt splits the batches over the "
        "ranks (rank i collects on batches i, i+2, ...), so every rank needs one: pass at least 2 batches (or run in "
        "one process)")


def test_object_collectives_of_a_gpu_group_use_a_gloo_group(raised) -> None:
    assert raised["objects_over_gloo"] == ["ok", "ok"]


def test_no_collective_is_left_waiting(raised) -> None:
    """After every failure above, the same two processes run a correct call together."""
    assert raised["afterwards"] == ["ok", "ok"]


# ------------------------------------------------------------------------------------------- in one process
def test_the_calibration_fingerprint_follows_the_batches() -> None:
    """Ranks (and a resumed init_checkpoint) compare batches by this hash: it sees their order and their tensors."""
    from svdadapt.engine.distributed import fingerprint

    assert fingerprint(BATCHES) == fingerprint([dict(b) for b in BATCHES])
    assert fingerprint(BATCHES) != fingerprint(BATCHES[::-1])


def test_arguments_compare_by_value_not_by_process() -> None:
    """A set's order follows each process's hash seed, a module's repr its address: neither may differ ranks."""
    from svdadapt.engine.distributed import _comparable

    assert _comparable({"v_proj", "q_proj", "k_proj"}) == ["k_proj", "q_proj", "v_proj"]
    assert _comparable(_model()) == "LlamaForCausalLM"
    assert _comparable(x for x in "ab") == "generator"
    assert _comparable({"w": torch.zeros(2, 3)}) == {"w": "tensor(2, 3) torch.float32"}


def test_the_shared_error_keeps_a_builtin_type_and_names_the_ranks() -> None:
    from svdadapt.engine.distributed import _outcome, _shared_error

    class Custom(Exception):
        pass

    e = _shared_error([None, _outcome(KeyError("x")), _outcome(ValueError("y"))])
    assert type(e) is KeyError and e.args == ("ranks 1, 2: KeyError: 'x'",) and e.failed_ranks == [1, 2]
    e = _shared_error([_outcome(Custom("z")), None])
    assert type(e) is RuntimeError and str(e) == "rank 0: Custom: z" and e.failed_ranks == [0]
    from svdadapt.blockwise import BlockwiseUnsupported

    e = _shared_error([None, _outcome(BlockwiseUnsupported("no decoder stack"))])  # a ValueError of svdadapt's
    assert type(e) is ValueError and str(e) == "rank 1: BlockwiseUnsupported: blockwise calibration: no decoder stack"


def test_one_process_errors_are_unchanged() -> None:
    """Outside a process group the decorator is a plain call: no rank prefix, no collective."""
    with pytest.raises(ValueError, match=r"\Acalibration saw no tokens"):
        svdadapt.wrap(_model(), "corda", RANK, calibration=[], progress=False)


# ------------------------------------------------------------------------------------------- svdadapt init
def test_cli_under_torchrun_reports_the_failing_ranks_error_on_every_rank(tmp_path) -> None:
    """``torchrun -m svdadapt.cli init`` on a checkpoint with a NaN weight: the rank that reads it and the rank
    waiting for it both print the same line (today's alternative: one rank's error, the other killed)."""
    import os
    import subprocess
    import sys

    _nan_model().save_pretrained(tmp_path / "model", max_shard_size="100KB")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "svdadapt.cli", "init", str(tmp_path / "model"), "--method", "pissa",
                          "--rank", str(RANK), "--no-progress", "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    # each rank's line, also where two ranks' writes to the shared stderr interleave: split at the prefix
    errors = ["svdadapt: error:" + part.split("\n", 1)[0] for part in run.stderr.split("svdadapt: error:")[1:]]
    assert errors and all(line == errors[0] for line in errors), run.stderr[-3000:]
    assert re.fullmatch(rf"svdadapt: error: rank [01]: ValueError: module {re.escape(repr(NAN_MODULE))} has a weight "
                        r"with NaN or inf \(1 of 8192 entries\) in \S+; svdadapt cannot decompose it", errors[0]), errors[0]

"""Block-by-block calibration (svdadapt/blockwise.py): a decoder stack calibrated one block at a time gives the
covariances and adapters of the whole-model path (padding masks, batches of different sizes, hidden states in
memory or on disk), EoRA's sequential variant gives a different, valid compensation, and models that are not a
chain of blocks keep the whole-model path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import svdadapt
from helpers import lora_layers, lora_product, make_tiny_llama, out, rel, same_init_factors, token_ids, toy, toy_input
from svdadapt.blockwise import BlockwiseOptions, find_stack, plan_blockwise
from svdadapt.engine.plan import LayerPlan

TOL = 1e-5  # fp32 rounding; measured: bit-identical on CPU


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of different sizes and lengths, with left and right padding."""
    b1 = {"input_ids": token_ids(3, 12, 1), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    b1["attention_mask"][0, :4] = 0
    b1["attention_mask"][2, 9:] = 0
    b2 = {"input_ids": token_ids(2, 7, 2), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    b2["attention_mask"][1, 5:] = 0
    return [b1, b2]


def _model(**kw) -> nn.Module:
    return make_tiny_llama(num_hidden_layers=3, **kw)


def _blockwise_covariances(model: nn.Module, batches, options=BlockwiseOptions(), **kw) -> dict[str, torch.Tensor]:
    """What each block hands the engine: name -> covariance (cloned), through a recording ``plan``."""
    got: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []

    def plan(targets, covs):  # one call per block: ids are compared within it (a freed tensor's id is reused)
        for n in targets:
            got[n] = covs[n].clone()
        groups.extend(sorted(n for n in targets if covs[n] is covs[m]) for m in targets
                      if next(k for k in targets if covs[k] is covs[m]) == m)
        return {n: LayerPlan(n, torch.zeros(1, 1), torch.zeros(1, 1), {}) for n in targets}

    targets = svdadapt.resolve_targets(model, kw.pop("target_modules", "all-linear"))
    plans = plan_blockwise(model, targets, batches, plan, options, progress=False, **kw)
    assert list(plans) == list(targets)
    got["__groups__"] = sorted(groups)
    return got


def _check_same(got: dict, whole: svdadapt.Covariances) -> None:
    assert set(got) - {"__groups__"} == set(whole)
    for n in whole:
        assert rel(got[n], whole[n]) <= TOL, n
    assert got["__groups__"] == sorted(sorted(g) for g in whole.groups)  # q/k/v and gate/up still share one


def test_find_stack():
    assert find_stack(_model())[0] == "model.layers"
    assert find_stack(toy()) is None  # no ModuleList


@pytest.mark.parametrize("budget", [1024.0, 0.0], ids=["memory", "disk"])
def test_covariances_equal_whole_model(budget):
    model, batches = _model(), _batches()
    whole = svdadapt.collect_covariances(model, batches, progress=False)
    _check_same(_blockwise_covariances(model, batches, BlockwiseOptions(memory_budget_mb=budget)), whole)


def test_lm_head_and_subsets():
    """A target outside the stack (lm_head, explicitly) and targets in the first block only."""
    model, batches = _model(), _batches()
    targets = ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    whole = svdadapt.collect_covariances(model, batches, target_modules=targets, progress=False)
    _check_same(_blockwise_covariances(model, batches, target_modules=targets), whole)
    first = svdadapt.collect_covariances(model, batches, target_modules=["model.layers.0.mlp.up_proj"], progress=False)
    _check_same(_blockwise_covariances(model, batches, target_modules=["model.layers.0.mlp.up_proj"]), first)


def test_model_left_as_it_was():
    """No hook left behind, training flags restored, a generator of batches is enough, padding-free tensors work."""
    model = _model().train()
    model.model.layers[1].eval()
    before = copy.deepcopy(model.state_dict())
    got = _blockwise_covariances(model, (b for b in _batches()))
    assert len(got) == 22
    assert model.training and not model.model.layers[1].training and model.model.layers[2].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = token_ids(2, 9, 5)
    _check_same(_blockwise_covariances(model, [ids]), svdadapt.collect_covariances(model, [ids], progress=False))


def _wrap(model, method, blockwise, **kw):
    return svdadapt.wrap(copy.deepcopy(model), method, rank=4, calibration=_batches(), blockwise=blockwise,
                         progress=False, **kw)


def _check_adapters_equal(a, b) -> None:
    la, lb = lora_layers(a), lora_layers(b)
    assert list(la) == list(lb)
    for n in la:
        assert rel(lora_product(la[n]), lora_product(lb[n])) <= TOL, n
    x = _batches()[0]
    assert rel(out(a, x), out(b, x)) <= TOL


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_adapters_equal_whole_model(mode):
    model = _model()
    whole = _wrap(model, "corda", False, mode=mode)
    for blockwise in (True, BlockwiseOptions(memory_budget_mb=0)):
        _check_adapters_equal(_wrap(model, "corda", blockwise, mode=mode), whole)
    auto = _wrap(model, "corda", None, mode=mode)
    assert same_init_factors(auto, _wrap(model, "corda", True, mode=mode))


@pytest.mark.parametrize("calibrate_on", ["reference", "compressed"])
def test_eora_adapters_equal_whole_model(calibrate_on):
    """Not sequential: the whole-model path's covariances and adapters. The automatic mode is sequential for EoRA
    (the better inputs measured), as blockwise=True is."""
    model = _model()
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=16)
    kw = dict(reference=model, calibrate_on=calibrate_on)
    whole = _wrap(qmodel, "eora", False, **kw)
    _check_adapters_equal(_wrap(qmodel, "eora", BlockwiseOptions(sequential=False), **kw), whole)
    auto = _wrap(qmodel, "eora", None, **kw)
    assert same_init_factors(auto, _wrap(qmodel, "eora", True, **kw))
    assert not same_init_factors(auto, whole)


def test_eora_quantize_here_is_not_sequential():
    """With quantize= the compressed weights exist only after the plan: block by block, reference inputs."""
    pytest.importorskip("bitsandbytes")
    model = _model()
    whole = _wrap(model, "eora", False, quantize="nf4")
    assert same_init_factors(_wrap(model, "eora", True, quantize="nf4"), whole)
    with pytest.raises(ValueError, match="sequential=True with quantize=: the compressed blocks exist only after"):
        _wrap(model, "eora", BlockwiseOptions(sequential=True), quantize="nf4")


def test_eora_sequential_differs_and_compensates():
    """The sequential variant carries the compensated compressed blocks' outputs on: a different compensation that
    still brings the compressed model's outputs closer to the reference's; it is deterministic."""
    model = _model()
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=16)
    seq = _wrap(qmodel, "eora", True, reference=model)  # the default of the block-by-block path for EoRA
    ref = _wrap(qmodel, "eora", False, reference=model)
    first = lora_layers(seq)["model.layers.0.self_attn.q_proj"], lora_layers(ref)["model.layers.0.self_attn.q_proj"]
    assert rel(lora_product(first[0]), lora_product(first[1])) <= TOL  # block 0 reads the same inputs
    later = lora_layers(seq)["model.layers.2.mlp.down_proj"], lora_layers(ref)["model.layers.2.mlp.down_proj"]
    # a "differs by more than" check: another block's inputs move the factors by O(1e-1)
    assert rel(lora_product(later[0]), lora_product(later[1])) > 1e-3
    x = _batches()[0]
    error = rel(out(qmodel, x), out(model, x))
    assert rel(out(seq, x), out(model, x)) < 0.7 * error
    assert same_init_factors(seq, _wrap(qmodel, "eora", BlockwiseOptions(sequential=True), reference=model))
    compressed = _wrap(qmodel, "eora", BlockwiseOptions(memory_budget_mb=0), reference=model, calibrate_on="compressed")
    assert rel(out(compressed, x), out(model, x)) < 0.7 * error
    assert not same_init_factors(compressed, seq)


class _Doubling(nn.Module):
    """Blocks with something between them: not a chain the block-by-block path can run."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.blocks:
            h = block(h) * 2
        return h


@pytest.mark.parametrize("case", ["no stack", "not a chain"])
def test_unsupported_models_keep_the_whole_model_path(case):
    """Automatic: the whole-model path with a one-line note; asked for explicitly: an error saying why."""
    model, batches, why = {"no stack": (toy(), [toy_input()], "no decoder stack"),
                           "not a chain": (_Doubling(), [{"input_ids": token_ids(2, 5, 3)}],
                                           "block 1 of the stack does not read block 0's output")}[case]
    whole = svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=batches, blockwise=False, progress=False)
    with pytest.warns(UserWarning, match=f"svdadapt: .*{why}.*: calibrating on the whole model") as caught:
        auto = svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=iter(batches), progress=False)
    assert [w.filename for w in caught if "svdadapt:" in str(w.message)] == [__file__]  # points at the call
    assert same_init_factors(auto, whole)
    with pytest.raises(ValueError, match=f"blockwise calibration: .*{why}"):
        svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=batches, blockwise=True, progress=False)


def test_no_note_where_nothing_is_calibrated():
    model = _model()
    covs = svdadapt.collect_covariances(model, _batches(), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=covs, progress=False)
        svdadapt.wrap(copy.deepcopy(toy()), "pissa", rank=2, progress=False)
    assert not [w for w in caught if "calibrating on the whole model" in str(w.message)]


def test_errors():
    model = _model()
    covs = svdadapt.collect_covariances(model, _batches(), progress=False)
    with pytest.raises(ValueError, match="blockwise=True calibrates from batches: method 'corda' was given "):
        svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=covs, blockwise=True, progress=False)
    with pytest.raises(ValueError, match="method 'pissa' needs no calibration"):
        svdadapt.wrap(copy.deepcopy(model), "pissa", rank=2, blockwise=True, progress=False)
    with pytest.raises(ValueError, match="sequential=True compensates a base left as it is"):
        _wrap(model, "corda", BlockwiseOptions(sequential=True))
    with pytest.raises(TypeError, match="blockwise must be None, True, False or a svdadapt.blockwise.BlockwiseOptions"):
        _wrap(model, "corda", "yes")
    with pytest.raises(TypeError, match="calibration must be a Covariances, a mapping name -> tensor or an iterable"):
        svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=3, progress=False)
    with pytest.raises(TypeError, match="calibration must be a Covariances, a mapping name -> tensor or an iterable"):
        svdadapt.wrap(copy.deepcopy(model), "corda", rank=2, calibration=3, blockwise=True, progress=False)
    for bad in (-1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="memory_budget_mb must be a finite number"):
            BlockwiseOptions(memory_budget_mb=bad)
    with pytest.raises(TypeError, match="sequential must be None, True or False, got 'yes'"):
        BlockwiseOptions(sequential="yes")
    with pytest.raises(ValueError, match="is not a directory"):
        BlockwiseOptions(offload_dir="/no/such/dir")


def test_offload_dir_is_used_and_emptied(tmp_path):
    model = _model()
    seen = []
    real_save = torch.save

    def spy(obj, path, *a, **k):
        seen.append(str(path))
        return real_save(obj, path, *a, **k)

    torch.save = spy
    try:
        got = _blockwise_covariances(model, _batches(), BlockwiseOptions(memory_budget_mb=0, offload_dir=tmp_path))
    finally:
        torch.save = real_save
    assert seen and all(p.startswith(str(tmp_path)) for p in seen)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone
    _check_same(got, svdadapt.collect_covariances(model, _batches(), progress=False))


@pytest.mark.slow
def test_smollm2_blockwise_equals_whole_model(smollm2):
    """The real model, 3 batches of packed pydoc text (the last one padded): the same CorDA adapters."""
    from pydoc_data.topics import topics

    model, tok = smollm2
    batches = svdadapt.text_batches(tok, [topics[k] for k in sorted(topics)][:3], seq_len=96, batch_size=2,
                                    max_batches=3)
    batches[-1]["attention_mask"][-1, 70:] = 0
    kw = dict(rank=8, calibration=batches, progress=False, target_modules=["q_proj", "down_proj"])
    whole = svdadapt.wrap(copy.deepcopy(model), "corda", blockwise=False, **kw)
    block = svdadapt.wrap(model, "corda", blockwise=True, **kw)
    la, lb = lora_layers(block), lora_layers(whole)
    assert len(la) == 60
    assert max(rel(lora_product(la[n]), lora_product(lb[n])) for n in la) <= TOL

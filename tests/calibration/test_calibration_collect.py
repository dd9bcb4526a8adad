"""The collection as the package uses it (svdadapt/calibration/collect.py and forward.py): ``collect`` on given
modules, the modules of a model run for calibration by name, one batch run with its masks, eval mode restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdadapt
from helpers import make_tiny_llama, raises_exactly, token_ids
from svdadapt.calibration import collect, eval_mode, hooked_targets, run_batch
from svdadapt.calibration.forward import no_logits


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _batches() -> list[dict[str, torch.Tensor]]:
    b = {"input_ids": token_ids(2, 9, 1), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    b["attention_mask"][1, 6:] = 0
    return [b, {"input_ids": token_ids(1, 5, 2)}]


def test_collect_on_given_modules_equals_collect_covariances():
    """The same hooks and arithmetic: bit-identical tensors, token counts and shared groups."""
    model = make_tiny_llama()
    whole = svdadapt.collect_covariances(model, _batches(), progress=False)
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    got = collect(model, _batches(), hooked_targets(model, names), progress=False)
    assert list(got) == names
    assert all(torch.equal(got[n], whole[n]) and got.token_count(n) == whole.token_count(n) for n in names)
    assert got.groups == (tuple(names[:2]), (names[2],))  # q and k read one input
    with raises_exactly(ValueError, "covariances accumulate in torch.float32 or torch.float64, got "
                        "dtype=torch.float16"):
        collect(model, _batches(), hooked_targets(model, names), torch.float16, progress=False)


def test_hooked_targets():
    model = make_tiny_llama()
    assert hooked_targets(model, ["lm_head"]) == {"lm_head": model.lm_head}
    for name in ("model.layers.0.mlp", "no.such.layer"):  # not a Linear; not there
        with raises_exactly(ValueError, "the model run for calibration (LlamaForCausalLM) has no adaptable layer "
                            f"named {name!r}"):
            hooked_targets(model, ["lm_head", name])


class _State:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def begin(self, batch, masks) -> None:
        self.seen.append(("begin", batch, None if masks.enc is None else masks.enc.tolist()))

    def end(self) -> None:
        self.seen.append(("end",))


def test_run_batch_hands_its_masks_to_the_state():
    model, (b0, b1) = make_tiny_llama(), _batches()
    state = _State()
    run_batch(model, b0, 0, torch.device("cpu"), state)
    run_batch(model, b1["input_ids"], 1, torch.device("cpu"), state)  # a tensor: every position counts
    assert state.seen == [("begin", 0, b0["attention_mask"].bool().tolist()), ("end",), ("begin", 1, None), ("end",)]
    with raises_exactly(TypeError, "batch 2 is a list; a batch is a dict (run as model(**batch)) or a tensor (run as "
                        "model(batch))"):
        run_batch(model, [1, 2], 2, torch.device("cpu"), state)


def test_eval_mode_restores_every_flag_also_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    model[1].eval()  # mixed flags: model.train() afterwards would not restore them
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]
    with pytest.raises(RuntimeError, match="^inside$"):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False]


def _head_inputs(model: nn.Module, batches) -> list[tuple[int, ...]]:
    """The shapes of the inputs the output head was called with while ``batches`` were collected."""
    shapes: list[tuple[int, ...]] = []
    h = model.lm_head.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    try:
        svdadapt.collect_covariances(model, batches, progress=False)
    finally:
        h.remove()
    return shapes


def test_head_runs_on_the_last_position_only_when_no_target_reads_it():
    """``logits_to_keep=1`` when the head is no target: the targets see the same inputs (bit-identical
    covariances to a run that computes every logit); a targeted head, or a batch with labels, gets every position."""
    model = make_tiny_llama()
    assert no_logits(model, [model.model.layers[0].mlp.down_proj]) == {"logits_to_keep": 1}
    assert no_logits(model, [model.lm_head]) == {}
    assert no_logits(nn.Sequential(nn.Linear(2, 2)), []) == {}  # a forward without logits_to_keep
    assert _head_inputs(model, _batches()) == [(2, 1, 64), (1, 1, 64)]
    names = list(svdadapt.resolve_targets(model))
    skipped = svdadapt.collect_covariances(model, _batches(), progress=False)
    full = collect(model, [{**b, "logits_to_keep": 0} for b in _batches()], hooked_targets(model, names),
                   progress=False)  # the batch's own logits_to_keep wins: every position
    assert list(skipped) == list(full) == names and all(torch.equal(skipped[n], full[n]) for n in names)
    with_head = collect(model, _batches(), hooked_targets(model, names + ["lm_head"]), progress=False)
    assert with_head.token_count("lm_head") == 9 + 6 + 5  # every unpadded token of both batches
    labelled = [{**b, "labels": b["input_ids"]} for b in _batches()]
    assert _head_inputs(model, labelled) == [(2, 9, 64), (1, 5, 64)]

"""Which models the block-by-block path runs (svdadapt/blockwise/stack.py): the stack a calibration runs on, the chain
check, and the typed refusal ``BlockwiseUnsupported`` that ``wrap``'s automatic mode answers with the whole-model
path and an explicit ``blockwise=True`` raises."""

from __future__ import annotations

import copy

import pytest
import torch

import svdadapt
from helpers import make_tiny_llama, raises_exactly, same_state, toy, toy_input
from svdadapt.blockwise import BlockwiseUnsupported
from svdadapt.blockwise.stack import Chain, select_stack


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_unsupported_is_a_value_error_with_its_reason():
    e = BlockwiseUnsupported("no decoder stack")
    assert isinstance(e, ValueError)
    assert (str(e), e.reason) == ("blockwise calibration: no decoder stack", "no decoder stack")


def test_chain_check():
    """Blocks in order, once each, each reading its predecessor's output unchanged (same object, same version)."""
    chain, h0, other = Chain(3), torch.ones(2, 3), torch.ones(2, 3)
    chain.enter(0)
    chain.leave(h0)
    chain.enter(1)
    chain.check_input(1, h0)
    broken = "blockwise calibration: block 1 of the stack does not read block 0's output as it left it"
    with raises_exactly(BlockwiseUnsupported, broken):
        chain.check_input(1, other)  # an equal tensor, not the same one
    h0.mul_(2)  # changed in place between the blocks
    with raises_exactly(BlockwiseUnsupported, broken):
        chain.check_input(1, h0)
    order = "blockwise calibration: block {} of the stack ran out of order or more than once per forward pass"
    with raises_exactly(BlockwiseUnsupported, order.format(1)):
        chain.enter(1)
    chain.begin()  # a new forward pass: block 2 cannot come first
    with raises_exactly(BlockwiseUnsupported, order.format(2)):
        chain.enter(2)


def test_select_stack():
    model = make_tiny_llama(num_hidden_layers=3)
    inside = ["model.layers.0.self_attn.q_proj", "lm_head"]
    stack, blocks, carriers = select_stack(model, model, False, inside)
    assert stack == "model.layers" and blocks is model.model.layers and carriers is blocks
    other = make_tiny_llama(num_hidden_layers=3)
    assert select_stack(model, other, True, inside)[2] is other.model.layers  # sequential: the adapted model's blocks
    assert select_stack(model, other, False, inside)[2] is model.model.layers
    with raises_exactly(BlockwiseUnsupported, "blockwise calibration: no targeted layer lies inside the decoder "
                        "stack 'model.layers'"):
        select_stack(model, model, False, ["lm_head"])
    with raises_exactly(BlockwiseUnsupported, "blockwise calibration: the compressed model's decoder stack is not "
                        "'model.layers' with 3 blocks"):
        select_stack(model, make_tiny_llama(num_hidden_layers=2), True, inside)
    with raises_exactly(BlockwiseUnsupported, "blockwise calibration: Sequential has no decoder stack (a ModuleList "
                        "of identical blocks)"):
        select_stack(toy(), toy(), False, ["0"])


def test_explicit_request_raises_the_typed_error():
    """``blockwise=True`` on a model without a stack: the typed error, before the model is touched."""
    model = toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BlockwiseUnsupported) as caught:
        svdadapt.wrap(model, "corda", rank=2, calibration=[toy_input()], blockwise=True, progress=False)
    assert caught.value.reason == "Sequential has no decoder stack (a ModuleList of identical blocks)"
    assert same_state(model.state_dict(), before)

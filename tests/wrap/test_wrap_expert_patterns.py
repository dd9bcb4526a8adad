"""``rank_pattern`` / ``alpha_pattern`` with ``target_parameters``, as PEFT 0.21 reads them: a parameter target is
matched by its key ``<module>.<param>`` (``BaseTuner._inject_parameters`` passes that key to
``_create_and_replace``, which looks it up with ``get_pattern_key``), so each ParamWrapper, including each of the
nested wrappers of one module's two parameters, has its own rank and alpha, shared by all its experts. Checked
against PEFT's own ``LoraConfig`` with the same patterns; each expert's adapter against its brute-force truncated
SVD at the pattern's rank; the save → load and export round trips; the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import svdadapt
from bounds import gamma, truncated_svd_error
from helpers import max_rel, out, raises_exactly, rel, token_ids, train
from moe_models import EXPERTS, abs_product, base_of, covariances, delta, moe, stored, wrappers

RANK, ALPHA = 2, 4
IDS = token_ids(2, 9, 5, vocab=64)
# layer 0's gate_up_proj rank 5 and every down_proj rank 3 (two nested wrappers of one module, two ranks), an
# alpha for the down_projs and for q_proj, a regular expression over layer 1's parameters and modules; the keys in
# sorted order (PEFT saves them sorted)
PATTERNS = [
    ({"down_proj": 3, "layers.0.mlp.experts.gate_up_proj": 5}, {"down_proj": 7.0, "q_proj": 1.0}),
    ({r"layers\.1\..*": 1, "q_proj": 4}, {}),
]


def _shapes(peft_model) -> dict[str, tuple]:
    """Every LoRA layer (a ParamWrapper by its key) -> (r, scaling, lora_A shape, lora_B shape)."""
    found = {}
    for n, m in peft_model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            key = f"{n.replace('.base_layer', '')}.{m.parameter_name}" if hasattr(m, "parameter_name") else n
            found[key] = (m.r["default"], m.scaling["default"], tuple(m.lora_A["default"].weight.shape),
                          tuple(m.lora_B["default"].weight.shape))
    return found


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("rank_pattern, alpha_pattern", PATTERNS)
def test_peft_builds_the_same_adapters(family, rank_pattern, alpha_pattern):
    """PEFT's own LoraConfig with the same patterns gives every wrapper and layer the same rank, scaling and
    lora_A / lora_B shapes as svdadapt's wrap (whose factors PEFT's shapes then hold)."""
    model = moe(family)
    pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                       target_parameters=EXPERTS, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                       progress=False)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    ours, theirs = _shapes(pm), _shapes(peft)
    assert ours == theirs and len(ours) == 2 * 2 + 2 * 2
    key = "model.layers.0.mlp.experts.gate_up_proj"
    if "down_proj" in rank_pattern:  # the nested wrappers of one module: 5 and 3 (E = 4 experts)
        assert ours[key][2] == (4 * 5, 16) and ours["model.layers.0.mlp.experts.down_proj"][2][0] == 4 * 3


@pytest.mark.parametrize("method", ["pissa", "milora", "corda"])
def test_exact_at_init_with_patterns(method):
    model = moe("mixtral")
    kw = {"calibration": covariances(model)} if method == "corda" else {}
    rank_pattern, alpha_pattern = PATTERNS[0]
    pm = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, alpha=ALPHA, target_parameters=EXPERTS,
                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, progress=False, **kw)
    # two fp32 forwards (W·x vs base·x + B·(A·x)) through 2 blocks and the head: ~√n·u per layer (as test_wrap)
    assert max_rel(out(pm, IDS), out(model, IDS)) <= 1e-5
    assert pm.svdadapt.rank_pattern == rank_pattern and pm.svdadapt.alpha_pattern == alpha_pattern


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_each_expert_is_its_truncated_svd_at_the_pattern_rank(method):
    """Expert e of parameter k: PEFT's delta s_k·B_e·A_e is the brute-force fp64 truncation [W_e]_{r_k} at the
    pattern's rank r_k (top for PiSSA, bottom for MiLoRA), within the fp32 SVD's bound at the cut; base + delta
    = W_e up to the fp32 addmm."""
    model = moe("qwen3_moe", seed=2)
    rank_pattern = {"down_proj": 3, "layers.0.mlp.experts.gate_up_proj": 5}
    pm = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, alpha=ALPHA, target_modules=[],
                       target_parameters=EXPERTS, rank_pattern=rank_pattern, progress=False)
    want = {"model.layers.0.mlp.experts.gate_up_proj": 5, "model.layers.1.mlp.experts.gate_up_proj": RANK,
            "model.layers.0.mlp.experts.down_proj": 3, "model.layers.1.mlp.experts.down_proj": 3}
    largest = method == "pissa"
    for key, w in wrappers(pm).items():
        r = want[key]
        assert w.r["default"] == r and w.scaling["default"] == ALPHA / r
        W, D, base, absBA = stored(model, key), delta(w), base_of(w), abs_product(w)
        for e in range(W.shape[0]):
            U, S, Vh = torch.linalg.svd(W[e], full_matrices=False)
            keep = slice(0, r) if largest else slice(S.numel() - r, S.numel())
            best = (U[:, keep] * S[keep]) @ Vh[keep]
            assert rel(D[e], best) <= truncated_svd_error(W[e].float(), r, largest, S=S) / float(best.norm()), (key, e)
            # ≤ γ_{r+2}·(|W| + s·|B|·|A|) for the residual's addmm (Higham 3.13) + γ_r·s·|B|·|A| for PEFT's delta
            err = (base[e] + D[e] - W[e]).abs()
            assert bool((err <= gamma(r + 2) * (W[e].abs() + absBA[e]) + gamma(r) * absBA[e]).all()), (key, e)


def test_save_load_and_export_round_trip(tmp_path):
    """A trained adapter with per-parameter ranks: load is bit-identical, and PEFT loads the saved directory
    and the export_lora one on the original model (the rank-2r adapter, each pattern entry doubled)."""
    rank_pattern, alpha_pattern = PATTERNS[0]
    pm = svdadapt.wrap(moe("mixtral"), "pissa", rank=RANK, alpha=ALPHA, target_parameters=EXPERTS,
                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, progress=False)
    pm = train(pm, IDS, steps=5)
    want = out(pm, IDS)
    assert rel(want, out(moe("mixtral"), IDS)) > 1e-2  # a "moved by more than" check: training moved it
    svdadapt.save(pm, tmp_path / "s")
    torch.manual_seed(999)  # another global RNG state: load draws nothing
    loaded = svdadapt.load(moe("mixtral"), tmp_path / "s", progress=False)
    assert torch.equal(out(loaded, IDS), want)
    sa, sb = pm.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _shapes(loaded) == _shapes(pm)
    svdadapt.export_lora(pm, tmp_path / "e")
    for d in ("s", "e"):  # fp32 application of s·(B·A − B₀·A₀) to W instead of s·B·A to W_res (as test_export)
        vanilla = PeftModel.from_pretrained(moe("mixtral"), tmp_path / d)
        assert rel(out(vanilla, IDS), want) < 1e-4
        assert vanilla.peft_config["default"].rank_pattern == {k: 2 * v for k, v in rank_pattern.items()}


def test_errors():
    model = moe("mixtral")
    with raises_exactly(ValueError, "rank_pattern['down_proj'] = 13 exceeds min(out, in) = 12 of target parameter "
                        "'model.layers.0.mlp.experts.down_proj' (each expert 16x12)"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_modules=[], target_parameters=EXPERTS,
                      rank_pattern={"down_proj": 13}, progress=False)
    # a module path alone is not a parameter target's key: PEFT ignores such a key (with a warning)
    with raises_exactly(ValueError, "rank_pattern keys ['mlp.experts'] match no targeted module (a key matches a "
                        "module whose full name ends in it, at a '.' boundary, as a regular expression; a target "
                        "parameter by its key '<module>.<param>', e.g. 'model.layers.0.mlp.experts.down_proj', as "
                        "PEFT matches it)"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_parameters=EXPERTS, rank_pattern={"mlp.experts": 3},
                      progress=False)
    with raises_exactly(ValueError, "alpha_pattern keys 'down_proj' (3.0) and '.*_proj' (2.0) both match module "
                        "'model.layers.0.mlp.experts.down_proj': the first applies, but PEFT saves the keys sorted "
                        "and on reload '.*_proj' would; give the keys in sorted order, or make them match "
                        "disjoint modules"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_modules=[], target_parameters=EXPERTS,
                      alpha_pattern={"down_proj": 3.0, ".*_proj": 2.0}, progress=False)
    assert not svdadapt.modules.targets.is_peft(model)  # nothing was touched

"""The merge diagnostic (docs/methods.md, the loss diagnostic) against a direct computation, and its behaviour
in slack."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis_helpers import recipe, tiny_trio, weights
from langmerge.analysis import analyze, module_type, tensor_tally
from langmerge.errors import LangmergeError
from langmerge.methods import fused_cpu, get_method
from langmerge.methods.kernels import TensorParameters

SLACKS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1000.0]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(params=["reference", "fused"])
def kernel(request, monkeypatch):
    """Run a test through the torch steps and through the fused CPU kernel (which takes tensors of any size here)."""
    monkeypatch.setattr(fused_cpu, "MIN_NUMEL", 1 << 62 if request.param == "reference" else 1)
    return request.param


def direct(base, inputs, weights_, densities, slack, protected):
    """The diagnostic written out from the definition: topk trim, weighted vote, counts (float64)."""
    trimmed = []
    for x, d in zip(inputs, densities):
        t = (x - base).double().reshape(-1)
        k = max(1, int(d * t.numel())) if d < 1 else t.numel()
        keep = torch.zeros_like(t, dtype=torch.bool)
        keep[torch.topk(t.abs(), k).indices] = True
        trimmed.append(torch.where(keep, t, torch.zeros_like(t)))
    v = [w * t for w, t in zip(weights_, trimmed)]
    vote = sum((1 + slack if p else 1.0) * vi for vi, p in zip(v, protected))
    g = torch.where(vote >= 0, 1.0, -1.0).double()
    out = []
    for t, vi in zip(trimmed, v):
        kept = t != 0
        lost = kept & (torch.sign(vi) != g)
        out.append(
            {
                "kept": int(kept.sum()),
                "lost": int(lost.sum()),
                "mass_loss": float(t.abs()[lost].sum() / t.abs()[kept].sum()),
            }
        )
    both = (trimmed[0] != 0) & (trimmed[1] != 0)
    conflict = int((both & (torch.sign(v[0]) != torch.sign(v[1]))).sum())
    return out, int(both.sum()), conflict


@pytest.mark.parametrize("weights_", [(1.0, 1.0), (0.7, 1.3), (1.0, -0.5)])
def test_tensor_tally_equals_direct_computation(weights_, kernel):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=g)
    inputs = [base + 0.3 * torch.randn(40, 30, generator=g), base + 0.1 * torch.randn(40, 30, generator=g)]
    p = TensorParameters(weights=list(weights_), normalize=True, densities=[0.4, 0.6], protected=[False, True])
    tally = tensor_tally(get_method("ties_sv"), base, inputs, p, SLACKS)
    for s, slack in enumerate(SLACKS):
        models, both, conflict = direct(base, inputs, weights_, [0.4, 0.6], slack, [False, True])
        for i, m in enumerate(models):
            assert tally.kept[i] == m["kept"]
            assert tally.lost[s, i] == m["lost"], (slack, i)
            assert tally.mass_loss()[s, i] == pytest.approx(m["mass_loss"], rel=1e-5, abs=1e-9)
        assert (tally.both_kept[0], tally.conflicts[0]) == (both, conflict)
    for i, x in enumerate(inputs):
        assert math.sqrt(tally.squared_norm[i]) == pytest.approx(
            float(torch.linalg.vector_norm((x - base).double())), rel=1e-5
        )


def test_a_tensor_of_several_work_items_sums_them_exactly(kernel):
    # 700 x 400 entries: two of the fused kernel's work items (262,144 entries each), tallied by the threads
    g = torch.Generator().manual_seed(1)
    base = torch.randn(700, 400, generator=g)
    inputs = [base + 0.3 * torch.randn(700, 400, generator=g), base + 0.1 * torch.randn(700, 400, generator=g)]
    p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.4, 0.6], protected=[False, True])
    tally = tensor_tally(get_method("ties_sv"), base, inputs, p, [0.0, 2.0])
    for s, slack in enumerate([0.0, 2.0]):
        models, both, conflict = direct(base, inputs, [1.0, 1.0], [0.4, 0.6], slack, [False, True])
        assert [int(tally.kept[i]) for i in range(2)] == [m["kept"] for m in models]
        assert [int(tally.lost[s, i]) for i in range(2)] == [m["lost"] for m in models]
        assert (tally.both_kept[0], tally.conflicts[0]) == (both, conflict)


def test_fused_tally_equals_the_reference_on_magnitudes_tied_at_the_trim_boundary(monkeypatch):
    # Entries of a few magnitudes only, so many tie at each model's trim threshold and the exact selection
    # keeps the first of them (by index) up to a cutoff; chunks of 7 rows (3,500 entries: not a multiple of the
    # fused kernel's tiles, each chunk at another offset) over more than one work item, in bfloat16.
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(601, 500, dtype=torch.bfloat16)
    inputs = [torch.randint(-3, 4, (601, 500), generator=g).to(torch.bfloat16) * s for s in (1.0, 0.5)]
    p = TensorParameters(weights=[0.7, 1.3], normalize=True, densities=[0.3, 0.55], protected=[False, True])
    tallies = {}
    for kernel, min_numel in (("reference", 1 << 62), ("fused", 1)):
        monkeypatch.setattr(fused_cpu, "MIN_NUMEL", min_numel)
        tallies[kernel] = tensor_tally(get_method("ties_sv"), base, inputs, p, [0.0, 1.0], chunk_bytes=7 * 500 * 2)
    ref, fused = tallies["reference"], tallies["fused"]
    assert fused.kept.tolist() == ref.kept.tolist() and fused.lost.tolist() == ref.lost.tolist()
    assert (fused.both_kept.tolist(), fused.conflicts.tolist()) == (ref.both_kept.tolist(), ref.conflicts.tolist())
    assert fused.kept.tolist() == [int(0.3 * base.numel()), int(0.55 * base.numel())]  # ties cut exactly at k
    for name in ("kept_mass", "lost_mass", "squared_norm"):  # float64 sums, added in another order
        assert getattr(fused, name) == pytest.approx(getattr(ref, name), rel=1e-12), name


def test_whole_model_totals_equal_direct_computation_per_tensor(trio, kernel):
    report = analyze(recipe(trio), slacks=[0.0, 1.0], progress=False)
    base, ct, sft = (weights(trio[k]) for k in ("base", "ct", "sft"))
    expect_kept, expect_lost = [0, 0], [[0, 0], [0, 0]]
    for name in base:
        for s, slack in enumerate([0.0, 1.0]):
            models, _, _ = direct(base[name], [ct[name], sft[name]], (1.0, 1.0), [0.5, 0.5], slack, [False, True])
            for i, m in enumerate(models):
                expect_lost[s][i] += m["lost"]
                if s == 0:
                    expect_kept[i] += m["kept"]
            assert list(report.by_tensor[name].lost[s]) == [m["lost"] for m in models]
    assert list(report.total.kept) == expect_kept
    assert report.total.lost.tolist() == expect_lost
    assert report.total.numel == sum(t.numel() for t in base.values())
    # Every tensor is in exactly one layer bucket and one module bucket.
    for groups in (report.by_layer, report.by_module):
        assert sum(t.lost for t in groups.values()).tolist() == expect_lost
        assert sum(t.tensors for t in groups.values()) == len(base)
    assert set(report.by_layer) == {"0", "1", "other"}
    assert report.skipped == {}


def test_protected_loss_rate_non_increasing_in_slack_and_ties_at_zero(trio, kernel):
    sv = analyze(recipe(trio), slacks=SLACKS, progress=False)
    rates = sv.total.loss_rate()[:, 1]  # the SFT model (protected)
    assert all(a >= b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > 0.05 and rates[-1] < rates[0] / 5  # the slack does protect it on this trio
    ct_rates = sv.total.loss_rate()[:, 0]
    assert all(a <= b for a, b in zip(ct_rates, ct_rates[1:]))
    # Per layer too: the protected model never loses more with more slack.
    for tally in sv.by_layer.values():
        r = tally.loss_rate()[:, 1]
        assert all(a >= b for a, b in zip(r, r[1:]))
    ties = analyze(recipe(trio, "ties"), progress=False)
    assert ties.total.lost[0].tolist() == sv.total.lost[0].tolist()
    assert ties.total.lost_mass[0].tolist() == sv.total.lost_mass[0].tolist()
    # A ties_sv recipe at its own slack 0 is TIES too; --protect on a ties recipe analyses TIES-SV's vote.
    own = analyze(recipe(trio, slack=0.0), progress=False)
    assert own.slack_labels == [0.0] and own.total.lost[0].tolist() == ties.total.lost[0].tolist()
    as_sv = analyze(recipe(trio, "ties"), slacks=[2.0], protect=["sft"], progress=False)
    assert as_sv.total.lost[0].tolist() == sv.total.lost[SLACKS.index(2.0)].tolist()


def test_bfloat16_recipe_is_analysed_in_its_compute_dtype(trio, kernel):
    report = analyze(recipe(trio, dtype="bfloat16"), slacks=[0.0], progress=False)
    base, ct, sft = (weights(trio[k]) for k in ("base", "ct", "sft"))
    name = "model.layers.1.mlp.down_proj.weight"
    b, inputs = base[name].bfloat16(), [ct[name].bfloat16(), sft[name].bfloat16()]
    p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, 0.5], protected=[False, True])
    expect = tensor_tally(get_method("ties_sv"), b, inputs, p, [0.0])
    assert report.by_tensor[name].lost.tolist() == expect.lost.tolist()


def test_module_types():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj"
    assert module_type("model.layers.0.mlp.up_proj.weight") == "mlp.up_proj"
    assert module_type("model.layers.0.input_layernorm.weight") == "input_layernorm"
    assert module_type("model.embed_tokens.weight") == "embed_tokens"
    assert module_type("lm_head.weight") == "lm_head"
    assert module_type("model.norm.weight") == "norm"
    assert module_type("transformer.h.2.attn.c_attn.bias") == "attn.c_attn.bias"


def test_bad_input_fails_before_reading_tensors(trio, tmp_path):
    with pytest.raises(LangmergeError, match="task_arithmetic.*no sign vote"):
        analyze(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(trio["base"]),
                "models": [{"model": str(trio["ct"]), "parameters": {"weight": 1.0}}],
            },
            progress=False,
        )
    with pytest.raises(LangmergeError, match="needs a protected model"):
        analyze(recipe(trio, "ties"), slacks=[0.0, 1.0], progress=False)
    with pytest.raises(LangmergeError, match="--protect 'nope'"):
        analyze(recipe(trio, "ties"), protect=["nope"], progress=False)
    with pytest.raises(LangmergeError, match="finite number"):
        analyze(recipe(trio), slacks=[-1.0], progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_input_holding_nan_or_inf_is_refused_naming_model_and_tensor(trio, tmp_path, kernel, bad):
    broken = tmp_path / "ct_bad"
    shutil.copytree(trio["ct"], broken)
    state = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][3, 5] = bad
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LangmergeError, match=f"model {broken}: tensor '{name}' contains NaN or Inf"):
        analyze(recipe(trio, ct=broken), progress=False)

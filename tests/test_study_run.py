"""End to end: a tiny study writes every artefact; caching reruns only what a change touches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from langmerge.evaluation.statistics import mcnemar_exact
from langmerge.study import load_study, run_study
from langmerge.study.report import findings
from study_helpers import done_markers, load_results, study_dict, write_inputs, write_study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_inputs(root)
    cfg = write_study(root / "study.yaml", study_dict(root, root / "out"))
    result = run_study(load_study(cfg), progress=False)
    return root, cfg, result


def test_every_artefact_is_written(finished):
    root, _, result = finished
    report = root / "out" / "report"
    for name in (
        "results.csv",
        "results.json",
        "report.md",
        "loss_rates.csv",
        "score_vs_tokens.png",
        "sft_loss_rate.png",
        "per_task.png",
    ):
        assert (report / name).is_file(), name
    doc = load_results(root / "out")
    rows = {(r["ct_tokens"], r["row"]): r for r in doc["rows"]}
    # every method and reference row at every budget has a test score in [0, 1]
    for budget in (300, 600, 1200):
        for row in ("base", "sft", "ct", "ct_sft", "wavg", "ties", "ties_sv", "ta", "swap"):
            score = rows[(budget, row)]["score"]
            assert score is not None and 0.0 <= score <= 1.0, (budget, row)
        for row in ("wavg", "ties", "ties_sv", "ta"):  # an untuned merge has a validation score too (finding 1)
            assert 0.0 <= rows[(budget, row)]["validation_score"] <= 1.0, (budget, row)
    assert len(doc["loss"]) == 3
    for r in doc["loss"]:
        assert 0.0 <= r["ties_sft_loss_rate"] <= 1.0
    assert [f["verdict"] for f in doc["findings"]] and all(
        f["verdict"] in ("reproduced", "contradicted", "inconclusive", "not testable") for f in doc["findings"]
    )
    for r in doc["rows"]:  # every score has its 95% interval around it
        low, high = r["score_ci"]
        assert low <= r["score"] <= high
    md = (report / "report.md").read_text()
    assert "| CT-then-SFT |" in md and "TIES-SV" in md and "**" in md
    assert "layer swapping" in md  # the layer_swap row, tuned over k_top, under its method's label
    assert rows[(300, "swap")]["tuned"]["parameters.k_top"] in (0, 1)


def test_ct_checkpoints_have_exact_budgets(finished):
    root, _, result = finished
    ct = result.plan.ct["ny"].folder(result.plan.study.out / "cache")
    for budget, folder in (
        (1200, ct / "model"),
        (300, ct / "model" / "tokens-300"),
        (600, ct / "model" / "tokens-600"),
    ):
        meta = json.loads((folder / "langmerge_training.json").read_text())
        assert meta["tokens"]["target"] == budget
        assert meta["tokens"]["replay"] == budget // 4


def test_slack_zero_ties_sv_equals_ties_loss_rate(finished):
    """Independent check of the analysis wiring: with slack 0 TIES-SV is TIES, so their loss rates agree."""
    root, _, result = finished
    doc = load_results(root / "out")
    for r in doc["loss"]:
        if r["ties_sv_slack"] == 0.0:
            assert r["ties_sv_sft_loss_rate"] == pytest.approx(r["ties_sft_loss_rate"])
        else:
            assert r["ties_sv_sft_loss_rate"] <= r["ties_sft_loss_rate"]


def test_rerun_is_all_cached_and_a_change_reruns_only_its_dependants(finished, tmp_path):
    root, cfg, first = finished
    before = done_markers(root / "out" / "cache")
    again = run_study(load_study(cfg), progress=False)
    assert again.ran == []
    assert done_markers(root / "out" / "cache") == before
    d = study_dict(root, root / "out")
    d["methods"]["ties"]["space"] = {"parameters.density": {"values": [0.3]}}
    changed = run_study(load_study(write_study(tmp_path / "changed.yaml", d)), progress=False)
    assert sorted(changed.ran) == sorted(
        [f"tune ties ny {b}" for b in ("300", "600", "1,200")]
        + [f"eval ties ny {b}" for b in ("300", "600", "1,200")]
        + [f"analyze ny {b}" for b in ("300", "600", "1,200")]
    )


def test_only_and_force_rerun_just_the_matching_step(finished):
    root, cfg, _ = finished
    before = done_markers(root / "out" / "cache")
    result = run_study(load_study(cfg), only=["eval ct ny 300"], force=True, progress=False)
    assert result.ran == ["eval ct ny 300"]
    after = done_markers(root / "out" / "cache")
    changed = [k for k in before if after.get(k) != before[k]]
    assert len(changed) == 1 and changed[0].startswith("eval-")


def test_dry_run_lists_steps_and_their_state(finished):
    root, cfg, result = finished
    done = subprocess.run(
        [sys.executable, "-m", "langmerge", "study", str(cfg), "--dry-run"], capture_output=True, text=True, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(result.plan.steps)
    assert all(line.split()[0] in ("done", "to") for line in lines)
    assert any("tune ties_sv ny 1,200" in line for line in lines)


def _ones(k: int, n: int = 40) -> list[int]:
    return [1] * k + [0] * (n - k)


def test_findings_from_hand_made_outcomes(finished):
    """The three verdicts on per-example outcomes whose tests are worked out by hand."""
    _, _, result = finished
    right = {  # (budget, row) -> examples right of 40 (the first k): nested, so every difference is one-sided
        (300, "ct_sft"): 10,
        (300, "wavg"): 30,
        (300, "ties"): 10,
        (300, "ties_sv"): 20,
        (600, "ct_sft"): 10,
        (600, "wavg"): 10,
        (600, "ties"): 30,
        (600, "ties_sv"): 35,
        (1200, "ct_sft"): 10,
        (1200, "wavg"): 10,
        (1200, "ties"): 30,
        (1200, "ties_sv"): 35,
    }
    validation = {"wavg": 0.9, "ties": 0.5, "ties_sv": 0.4}

    def data(right, loss_sv=(0.01, 0.02, 0.05)):
        rows = [
            {
                "language": "ny",
                "ct_tokens": b,
                "row": r,
                "method": r,
                "score": k / 40,
                "validation_score": validation.get(r),
            }
            for (b, r), k in right.items()
        ]
        outcomes = {("ny", b, r): [_ones(k)] for (b, r), k in right.items()}
        loss = [
            {
                "language": "ny",
                "ct_tokens": b,
                "ties_sft_loss_rate": t,
                "ties_sv_sft_loss_rate": v,
                "ties_sv_slack": 1.0,
            }
            for b, t, v in zip((300, 600, 1200), (0.02, 0.05, 0.09), loss_sv)
        ]
        return {"rows": rows, "outcomes": outcomes, "loss": loss}

    found = findings(result.plan, data(right))
    # 1: weighted averaging (best validation score) is right on 20 examples CT-then-SFT gets wrong, and
    # never the reverse: exact McNemar p = 2 / 2^20.
    assert found[0]["verdict"] == "reproduced"
    assert found[0]["test"]["p_value"] == pytest.approx(mcnemar_exact(20, 0)) == pytest.approx(2 / 2**20)
    assert found[0]["test"]["difference"] == pytest.approx(0.5) and found[0]["test"]["discordant"] == 20
    assert "weighted averaging (best validation score) 75.0 vs CT-then-SFT 25.0" in found[0]["evidence"][0]
    # 2: TIES gains 20 of 40 examples over the first doubling (300 -> 600), none over the last: the
    # per-example difference of the gains is 1 on 20 examples, 0 on 20 (mean 0.5, never 0 in resampling).
    assert found[1]["verdict"] == "reproduced"
    assert found[1]["test"]["saturation"]["difference"] == pytest.approx(0.5)
    assert found[1]["test"]["first_gain"]["p_value"] == pytest.approx(2 / 2**20)
    # 3: TIES-SV is right on 10, 5 and 5 examples more (35 discordant pairs, all its way) with a lower
    # loss rate in every cell: reproduced; pooled exact p = 2 / 2^20 (20 wins in all).
    assert found[2]["verdict"] == "reproduced"
    assert found[2]["test"]["discordant"] == 20 and found[2]["test"]["p_value"] == pytest.approx(2 / 2**20)
    assert found[2]["evidence"][0].startswith("SFT loss rate lower in 3 of 3 cells")
    # A higher score without a lower loss rate is not the paper's mechanism: inconclusive.
    assert findings(result.plan, data(right, loss_sv=(0.03, 0.06, 0.09)))[2]["verdict"] == "inconclusive"

    # The reverse of each finding is significant: contradicted.
    reverse = dict(right)
    reverse[(300, "ct_sft")], reverse[(300, "wavg")] = 30, 10
    reverse[(300, "ties")], reverse[(600, "ties")] = 10, 10  # no gain first, 20 examples last
    reverse[(1200, "ties")] = 30
    reverse.update({(b, "ties_sv"): 0 for b in (300, 600, 1200)})
    found = findings(result.plan, data(reverse))
    assert [f["verdict"] for f in found] == ["contradicted", "contradicted", "contradicted"]
    # No difference at all: inconclusive, p = 1.
    same = {k: 20 for k in right}
    found = findings(result.plan, data(same))
    assert [f["verdict"] for f in found] == ["inconclusive"] * 3
    assert found[0]["test"]["p_value"] == 1.0

"""The study's report: results.csv/.json, report.md (the paper's main table), plots, and the three findings.

Everything here is computed from the finished steps' outputs. Every score carries a 95% bootstrap
interval (examples resampled within each task); every comparison behind a finding is a paired test
on the same test examples (``langmerge.evaluation.statistics``), and a finding is "reproduced" only
when its test is significant at 5% in the paper's direction, "contradicted" when it is significant
the other way, "inconclusive" otherwise.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from langmerge.evaluation import statistics as st
from langmerge.io.output import atomic_output_dir
from langmerge.methods.registry import get_method
from langmerge.study.config import REFERENCE_ROWS
from langmerge.study.plan import Plan
from langmerge.study.steps import DONE, Context, StepRecord
from langmerge.training.data import format_token_count

ROW_LABELS = {"base": "base", "sft": "SFT (English)", "ct": "CT", "ct_sft": "CT-then-SFT"}
LEVEL = 0.05  # significance level of the findings' tests


def row_names(plan: Plan) -> list[str]:
    return [*REFERENCE_ROWS, *plan.study.spec.methods]


def row_label(plan: Plan, row: str) -> str:
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    m = plan.study.spec.methods[row]
    return m.label or get_method(m.merge_method).label


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _resamples(plan: Plan) -> int:
    return plan.study.spec.evaluation.resamples


def solving_groups(score: dict) -> list[list[int]]:
    """The per-example outcomes of the tasks a score averages, one list per task, in task order."""
    return [score["tasks"][name]["outcomes"] for name in sorted(score["score_tasks"])]


def _entry(plan: Plan, score: dict | None) -> dict:
    """Score, its interval and each task's main metric with its interval, from an eval step's score.json."""
    if score is None:
        return {"score": None, "score_ci": None, "tasks": {}}
    resamples = _resamples(plan)
    groups = solving_groups(score)
    out = {
        "score": score["score"],
        "score_ci": st.bootstrap_ci(groups, resamples=resamples) if groups else None,
        "tasks": {},
    }
    for name, t in score["tasks"].items():
        ci: tuple[float, float] | None
        if "outcomes" in t:
            ci = st.bootstrap_ci([t["outcomes"]], resamples=resamples)
        else:
            ci = st.bootstrap_ratio_ci(t["bits"], t["characters"], resamples=resamples) if t.get("bits") else None
        out["tasks"][name] = {
            "metric": t["metric"],
            "value": t["value"],
            "ci": ci,
            "kind": t["kind"],
            "n": t["n"],
            **({"lang_share": t["lang_share"]} if "lang_share" in t else {}),
        }
    return out


def _score_of(step, ctx: Context) -> dict | None:
    return _read(step.folder(ctx.cache) / "score.json") if step is not None and step.done(ctx.cache) else None


def collect(plan: Plan, ctx: Context) -> dict:
    """Scores per (language, budget, row) with intervals, English scores, seed repeats and loss rates."""
    rows, outcomes = [], {}
    for lang in plan.study.spec.languages:
        for budget in plan.study.budgets(lang):
            for row in row_names(plan):
                step = plan.evals.get((lang, None if row in ("base", "sft") else budget, row))
                score = _score_of(step, ctx)
                entry = {
                    "language": lang,
                    "ct_tokens": budget,
                    "row": row,
                    "method": row_label(plan, row),
                    **_entry(plan, score),
                }
                if score is not None:
                    outcomes[(lang, budget, row)] = solving_groups(score)
                tune = plan.tunes.get((lang, budget, row))
                if tune is not None and tune.done(ctx.cache):
                    info = json.loads((tune.folder(ctx.cache) / DONE).read_text())["info"]
                    entry["tuned"] = info.get("best")
                    entry["validation_score"] = info.get("validation_score")
                rows.append(entry)
    english = []
    for (seed, row), step in plan.english.items():
        english.append({"row": row, "method": ROW_LABELS[row], "seed": seed, **_entry(plan, _score_of(step, ctx))})
    seeded = []
    main_seed = plan.study.spec.ct_training.seed
    for (lang, seed, row), step in plan.seeded.items():
        seeded.append(
            {
                "language": lang,
                "seed": seed,
                "row": row,
                "method": row_label(plan, row),
                **_entry(plan, _score_of(step, ctx)),
            }
        )
    for lang in sorted({k[0] for k in plan.seeded}):
        b0 = plan.study.budgets(lang)[0]
        rows_here = {k[2] for k in plan.seeded if k[0] == lang}
        for r in rows:
            if r["language"] == lang and r["ct_tokens"] == b0 and r["row"] in rows_here:
                seeded.append(
                    {
                        "language": lang,
                        "seed": main_seed,
                        "row": r["row"],
                        "method": r["method"],
                        "score": r["score"],
                        "score_ci": r["score_ci"],
                        "tasks": r["tasks"],
                    }
                )
    losses = []
    for (lang, budget), step in plan.analyses.items():
        doc = _read(step.folder(ctx.cache) / "analysis.json") if step.done(ctx.cache) else None
        if doc:
            losses.append(
                {
                    "language": lang,
                    "ct_tokens": budget,
                    **{f"{role}_{k}": v for role, d in doc.items() for k, v in d.items()},
                }
            )
    return {"rows": rows, "english": english, "seeded": seeded, "loss": losses, "outcomes": outcomes}


def _row(data: dict, lang: str, budget: int, row: str) -> dict | None:
    return next((r for r in data["rows"] if (r["language"], r["ct_tokens"], r["row"]) == (lang, budget, row)), None)


def _score(data: dict, lang: str, budget: int, row: str) -> float | None:
    r = _row(data, lang, budget, row)
    return r["score"] if r else None


def _loss(data: dict, lang: str, budget: int) -> dict | None:
    return next((r for r in data["loss"] if (r["language"], r["ct_tokens"]) == (lang, budget)), None)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _with_ci(v: float | None, ci, scale: float = 100, digits: int = 1) -> str:
    if v is None:
        return "—"
    text = f"{scale * v:.{digits}f}"
    return text if not ci else f"{text} ({scale * ci[0]:.{digits}f}–{scale * ci[1]:.{digits}f})"


def _tokens(n: int) -> str:
    return format_token_count(n)


def _test_text(r: st.PairedResult, points: bool = True) -> str:
    scale, unit = (100, " points") if points else (1, "")
    extra = f", {r.discordant} of {r.n} examples discordant" if r.discordant is not None else f", {r.n} examples"
    return (
        f"difference {scale * r.difference:+.1f}{unit} (95% CI {scale * r.ci[0]:+.1f} to {scale * r.ci[1]:+.1f}), "
        f"{r.test} p = {r.p_value:.3g}{extra}"
    )


def findings(plan: Plan, data: dict) -> list[dict]:
    """The paper's three findings as paired tests on the test examples."""
    s = plan.study.spec
    merges = list(s.methods)
    resamples = _resamples(plan)
    outcomes = data["outcomes"]
    out = []

    # 1. Merging beats CT-then-SFT at the smallest budget: the merge with the best validation score
    # (chosen without looking at the test examples) against CT-then-SFT, exact sign-flip test.
    lines, pooled_a, pooled_b = [], [], []
    for lang in s.languages:
        b = plan.study.budgets(lang)[0]
        if (lang, b, "ct_sft") not in outcomes:
            continue
        # a merge with outcomes has its row (collect)
        candidates = [(m, r) for m in merges if (lang, b, m) in outcomes and (r := _row(data, lang, b, m)) is not None]
        candidates = [(m, r) for m, r in candidates if r.get("validation_score") is not None] or candidates
        if not candidates:
            continue
        best = max(candidates, key=lambda mr: mr[1].get("validation_score") or -math.inf)[0]
        a, c = outcomes[(lang, b, best)], outcomes[(lang, b, "ct_sft")]
        test = st.sign_flip_test(a, c, resamples=resamples)
        pooled_a += a
        pooled_b += c
        lines.append(
            f"{lang} at {_tokens(b)} CT tokens: {row_label(plan, best)} (best validation score) "
            f"{_pct(_score(data, lang, b, best))} vs CT-then-SFT {_pct(_score(data, lang, b, 'ct_sft'))}: "
            f"{_test_text(test)} -> {st.verdict(test, LEVEL)}"
        )
        others = []
        for m in merges:
            if m != best and (lang, b, m) in outcomes:
                t = st.sign_flip_test(outcomes[(lang, b, m)], c, resamples=resamples)
                others.append(f"{row_label(plan, m)} {100 * t.difference:+.1f} (p = {t.p_value:.3g})")
        if others:
            lines.append(f"{lang}, the other merges against CT-then-SFT: " + "; ".join(others))
    verdict, test_doc = "not testable", None
    if pooled_a:
        pooled = st.sign_flip_test(pooled_a, pooled_b, resamples=resamples)
        verdict, test_doc = st.verdict(pooled, LEVEL), pooled.to_json()
        if len([ln for ln in lines if " CT tokens: " in ln]) > 1:
            lines.insert(0, f"all languages pooled: {_test_text(pooled)}")
    out.append(
        {
            "finding": "Merging beats CT-then-SFT when CT data is scarcest (smallest budget)",
            "verdict": verdict,
            "test": test_doc,
            "evidence": lines,
        }
    )

    # 2. TIES saturates: it gains more per doubling of CT tokens over the first budget interval than
    # over the last. Per example: (x1 - x0) / log2(b1 / b0) - (xk - x(k-1)) / log2(bk / b(k-1)), paired bootstrap.
    lines, pooled_d = [], []
    pooled_first: tuple[list[list[int]], list[list[int]]] = ([], [])  # the second budget's outcomes, the first's
    ties = s.analysis.ties if s.analysis else next((m for m in merges if s.methods[m].merge_method == "ties"), None)
    if ties is not None:
        for lang in s.languages:
            budgets = plan.study.budgets(lang)
            if len(budgets) < 3 or any((lang, b, ties) not in outcomes for b in budgets):
                continue
            x = [outcomes[(lang, b, ties)] for b in budgets]
            l_first, l_last = math.log2(budgets[1] / budgets[0]), math.log2(budgets[-1] / budgets[-2])
            d = [
                [(x1 - x0) / l_first - (xk - xj) / l_last for x0, x1, xj, xk in zip(g0, g1, gj, gk)]
                for g0, g1, gj, gk in zip(x[0], x[1], x[-2], x[-1])
            ]
            sat = st.paired_bootstrap(d, resamples=resamples)
            first = st.sign_flip_test(x[1], x[0], resamples=resamples)
            last = st.sign_flip_test(x[-1], x[-2], resamples=resamples)
            pooled_d += d
            pooled_first[0].extend(x[1])
            pooled_first[1].extend(x[0])
            series = ", ".join(f"{_tokens(b)}: {_pct(_score(data, lang, b, ties))}" for b in budgets)
            rates = [_loss(data, lang, b) for b in budgets]
            loss_text = ", ".join(
                f"{_tokens(b)}: {_pct(r['ties_sft_loss_rate'])}%" for b, r in zip(budgets, rates) if r
            )
            lines.append(f"{lang}: TIES score {series}")
            lines.append(
                f"{lang}: gain over the first interval ({_tokens(budgets[0])} -> {_tokens(budgets[1])}): "
                f"{_test_text(first)}; over the last ({_tokens(budgets[-2])} -> {_tokens(budgets[-1])}): "
                f"{_test_text(last)}"
            )
            lines.append(
                f"{lang}: gain per doubling, first minus last interval: {_test_text(sat)}"
                + (f"; SFT loss rate under TIES {loss_text}" if loss_text else "")
            )
    verdict, test_doc = "not testable", None
    if pooled_d:
        sat = st.paired_bootstrap(pooled_d, resamples=resamples)
        first = st.sign_flip_test(*pooled_first, resamples=resamples)
        test_doc = {"saturation": sat.to_json(), "first_gain": first.to_json()}
        if st.verdict(sat, LEVEL) == "contradicted":
            verdict = "contradicted"
        elif st.verdict(sat, LEVEL) == "reproduced" and st.verdict(first, LEVEL) == "reproduced":
            verdict = "reproduced"
        else:
            verdict = "inconclusive"
        lines.append(
            "reproduced needs both a significant gain over the first interval and a significantly "
            "smaller gain per doubling over the last"
        )
    out.append(
        {
            "finding": "TIES saturates as CT tokens grow (it gains more per doubling of CT tokens early than late)",
            "verdict": verdict,
            "test": test_doc,
            "evidence": lines,
        }
    )

    # 3. TIES-SV lowers the SFT loss rate and raises the score compared with TIES, at each
    # (language, budget); the verdict pools every cell into one sign-flip test.
    lines, pooled_a, pooled_b, lower, cells = [], [], [], 0, 0
    if s.analysis is not None:
        for lang in s.languages:
            for b in plan.study.budgets(lang):
                keys = [(lang, b, s.analysis.ties_sv), (lang, b, s.analysis.ties)]
                loss = _loss(data, lang, b)
                if loss is None or any(k not in outcomes for k in keys):
                    continue
                a, c = outcomes[keys[0]], outcomes[keys[1]]
                t = st.sign_flip_test(a, c, resamples=resamples)
                cells += 1
                lower += loss["ties_sv_sft_loss_rate"] < loss["ties_sft_loss_rate"]
                pooled_a += a
                pooled_b += c
                lines.append(
                    f"{lang} {_tokens(b)}: SFT loss rate {_pct(loss['ties_sft_loss_rate'])}% (TIES) -> "
                    f"{_pct(loss['ties_sv_sft_loss_rate'])}% (TIES-SV, slack {loss['ties_sv_slack']}); "
                    f"score {_pct(_score(data, lang, b, s.analysis.ties))} -> "
                    f"{_pct(_score(data, lang, b, s.analysis.ties_sv))}: {_test_text(t)}"
                )
    verdict, test_doc = "not testable", None
    if cells:
        pooled = st.sign_flip_test(pooled_a, pooled_b, resamples=resamples)
        test_doc = pooled.to_json()
        verdict = st.verdict(pooled, LEVEL)
        if verdict == "reproduced" and 2 * lower <= cells:
            verdict = "inconclusive"  # a higher score without a lower loss rate is not the paper's mechanism
        lines.insert(
            0, f"SFT loss rate lower in {lower} of {cells} cells; score, all cells pooled: {_test_text(pooled)}"
        )
    out.append(
        {
            "finding": "TIES-SV lowers the SFT loss rate and raises the score compared with TIES",
            "verdict": verdict,
            "test": test_doc,
            "evidence": lines,
        }
    )
    return out


def language_gain(plan: Plan, data: dict) -> list[dict]:
    """Held-out bits per character of the base and of CT at each budget: does CT teach the language?"""
    out = []
    for lang in plan.study.spec.languages:
        budgets = plan.study.budgets(lang)
        base = _row(data, lang, budgets[0], "base")
        for task, t in (base or {}).get("tasks", {}).items():
            if t["kind"] != "bits_per_char":
                continue
            curve = []
            for b in budgets:
                ct = _row(data, lang, b, "ct")
                v = (ct or {}).get("tasks", {}).get(task)
                if v:
                    curve.append(
                        {"ct_tokens": b, "bpc": v["value"], "ci": v["ci"], "below_base": v["value"] < t["value"]}
                    )
            out.append({"language": lang, "task": task, "base": t["value"], "base_ci": t["ci"], "ct": curve})
    return out


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "—"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * sd:.1f} (range {100 * min(values):.1f}–{100 * max(values):.1f})"


def markdown(plan: Plan, data: dict, found: list[dict], gains: list[dict], timings: dict) -> str:
    s = plan.study.spec
    cols = [(lang, b) for lang in s.languages for b in plan.study.budgets(lang)]
    rows = row_names(plan)
    best = {}
    for c in cols:
        values = [v for v in (_score(data, *c, r) for r in rows) if v is not None]
        best[c] = max(values) if values else None
    lines = [
        f"# Study: {s.name}",
        "",
        "Score: mean of the test tasks' accuracy / exact match, in percent (higher is better), with its "
        "95% bootstrap interval (examples resampled within each task); **bold** is the best of each column. "
        "Base and SFT do not depend on the CT budget.",
        "",
        "| method | " + " | ".join(f"{lang} {_tokens(b)}" for lang, b in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for r in rows:
        cells = []
        for c in cols:
            entry = _row(data, *c, r)
            text = _with_ci(entry["score"], entry["score_ci"]) if entry else "—"
            cells.append(f"**{text}**" if entry and entry["score"] is not None and entry["score"] == best[c] else text)
        lines.append(f"| {row_label(plan, r)} | " + " | ".join(cells) + " |")
    sizes = {}
    for r in data["rows"]:
        for task, t in r["tasks"].items():
            sizes[(r["language"], task)] = t["n"]
    if sizes:
        lines += [
            "",
            "Test examples per task: " + ", ".join(f"{task} {n}" for (lang, task), n in sorted(sizes.items())) + ".",
        ]
    if data["english"]:
        tasks = sorted({t for r in data["english"] for t in r["tasks"]})
        lines += [
            "",
            "## English scores (the tasks the SFT data teaches, in English)",
            "",
            "| model | seed | score | " + " | ".join(tasks) + " |",
            "|---|---:|---:|" + "---:|" * len(tasks),
        ]
        for r in data["english"]:
            cells = [_with_ci(r["tasks"][t]["value"], r["tasks"][t]["ci"]) if t in r["tasks"] else "—" for t in tasks]
            seed = "" if r["row"] == "base" else str(r["seed"])
            lines.append(
                f"| {r['method']} | {seed} | {_with_ci(r['score'], r['score_ci'])} | " + " | ".join(cells) + " |"
            )
    if gains:
        lines += ["", "## Does CT teach the language? Bits per character on held-out text (lower is better)", ""]
        for g in gains:
            curve = ", ".join(f"{_tokens(p['ct_tokens'])}: {_with_ci(p['bpc'], p['ci'], 1, 3)}" for p in g["ct"])
            below = [p for p in g["ct"][1:] if p["below_base"]]
            lines.append(
                f"- {g['language']}, {g['task']}: base {_with_ci(g['base'], g['base_ci'], 1, 3)}; CT {curve}. "
                f"Below the base at {len(below)} of {max(len(g['ct']) - 1, 0)} budgets after the smallest."
            )
    if data["loss"]:
        lines += [
            "",
            "## SFT loss rate (share of the SFT model's kept entries lost to the sign vote)",
            "",
            "| language | CT tokens | TIES | TIES-SV | TIES-SV slack |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in data["loss"]:
            lines.append(
                f"| {r['language']} | {_tokens(r['ct_tokens'])} | {_pct(r['ties_sft_loss_rate'])}% | "
                f"{_pct(r['ties_sv_sft_loss_rate'])}% | {r['ties_sv_slack']} |"
            )
    lines += [
        "",
        "## The paper's findings at this scale",
        "",
        f"Each finding is a paired test on the same test examples: reproduced when significant at "
        f"{LEVEL:.0%} in the paper's direction, contradicted when significant the other way, inconclusive "
        "otherwise. Merges are tuned on the validation examples only.",
        "",
    ]
    for f in found:
        lines.append(f"- **{f['finding']}: {f['verdict']}.**")
        lines += [f"  - {e}" for e in f["evidence"]]
    if data["seeded"]:
        lines += [
            "",
            "## Seeds: the smallest budget's runs repeated",
            "",
            "The SFT run and the smallest-budget CT run (and what derives from them) trained again with other "
            "seeds (data order); the spread is the sample standard deviation over seeds.",
            "",
            "| language | method | "
            + " | ".join(f"seed {x}" for x in sorted({r["seed"] for r in data["seeded"]}))
            + " | mean ± sd |",
            "|---|---|" + "---:|" * (len({r["seed"] for r in data["seeded"]}) + 1),
        ]
        seeds = sorted({r["seed"] for r in data["seeded"]})
        for lang in s.languages:
            for row in row_names(plan):
                found_rows = {r["seed"]: r for r in data["seeded"] if r["language"] == lang and r["row"] == row}
                if not found_rows:
                    continue
                cells = [
                    _with_ci(found_rows[x]["score"], found_rows[x]["score_ci"]) if x in found_rows else "—"
                    for x in seeds
                ]
                values = [r["score"] for r in found_rows.values() if r["score"] is not None]
                lines.append(f"| {lang} | {row_label(plan, row)} | " + " | ".join(cells) + f" | {_spread(values)} |")
    task_cols = sorted({t for r in data["rows"] for t in r["tasks"]})
    if task_cols:
        lines += [
            "",
            "## Per task (accuracy / exact match in percent; bits per character as is), 95% intervals",
            "",
            "| language | CT tokens | method | " + " | ".join(task_cols) + " |",
            "|---|---:|---|" + "---:|" * len(task_cols),
        ]
        for r in data["rows"]:
            if r["score"] is None and not r["tasks"]:
                continue
            cells = []
            for k in task_cols:
                t = r["tasks"].get(k)
                if t is None:
                    cells.append("—")
                elif t["kind"] == "bits_per_char":
                    cells.append(_with_ci(t["value"], t["ci"], 1, 3))
                else:
                    cells.append(_with_ci(t["value"], t["ci"]))
            lines.append(f"| {r['language']} | {_tokens(r['ct_tokens'])} | {r['method']} | " + " | ".join(cells) + " |")
    if timings:
        lines += [
            "",
            "## Time per kind of step (when it ran, cached or not; CPU: user + system of all threads)",
            "",
            "| step | count | wall seconds | CPU seconds |",
            "|---|---:|---:|---:|",
        ]
        for kind, (count, seconds, cpu) in timings.items():
            lines.append(f"| {kind} | {count} | {seconds:.1f} | {cpu:.1f} |")
        total = [sum(v[i] for v in timings.values()) for i in (1, 2)]
        lines.append(f"| all | {sum(v[0] for v in timings.values())} | {total[0]:.1f} | {total[1]:.1f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib  # an optional dependency (langmerge[tune]), slow to import: only to draw the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(plan: Plan, data: dict, lang: str, row: str, value) -> tuple[list, list, list, list]:
    xs, ys, lo, hi = [], [], [], []
    for b in plan.study.budgets(lang):
        r = _row(data, lang, b, row)
        got = value(r) if r else None
        if got is None or got[0] is None:
            continue
        xs.append(b)
        ys.append(got[0])
        ci = got[1] or (got[0], got[0])
        lo.append(ci[0])
        hi.append(ci[1])
    return xs, ys, lo, hi


def _plot_rows(ax, plan: Plan, data: dict, lang: str, value, scale: float) -> None:
    for r in row_names(plan):
        xs, ys, lo, hi = _series(plan, data, lang, r, value)
        if not xs:
            continue
        if r in ("base", "sft"):
            line = ax.axhline(
                scale * ys[0], linestyle=":", color="grey" if r == "base" else "black", label=row_label(plan, r)
            )
            ax.axhspan(scale * lo[0], scale * hi[0], color=line.get_color(), alpha=0.08)
            continue
        (line,) = ax.plot(
            xs,
            [scale * y for y in ys],
            marker="o",
            linestyle="--" if r in ("ct", "ct_sft") else "-",
            label=row_label(plan, r),
        )
        ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    budgets = plan.study.budgets(lang)
    ax.set_xticks(budgets, [_tokens(b) for b in budgets])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_scores(plan: Plan, data: dict, path: Path) -> None:
    plt = _pyplot()
    langs = list(plan.study.spec.languages)
    fig, axes = plt.subplots(1, len(langs), figsize=(6 * len(langs), 4.2), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        _plot_rows(ax, plan, data, lang, lambda r: (r["score"], r["score_ci"]), 100)
        ax.set_xlabel(f"CT tokens ({lang})")
        ax.set_ylabel("test score (%), 95% interval shaded")
        ax.set_title(lang)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{plan.study.spec.name}: score against CT tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tasks(plan: Plan, data: dict, path: Path) -> None:
    """One panel per (language, task): the task's main metric against CT tokens, per method, with intervals."""
    plt = _pyplot()
    panels = []
    for lang in plan.study.spec.languages:
        tasks = sorted({t for r in data["rows"] if r["language"] == lang for t in r["tasks"]})
        panels += [(lang, t) for t in tasks]
    if not panels:
        return
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (lang, task) in zip(axes.flat, panels):
        kind = next(r["tasks"][task]["kind"] for r in data["rows"] if task in r["tasks"])
        scale = 1 if kind == "bits_per_char" else 100

        def value(r, task=task):
            t = r["tasks"].get(task)
            return (t["value"], t["ci"]) if t else None

        _plot_rows(ax, plan, data, lang, value, scale)
        ax.set_title(f"{lang}: {task}", fontsize=9)
        ax.set_xlabel("CT tokens")
        ax.set_ylabel("bits per character (lower is better)" if scale == 1 else "% right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = min(len(labels), 2 * ncol + 1)
    rows_of_legend = -(-len(labels) // ncol) if labels else 0
    bottom = (0.2 * rows_of_legend + 0.1) / (3.8 * nrow)  # inches of legend over the figure height
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(f"{plan.study.spec.name}: each task against CT tokens")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss(plan: Plan, data: dict, path: Path) -> None:
    plt = _pyplot()
    langs = sorted({r["language"] for r in data["loss"]}, key=list(plan.study.spec.languages).index)
    fig, axes = plt.subplots(1, max(len(langs), 1), figsize=(5.5 * max(len(langs), 1), 4), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        rows = sorted((r for r in data["loss"] if r["language"] == lang), key=lambda r: r["ct_tokens"])
        xs = [r["ct_tokens"] for r in rows]
        ax.plot(xs, [100 * r["ties_sft_loss_rate"] for r in rows], marker="o", label="TIES")
        ax.plot(xs, [100 * r["ties_sv_sft_loss_rate"] for r in rows], marker="s", label="TIES-SV")
        ax.set_xscale("log")
        ax.set_xlabel(f"CT tokens ({lang})")
        ax.set_ylabel("SFT loss rate (%)")
        ax.set_title(lang)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{plan.study.spec.name}: SFT entries lost to the sign vote")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_timings(records: list[StepRecord]) -> dict:
    """Per kind of step: (count, wall seconds, CPU seconds); a cached step's record keeps its original times."""
    out: dict[str, list] = {}
    for r in records:
        count, seconds, cpu = out.setdefault(r.kind, [0, 0.0, 0.0])
        out[r.kind] = [count + 1, seconds + r.seconds, cpu + (r.cpu_seconds or 0.0)]
    return {k: tuple(v) for k, v in out.items()}


def _flat(entry: dict) -> dict:
    """A row for results.csv: the score and its interval, then each task's metric and interval."""
    out = {k: v for k, v in entry.items() if k not in ("tasks", "score_ci", "tuned")}
    ci = entry.get("score_ci")
    out["score_low"], out["score_high"] = (ci[0], ci[1]) if ci else (None, None)
    for task, t in entry.get("tasks", {}).items():
        out[f"{task}:{t['metric']}"] = t["value"]
        if t["ci"]:
            out[f"{task}:{t['metric']}_low"], out[f"{task}:{t['metric']}_high"] = t["ci"]
        if "lang_share" in t:
            out[f"{task}:lang_share"] = t["lang_share"]
    return out


def write_report(plan: Plan, ctx: Context, records: list[StepRecord], out_dir: Path) -> Path:
    """Write the report folder (replaced as a whole each run)."""
    data = collect(plan, ctx)
    found = findings(plan, data)
    gains = language_gain(plan, data)
    timings = step_timings(records)
    flat = [_flat(r) for r in data["rows"]]
    with atomic_output_dir(out_dir, force=True) as tmp:
        keys = list(dict.fromkeys(k for r in flat for k in r))
        with (tmp / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(flat)
        if data["loss"]:
            with (tmp / "loss_rates.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(data["loss"][0]))
                writer.writeheader()
                writer.writerows(data["loss"])
        doc = {
            "study": plan.study.spec.name,
            "config": str(plan.study.source),
            **{k: v for k, v in data.items() if k != "outcomes"},
            "language_gain": gains,
            "findings": found,
            "steps": [
                {k: getattr(r, k) for k in ("label", "kind", "key", "seconds", "cpu_seconds", "cached", "info")}
                for r in records
            ],
        }
        (tmp / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(plan, data, found, gains, timings))
        plot_scores(plan, data, tmp / "score_vs_tokens.png")
        plot_tasks(plan, data, tmp / "per_task.png")
        if data["loss"]:
            plot_loss(plan, data, tmp / "sft_loss_rate.png")
    return out_dir

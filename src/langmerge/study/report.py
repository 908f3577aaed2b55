"""The study's report: results.csv/.json, report.md (the paper's main table), plots, and the three findings.

Everything here is computed from the finished steps' outputs; the findings are
tests on those numbers, stated as reproduced, partly reproduced or not reproduced.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from langmerge.io.output import atomic_output_dir
from langmerge.methods.registry import get_method
from langmerge.study.config import REFERENCE_ROWS
from langmerge.study.plan import Plan
from langmerge.study.steps import Context

ROW_LABELS = {"base": "base", "sft": "SFT (English)", "ct": "CT", "ct_sft": "CT-then-SFT"}


def row_names(plan: Plan) -> list[str]:
    return [*REFERENCE_ROWS, *plan.study.spec.methods]


def row_label(plan: Plan, row: str) -> str:
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    m = plan.study.spec.methods[row]
    return m.label or get_method(m.merge_method).label


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(plan: Plan, ctx: Context) -> dict:
    """Scores per (language, budget, row) and loss rates per (language, budget), from what has finished."""
    rows = []
    for lang in plan.study.spec.languages:
        for budget in plan.study.budgets(lang):
            for row in row_names(plan):
                step = plan.evals.get((lang, None if row in ("base", "sft") else budget, row))
                score = _read(step.folder(ctx.cache) / "score.json") if step and step.done(ctx.cache) else None
                entry = {"language": lang, "ct_tokens": budget, "row": row, "method": row_label(plan, row),
                         "score": score["score"] if score else None}
                for task, t in (score or {}).get("tasks", {}).items():
                    entry[f"{task}:{t['metric']}"] = t["value"]
                    if "lang_share" in t:
                        entry[f"{task}:lang_share"] = t["lang_share"]
                tune = plan.tunes.get((lang, budget, row))
                if tune is not None and tune.done(ctx.cache):
                    info = _read(tune.folder(ctx.cache) / "done.json")["info"]
                    entry["tuned"] = info.get("best")
                    entry["validation_score"] = info.get("validation_score")
                rows.append(entry)
    losses = []
    for (lang, budget), step in plan.analyses.items():
        doc = _read(step.folder(ctx.cache) / "analysis.json") if step.done(ctx.cache) else None
        if doc:
            losses.append({"language": lang, "ct_tokens": budget, **{f"{role}_{k}": v for role, d in doc.items()
                                                                      for k, v in d.items()}})
    return {"rows": rows, "loss": losses}


def _score(data: dict, lang: str, budget: int, row: str) -> float | None:
    for r in data["rows"]:
        if (r["language"], r["ct_tokens"], r["row"]) == (lang, budget, row):
            return r["score"]
    return None


def _loss(data: dict, lang: str, budget: int) -> dict | None:
    return next((r for r in data["loss"] if (r["language"], r["ct_tokens"]) == (lang, budget)), None)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _tokens(n: int) -> str:
    from langmerge.training.data import format_token_count

    return format_token_count(n)


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not testable"
    return "reproduced" if hits == total else ("partly reproduced" if hits else "not reproduced")


def findings(plan: Plan, data: dict) -> list[dict]:
    """The paper's three findings as tests on the study's numbers."""
    s = plan.study.spec
    merges = list(s.methods)
    out = []

    # 1. Merging beats CT-then-SFT at the smallest budget of each language.
    lines, hits, total = [], 0, 0
    for lang in s.languages:
        b = plan.study.budgets(lang)[0]
        base = _score(data, lang, b, "ct_sft")
        scored = [(m, _score(data, lang, b, m)) for m in merges]
        scored = [(m, v) for m, v in scored if v is not None]
        if base is None or not scored:
            continue
        best, value = max(scored, key=lambda mv: mv[1])
        total += 1
        hits += value > base
        lines.append(f"{lang} at {_tokens(b)} CT tokens: best merge {row_label(plan, best)} {_pct(value)} vs "
                     f"CT-then-SFT {_pct(base)} ({'higher' if value > base else 'not higher'})")
    out.append({"finding": "Merging beats CT-then-SFT when CT data is scarcest (smallest budget)",
                "verdict": _verdict(hits, total), "evidence": lines})

    # 2. TIES saturates: its score gains less per doubling of CT tokens over the last interval than the first.
    lines, hits, total = [], 0, 0
    ties = s.analysis.ties if s.analysis else next((m for m in merges if s.methods[m].merge_method == "ties"), None)
    if ties is not None:
        for lang in s.languages:
            budgets = plan.study.budgets(lang)
            scores = [_score(data, lang, b, ties) for b in budgets]
            if len(budgets) < 3 or any(v is None for v in scores):
                continue
            first = (scores[1] - scores[0]) / math.log2(budgets[1] / budgets[0])
            last = (scores[-1] - scores[-2]) / math.log2(budgets[-1] / budgets[-2])
            total += 1
            # Saturation needs growth to level off from: a gain over the first interval, less over the last.
            saturates = first > 0 and last < first
            hits += saturates
            if saturates:
                why = "rises, then levels off"
            elif first <= 0:
                why = "no gain over the first interval, so nothing to saturate"
            else:
                why = "keeps gaining at least as fast"
            series = ", ".join(f"{_tokens(b)}: {_pct(v)}" for b, v in zip(budgets, scores))
            rates = [_loss(data, lang, b) for b in budgets]
            loss = ", ".join(f"{_tokens(b)}: {_pct(r['ties_sft_loss_rate'])}%" for b, r in zip(budgets, rates) if r)
            lines.append(f"{lang}: TIES score {series}; gain per doubling of CT tokens {100 * first:+.2f} points over "
                         f"the first interval, {100 * last:+.2f} over the last ({why})"
                         + (f"; SFT loss rate under TIES {loss}" if loss else ""))
    out.append({"finding": "TIES saturates as CT tokens grow (it gains over the first budget interval, less over the last)",
                "verdict": _verdict(hits, total), "evidence": lines})

    # 3. TIES-SV lowers the SFT model's loss rate and raises the score, at each language and budget.
    lines, hits, total = [], 0, 0
    lower = higher = 0
    if s.analysis is not None:
        for lang in s.languages:
            for b in plan.study.budgets(lang):
                loss = _loss(data, lang, b)
                a, v = _score(data, lang, b, s.analysis.ties), _score(data, lang, b, s.analysis.ties_sv)
                if loss is None or a is None or v is None:
                    continue
                total += 1
                is_lower = loss["ties_sv_sft_loss_rate"] < loss["ties_sft_loss_rate"]
                is_higher = v > a
                lower += is_lower
                higher += is_higher
                hits += is_lower and is_higher
                lines.append(f"{lang} {_tokens(b)}: SFT loss rate {_pct(loss['ties_sft_loss_rate'])}% (TIES) -> "
                             f"{_pct(loss['ties_sv_sft_loss_rate'])}% (TIES-SV, slack {loss['ties_sv_slack']}); "
                             f"score {_pct(a)} -> {_pct(v)}")
        if total:
            lines.insert(0, f"loss rate lower in {lower} of {total} cells, score higher in {higher} of {total}")
    out.append({"finding": "TIES-SV lowers the SFT loss rate and raises the score compared with TIES",
                "verdict": _verdict(hits, total), "evidence": lines})
    return out


def markdown(plan: Plan, data: dict, found: list[dict], timings: dict) -> str:
    s = plan.study.spec
    cols = [(lang, b) for lang in s.languages for b in plan.study.budgets(lang)]
    rows = row_names(plan)
    best = {}
    for c in cols:
        values = [_score(data, *c, r) for r in rows]
        values = [v for v in values if v is not None]
        best[c] = max(values) if values else None
    lines = [f"# Study: {s.name}", "",
             "Score: mean of the test tasks' accuracy / exact match, in percent (higher is better); "
             "**bold** is the best of each column. Base and SFT do not depend on the CT budget.", "",
             "| method | " + " | ".join(f"{lang} {_tokens(b)}" for lang, b in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = _score(data, *c, r)
            cells.append(f"**{_pct(v)}**" if v is not None and v == best[c] else _pct(v))
        lines.append(f"| {row_label(plan, r)} | " + " | ".join(cells) + " |")
    if data["loss"]:
        lines += ["", "## SFT loss rate (share of the SFT model's kept entries lost to the sign vote)", "",
                  "| language | CT tokens | TIES | TIES-SV | TIES-SV slack |", "|---|---:|---:|---:|---:|"]
        for r in data["loss"]:
            lines.append(f"| {r['language']} | {_tokens(r['ct_tokens'])} | {_pct(r['ties_sft_loss_rate'])}% | "
                         f"{_pct(r['ties_sv_sft_loss_rate'])}% | {r['ties_sv_slack']} |")
    lines += ["", "## The paper's findings at this scale", ""]
    for f in found:
        lines.append(f"- **{f['finding']}: {f['verdict']}.**")
        lines += [f"  - {e}" for e in f["evidence"]]
    task_cols = sorted({k for r in data["rows"] for k in r if ":" in k})
    if task_cols:
        lines += ["", "## Per task", "", "| language | CT tokens | method | " + " | ".join(task_cols) + " |",
                  "|---|---:|---|" + "---:|" * len(task_cols)]
        for r in data["rows"]:
            if r["score"] is None:
                continue
            cells = [("—" if r.get(k) is None else f"{r[k]:.3f}") for k in task_cols]
            lines.append(f"| {r['language']} | {_tokens(r['ct_tokens'])} | {r['method']} | " + " | ".join(cells) + " |")
    if timings:
        lines += ["", "## Time per kind of step (seconds each took when it ran, cached or not)", "",
                  "| step | count | seconds |",
                  "|---|---:|---:|"]
        for kind, (count, seconds) in timings.items():
            lines.append(f"| {kind} | {count} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(plan: Plan, data: dict, path: Path) -> None:
    plt = _pyplot()
    langs = list(plan.study.spec.languages)
    fig, axes = plt.subplots(1, len(langs), figsize=(5.5 * len(langs), 4), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        budgets = plan.study.budgets(lang)
        for r in row_names(plan):
            values = [_score(data, lang, b, r) for b in budgets]
            if all(v is None for v in values):
                continue
            if r in ("base", "sft"):
                ax.axhline(100 * values[0], linestyle=":", color="grey" if r == "base" else "black",
                           label=row_label(plan, r))
                continue
            xs = [b for b, v in zip(budgets, values) if v is not None]
            ax.plot(xs, [100 * v for v in values if v is not None], marker="o",
                    linestyle="--" if r in ("ct", "ct_sft") else "-", label=row_label(plan, r))
        ax.set_xscale("log")
        ax.set_xlabel(f"CT tokens ({lang})")
        ax.set_ylabel("test score (%)")
        ax.set_title(lang)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{plan.study.spec.name}: score against CT tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def step_timings(records: list[dict]) -> dict:
    out: dict[str, list] = {}
    for r in records:
        count, seconds = out.setdefault(r["kind"], [0, 0.0])
        out[r["kind"]] = [count + 1, seconds + r["seconds"]]  # a cached step's record keeps its original time
    return {k: tuple(v) for k, v in out.items()}


def write_report(plan: Plan, ctx: Context, records: list[dict], out_dir: Path) -> Path:
    """Write the report folder (replaced as a whole each run)."""
    data = collect(plan, ctx)
    found = findings(plan, data)
    timings = step_timings(records)
    with atomic_output_dir(out_dir, force=True) as tmp:
        keys = list(dict.fromkeys(k for r in data["rows"] for k in r if k != "tuned"))
        with (tmp / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(data["rows"])
        if data["loss"]:
            with (tmp / "loss_rates.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(data["loss"][0]))
                writer.writeheader()
                writer.writerows(data["loss"])
        doc = {"study": plan.study.spec.name, "config": str(plan.study.source), **data, "findings": found,
               "steps": [{k: r.get(k) for k in ("label", "kind", "key", "seconds", "cached", "info")} for r in records]}
        (tmp / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(plan, data, found, timings))
        plot_scores(plan, data, tmp / "score_vs_tokens.png")
        if data["loss"]:
            plot_loss(plan, data, tmp / "sft_loss_rate.png")
    return out_dir

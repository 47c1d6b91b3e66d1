"""The `teachers` step's report (pipeline/steps/teachers/__init__.py measures): report.md, with the summary table,
the difficulty tables, the ranking and why, the paired comparisons and the privileged teachers' checks, and
teachers.png, with pass rate by difficulty, correct-trace lengths and student NLL."""

from __future__ import annotations

from pipeline.steps.teachers import ordered_difficulties


def render_report(document: dict) -> str:
    """report.md: the summary table, difficulty tables, the ranking and why, the paired comparisons."""
    summary, ranking = document["teachers"], document["ranking"]
    names = [entry["teacher"] for entry in ranking]

    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"# Teachers: {', '.join(names)}", "",
             f"{document['problems_shared']} problems shared by every teacher; student: "
             f"{document['student'] or 'none (no NLL signal)'}.", "",
             f"**Best: {names[0]}.** {ranking[0]['why']}.", "",
             "| teacher | mean rank | pass rate % | correct traces | tokens mean | median | p90 | CV | distinct "
             "answers | near dup. | student NLL/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in ranking:
        s = summary[entry["teacher"]]
        tokens = s["correct_tokens"] or {}
        pass_rate = "–" if s["pass_rate"] is None else (
            f"{100 * s['pass_rate']:.1f} ± {100 * (s['pass_rate_stderr'] or 0):.1f}")
        nll = "–" if s["nll_per_token"] is None else (
            f"{s['nll_per_token']:.3f} ± {s['nll_per_token_stderr'] or 0:.3f}")
        lines.append(f"| {entry['teacher']} | {entry['mean_rank']:.2f} | {pass_rate} | {s['correct_traces']} | "
                     f"{number(tokens.get('mean'))} | {number(tokens.get('median'))} | {number(tokens.get('p90'), 0)} "
                     f"| {number(tokens.get('cv'), 2)} | {number(s['distinct_answer_rate'], 2)} | "
                     f"{number(s['near_duplicate_rate'], 2)} | {nll} |")
    difficulties = ordered_difficulties(d for s in summary.values() for d in s["by_difficulty"])
    if difficulties:
        lines += ["", "By difficulty (pass rate %, mean tokens of correct traces):", "",
                  "| teacher | " + " | ".join(difficulties) + " |", "|---|" + "---:|" * len(difficulties)]
        for name in names:
            cells = []
            for difficulty in difficulties:
                bucket = summary[name]["by_difficulty"].get(difficulty)
                cells.append("–" if bucket is None else
                             f"{100 * bucket['pass_rate']:.1f}, {number(bucket['correct_tokens_mean'], 0)} tok "
                             f"({bucket['problems']} problems)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired over problems, {names[0]} minus each other teacher (95% bootstrap interval):", ""]
    for other, entry in document["comparisons"].items():
        for key, label, scale, digits, unit in (("pass_rate", "pass rate", 100, 1, " points"),
                                                ("nll_per_token", "student NLL/token", 1, 3, " nats")):
            result = entry[key]
            if result is None:
                continue
            verdict = "detectable" if result["detectable"] else "no detectable difference"
            low, high = (scale * bound for bound in result["ci95"])
            lines.append(f"- vs {other}, {label}: {scale * result['difference']:+.{digits}f}{unit} "
                         f"[{low:+.{digits}f}, {high:+.{digits}f}] over {result['problems']} problems ({verdict})")
    if document["unscored_too_long"]:
        lines += ["", f"{document['unscored_too_long']} correct traces longer than max_length were not scored."]
    if document["privileged"]:
        lines += ["", "## Privileged teachers (opsd)", "",
                  "The student shown a privileged context, measured before each opsd step trained: with the context "
                  "minus without, paired (95% bootstrap interval).", "",
                  "| opsd step | problems | pass rate % without → with | gain | verified traces | NLL/token without → "
                  "with | change | better teacher? |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, check in document["privileged"].items():
            if "skipped" in check:
                lines.append(f"| {name} | – | – | – | – | – | – | not measured: {check['skipped']} |")
                continue

            def interval(result, scale, digits):
                low, high = (scale * bound for bound in result["ci95"])
                return f"{scale * result['difference']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"

            nll = ("–", "–") if not check["verified_traces"] else (
                f"{check['nll_without']:.3f} → {check['nll_with']:.3f}", interval(check["nll_change"], 1, 3))
            lines.append(f"| {name} | {check['problems']} | {100 * check['pass_rate_without']:.1f} → "
                         f"{100 * check['pass_rate_with']:.1f} | {interval(check['pass_rate_gain'], 100, 1)} | "
                         f"{check['verified_traces']} | {nll[0]} | {nll[1]} | "
                         f"{'yes' if check['teacher_better'] else 'no'}: {check['why']} |")
    return "\n".join(lines) + "\n"


def plot_teachers(document: dict, per_problem: list[dict], path) -> None:
    """teachers.png: pass rate by difficulty, correct-trace length histograms, student NLL per token."""
    from eval.report import pyplot

    plt = pyplot()
    names = [entry["teacher"] for entry in document["ranking"]]
    summary = document["teachers"]
    difficulties = ordered_difficulties(d for s in summary.values() for d in s["by_difficulty"])
    fig, (rates, lengths, nll) = plt.subplots(1, 3, figsize=(14, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [d + (i - (len(names) - 1) / 2) * width for d in range(len(difficulties))]
        rates.bar(xs, [100 * summary[name]["by_difficulty"].get(d, {"pass_rate": 0})["pass_rate"]
                       for d in difficulties], width, label=name, color=f"C{i}")
        tokens = [t for p in per_problem if p["teacher"] == name for t in p["correct_tokens"]]
        if tokens:
            lengths.hist(tokens, bins=30, histtype="step", label=name, color=f"C{i}")
        if summary[name]["nll_per_token"] is not None:
            nll.bar(i, summary[name]["nll_per_token"], yerr=summary[name]["nll_per_token_stderr"] or 0, capsize=3,
                    color=f"C{i}")
    rates.set_xticks(range(len(difficulties)), difficulties)
    rates.set_ylabel("pass rate (%)")
    rates.set_title("pass rate by difficulty")
    rates.legend(fontsize="small")
    lengths.set_xlabel("tokens")
    lengths.set_title("correct traces' lengths")
    lengths.legend(fontsize="small")
    nll.set_xticks(range(len(names)), names, fontsize="small")
    nll.set_title("student NLL per token ± stderr" if document["student"] else "no student set")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

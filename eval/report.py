"""An evaluation's human-readable outputs, from results.json and the per-sample rows:

    report.md     models x benchmarks pass@1 ± stderr; each model minus the baseline, paired over problems (difference
                  ± stderr, 95% paired-bootstrap interval, "no detectable difference", minimum detectable
                  difference); then per benchmark pass@k, maj@k, truncation, tokens, what the ungraded rule removed,
                  MATH-500 by subject and level, and the run's settings
    accuracy.png  pass@1 with standard-error bars, one bar per model, grouped by benchmark; beside it, with two or
                  more models, each model's paired difference to the baseline with its 95% interval
    lengths.png   completion-length histograms, correct vs incorrect, one panel per model x benchmark
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

ACCURACY_PNG = "accuracy.png"
LENGTHS_PNG = "lengths.png"
REPORT_MD = "report.md"


def write_report(results: dict, samples: list[dict], out_dir: Path) -> list[Path]:
    """Write report.md and the two plots into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    paths = [plot_accuracy(results["models"], out_dir / ACCURACY_PNG, results.get("comparisons")),
             plot_lengths(samples, list(results["models"]), _benchmarks(results["models"]), out_dir / LENGTHS_PNG)]
    report = out_dir / REPORT_MD
    report.write_text(render_markdown(results))
    return [report, *paths]


def _benchmarks(models: dict[str, dict]) -> list[str]:
    return list(next(iter(models.values())))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _with_stderr(scores: dict) -> str:
    stderr = f" ± {_pct(scores['stderr'])}" if scores.get("stderr") is not None else ""
    return f"{_pct(scores['pass@1'])}{stderr}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(results: dict) -> str:
    models, meta = results["models"], results.get("meta", {})
    benchmarks = _benchmarks(models)
    lines = ["# Evaluation report", "",
             "pass@1 (%) ± standard error over problems; n = samples per problem.", ""]
    lines += _table(["model", *(f"{b} (n={models[next(iter(models))][b]['n']})" for b in benchmarks)],
                    [[label, *(_with_stderr(per_bench[b]) for b in benchmarks)] for label, per_bench in models.items()])
    lines += [""] + _comparison_lines(results.get("comparisons"), benchmarks)
    lines += [f"![pass@1 with standard-error bars; paired differences with 95% intervals]({ACCURACY_PNG})", "",
              f"![completion lengths, correct vs incorrect]({LENGTHS_PNG})", ""]
    for benchmark in benchmarks:
        lines += [f"## {benchmark}", ""]
        first = models[next(iter(models))][benchmark]
        ks = list(first["pass@k"])
        header = ["model", "problems", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks), "truncated",
                  "tokens (correct)", "tokens (incorrect)", "labels", "ungraded samples left out"]
        rows = []
        for label, per_bench in models.items():
            s = per_bench[benchmark]
            tokens = s["mean_completion_tokens"]
            rows.append([label, str(s["problems"]), *(_pct(s["pass@k"].get(k)) for k in ks),
                         *(_pct(s["maj@k"].get(k)) for k in ks), _pct(s["truncation_rate"]),
                         _tokens(tokens["correct"]), _tokens(tokens["incorrect"]),
                         _counts(s["labels"]), _counts(s.get("ungraded_samples", {})) or "none"])
        lines += _table(header, rows) + [""]
        removed = first.get("removed_problems", {})
        lines += [f"Problems left out for every model (no graded sample): {_counts(removed) or 'none'}. "
                  "Scores count graded samples only: bad_gold, timeout and error leave the denominator.", ""]
        for group in ("by_subject", "by_level"):
            if group not in first:
                continue
            values = list(first[group])
            lines += [f"{group.replace('_', ' ')}: pass@1 (%) ± stderr (problems)", ""]
            lines += _table(["model", *(f"{v} ({first[group][v]['problems']})" for v in values)],
                            [[label, *(_with_stderr(per_bench[benchmark][group][v]) for v in values)]
                             for label, per_bench in models.items()]) + [""]
    if meta:
        lines += ["## Settings", ""] + _settings(meta) + [""]
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _comparison_lines(comparisons: dict | None, benchmarks: list[str]) -> list[str]:
    """Each model minus the baseline per benchmark, paired over the problems both were scored on."""
    if not comparisons:
        return []
    baseline = next(iter(comparisons[benchmarks[0]].values()))["baseline"]
    lines = [f"## Paired differences to `{baseline}`", "",
             "Percentage points, model minus baseline, over the same problems: mean ± paired standard error, the "
             "95% paired-bootstrap interval (problems resampled), and the minimum detectable difference (MDD: "
             "the true difference this slice would detect 80% of the time at the 5% level). An interval that "
             "spans 0 is *no detectable difference*.", ""]
    rows = []
    for benchmark in benchmarks:
        for label, row in comparisons[benchmark].items():
            low, high = row["ci95"]
            rows.append([benchmark, label, f"{100 * row['difference']:+.1f}" +
                         (f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""),
                         f"[{100 * low:+.1f}, {100 * high:+.1f}]",
                         "yes" if row["detectable"] else "no detectable difference",
                         _pct(row["mdd"]), str(row["problems"])])
    return lines + _table(["benchmark", "model", "difference", "95% interval", "detectable", "MDD", "problems"],
                          rows) + [""]


def _tokens(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _settings(meta: dict) -> list[str]:
    lines = [f"- seed {meta.get('seed')}, preset {meta.get('preset')}, sampling {meta.get('sampling')}",
             f"- prompt template: `{meta.get('prompt_template')!r}`"]
    for label, info in meta.get("models", {}).items():
        lines.append(f"- `{label}`: {info.get('path')}, weights sha256 {str(info.get('weights_sha256'))[:16]}, "
                     f"chat template sha256 {str(info.get('chat_template_sha256'))[:16]}, "
                     f"think prefix {info.get('think_prefix')!r}")
    versions = meta.get("versions", {})
    lines.append("- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(models: dict[str, dict], path: Path, comparisons: dict | None = None) -> Path:
    """Grouped bars: pass@1 (%) per benchmark, one bar per model, standard-error whiskers. With comparisons, a
    second panel: each model's paired difference to the baseline per benchmark, 95% bootstrap interval whiskers."""
    plt = pyplot()
    benchmarks = _benchmarks(models)
    width = 0.8 / len(models)
    panel_width = max(4.0, 1.6 * len(benchmarks) * max(1, len(models) / 2))
    panels = 2 if comparisons else 1
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(panel_width * panels, 3.6))
    ax = axes[0][0]
    for m, (label, per_bench) in enumerate(models.items()):
        xs = [b + (m - (len(models) - 1) / 2) * width for b in range(len(benchmarks))]
        means = [100 * per_bench[b]["pass@1"] for b in benchmarks]
        errors = [100 * (per_bench[b]["stderr"] or 0.0) for b in benchmarks]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(benchmarks)), benchmarks)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("pass@1 ± standard error")
    if comparisons:
        ax = axes[0][1]
        others = list(comparisons[benchmarks[0]])
        step = 0.8 / len(others)
        for m, label in enumerate(others):
            rows = [comparisons[b][label] for b in benchmarks]
            xs = [b + (m - (len(others) - 1) / 2) * step for b in range(len(benchmarks))]
            means = [100 * row["difference"] for row in rows]
            below = [100 * (row["difference"] - row["ci95"][0]) for row in rows]
            above = [100 * (row["ci95"][1] - row["difference"]) for row in rows]
            # same colour as the model's bar on the left (the baseline took the first)
            ax.errorbar(xs, means, yerr=[below, above], fmt="o", capsize=4, label=label, color=f"C{m + 1}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(benchmarks)), benchmarks)
        ax.set_ylabel("difference (points)")
        ax.set_title(f"minus {rows[0]['baseline']}, paired, 95% interval", fontsize="medium")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lengths(samples: list[dict], labels: list[str], benchmarks: list[str], path: Path) -> Path:
    """Histograms of completion tokens, correct vs not, one panel per model (rows) x benchmark (columns)."""
    plt = pyplot()
    tokens: dict[tuple[str, str, bool], list[int]] = defaultdict(list)
    for s in samples:
        tokens[(s["model"], s["benchmark"], bool(s["correct"]))].append(s["completion_tokens"])
    fig, axes = plt.subplots(len(labels), len(benchmarks), squeeze=False,
                             figsize=(3.2 * len(benchmarks), 2.4 * len(labels)))
    for row, label in enumerate(labels):
        for col, benchmark in enumerate(benchmarks):
            ax = axes[row][col]
            right, wrong = tokens[(label, benchmark, True)], tokens[(label, benchmark, False)]
            longest = max(right + wrong, default=1)
            bins = [longest * i / 20 for i in range(21)] if longest > 0 else 1
            ax.hist([right, wrong], bins=bins, label=["correct", "incorrect"], color=["tab:green", "tab:red"])
            ax.set_title(f"{label}\n{benchmark}", fontsize="small")
            ax.set_xlabel("completion tokens", fontsize="small")
            if row == 0 and col == 0:
                ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

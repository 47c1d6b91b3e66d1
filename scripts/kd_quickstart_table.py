"""The kd-quickstart's numbers over seeds as two markdown tables (for the README): pass@1 of each model per seed, and
KD − SFT and TAID − SFT paired over problems, per seed with its 95% interval and pooled over the seeds.

    .venv/bin/python scripts/kd_quickstart_table.py /tmp/kdq/seed0 /tmp/kdq/seed1 /tmp/kdq/seed2

Each argument is a workdir of `distill run recipes/kd-quickstart.yaml` (one per seed), a `--seeds` workdir, or an
evaluate step's results.json. Every number comes from `distill compare`'s aggregation
(`pipeline.commands.compare.compare_paths`, over `eval.metrics.paired_difference`): a seed's difference and interval
are those its evaluate step recorded (95% paired bootstrap over problems); the pooled difference takes every seed's
samples of a problem together and is paired over the problems all seeds share, as the README's REDI table is. Its
interval covers which problems and which samples, not training: the per-seed differences and their sd say how much
training runs differ. A difference is called plainly: above 0 when the interval is, below 0 when it is, else no
detectable difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# What the recipe's model references mean, in the tables' words; anything else is printed as written.
MODEL_LABELS = {
    "builtin:smollm2-135m-instruct": "SmolLM2-135M-Instruct (base)",
    "step:teacher": "teacher: quickstart stage 1 (LoRA SFT on its own first-correct answers), merged",
    "step:sft_merged": "student: LoRA SFT on the teacher's correct traces",
    "step:kd_merged": "student: LoRA kd (top-20 forward KL) on the same traces",
    "step:taid_merged": "student: LoRA kd, objective taid, on the same traces",
}
SHORT_LABELS = {"step:sft_merged": "SFT", "step:kd_merged": "KD", "step:taid_merged": "TAID",
                "step:teacher": "teacher", "builtin:smollm2-135m-instruct": "base"}
BASELINE = "step:sft_merged"
EVALUATION = "report"


def points(value: float | None, sign: bool = False) -> str:
    """A rate or difference in percentage points, one decimal, with a real minus sign."""
    if value is None:
        return "–"
    return (f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}").replace("-", "−")


def interval(bounds) -> str:
    return "[–]" if not bounds else f"[{points(bounds[0], True)}, {points(bounds[1], True)}]"


def verdict(bounds) -> str:
    """Which side of 0 a 95% interval lies on, in words."""
    if not bounds:
        return "no interval"
    if bounds[0] > 0:
        return "above 0"
    if bounds[1] < 0:
        return "below 0"
    return "no detectable difference"


def render(evaluation: dict) -> str:
    """Both tables, one pair per benchmark, from one evaluation's comparison (`compare_runs`)."""
    runs = evaluation["runs"]
    lines = []
    for benchmark in evaluation["benchmarks"]:
        lines += [(f"pass@1 (%) on {benchmark}, per run ({', '.join(runs)}); mean ± sd across runs; pooled (every "
                   "run's samples of a problem together) ± stderr over problems:"), "",
                  f"| model | {benchmark} {' / '.join(runs)} | mean ± sd | pooled |", "|---|---|---|---|"]
        for model in evaluation["models"]:
            s = evaluation["scores"][model][benchmark]
            per_run = " / ".join(points(s["runs"][run]) for run in runs)
            spread = "" if s["sd"] is None else f" ± {points(s['sd'])}"
            pooled = "–" if s["pooled"] is None else points(s["pooled"]) + (
                "" if s["pooled_stderr"] is None else f" ± {points(s['pooled_stderr'])}")
            lines.append(f"| {MODEL_LABELS.get(model, model)} | {per_run} | {points(s['mean'])}{spread} | {pooled} |")
        baseline = SHORT_LABELS.get(evaluation["baseline"], evaluation["baseline"])
        lines += ["", ("Paired differences over the same problems (points): per run with its 95% paired interval, "
                       "mean ± sd across runs, in how many runs positive and detectable (interval excluding 0), "
                       "and pooled over runs:"), "",
                  "| difference | per run [95%] | mean ± sd | positive, detectable | pooled paired [95%] |",
                  "|---|---|---|---|---|"]
        for model, per_bench in evaluation["differences"].items():
            d = per_bench[benchmark]
            per_run = " / ".join(f"{points(d['runs'][run], True)} {interval(d['runs_ci95'][run])}" for run in runs)
            spread = "" if d["sd"] is None else f" ± {points(d['sd'])}"
            pooled = d["pooled"]
            pooled_text = "–" if pooled is None else (
                f"{points(pooled['difference'], True)}"
                + ("" if pooled["stderr"] is None else f" ± {points(pooled['stderr'])}")
                + f" {interval(pooled['ci95'])}, {verdict(pooled['ci95'])}")
            lines.append(f"| {SHORT_LABELS.get(model, model)} − {baseline} | {per_run} | "
                         f"{points(d['mean'], True)}{spread} | {d['positive_runs']}/{len(runs)}, "
                         f"{d['detectable_runs']}/{len(runs)} | {pooled_text} |")
        lines.append("")
    lines.append("Runs: " + ", ".join(f"{run} ({path})" for run, path in zip(runs, evaluation["paths"])))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands.compare import compare_paths
    from pipeline.core.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="WORKDIR|RESULTS", help="one workdir (or results.json) per seed")
    parser.add_argument("--baseline", default=BASELINE, help=f"model the others are compared with ({BASELINE})")
    parser.add_argument("--evaluation", default=EVALUATION, help=f"the evaluate step's name ({EVALUATION})")
    args = parser.parse_args(argv)
    try:
        missing = [p for p in args.paths if not Path(p).exists()]
        if missing:
            raise UserError(f"no such workdir or file: {', '.join(missing)}")
        evaluations = compare_paths([Path(p) for p in args.paths], args.baseline)["evaluations"]
        if args.evaluation not in evaluations:
            raise UserError(f"no evaluation {args.evaluation!r} in {', '.join(args.paths)} "
                            f"(found: {', '.join(evaluations) or 'none'})")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(render(evaluations[args.evaluation]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

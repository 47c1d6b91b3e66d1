"""`distill`: the argument parser and the small commands (check, status, report, env, compare, export, bench); `distill
run` is in `run_command`, `distill eval` in `eval_command`, `distill steps` in `steps_reference`, `distill push` in
`push`.

Exit codes: 0 success, 1 a step failed, 2 bad input (recipe, override, data, model reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.core.errors import UserError
from pipeline.core.outputs import add_overwrite_argument

console = Console()


def cmd_run(args) -> int:
    from pipeline.commands import run_command

    return run_command.run(args)


def cmd_check(args) -> int:
    """Every training step's rows through its student's chat template, as the trainer will tokenize them
    (`pipeline.training.template_check`), without loading a model or training. A step whose inputs are not produced yet is
    listed as not checked: the same check runs when it starts."""
    from pipeline.core.artifacts import Artifact
    from pipeline.core.keys import plan
    from pipeline.core.models import resolve_model
    from pipeline.core.recipe import load_recipe
    from pipeline.core.step import step_module
    from pipeline.core.workdir import workdir_for
    from pipeline.training.build import load_tokenizer
    from pipeline.training.config import TrainingConfig

    recipe = load_recipe(args.recipe, args.override)
    workdir = workdir_for(recipe, args.dry_run)
    plans = {step.name: step for step in plan(recipe, dry_run=args.dry_run)}
    _warn_slow_dtypes(recipe)
    failed = []
    for name, step in plans.items():
        cfg = step.cfg
        if not isinstance(cfg, TrainingConfig):
            continue
        module = step_module(cfg.uses)
        if not hasattr(module, "template_check"):
            console.print(f"[dim]-  {name} ({cfg.uses}): nothing to check (teacher and student read the same token "
                          "ids)[/dim]")
            continue
        parents = recipe.dependencies(name)
        pending = [parent for parent in parents if plans[parent].action == "run"]
        if pending:
            console.print(f"[yellow]?[/yellow]  {name} ({cfg.uses}): not checked, {', '.join(pending)} not produced "
                          f"yet (`distill run {args.recipe} --until {pending[-1]}`); it is checked when it starts")
            continue
        inputs = {parent: Artifact.from_dir(workdir / parent) for parent in parents}
        try:
            # First the input's columns and rows as the step checks them when it runs, before its template check
            # (sft: `messages` ending in an assistant turn; redi: prompt, chosen, rejected): a dataset that run
            # refuses with exit 2 is refused here with the same message, not a traceback from the template check.
            for prepare in ("prompt_completion_dataset", "preference_dataset"):
                if hasattr(module, prepare):
                    getattr(module, prepare)(inputs[cfg.input].dataset(), cfg.input)
            stats = module.template_check(cfg, inputs, load_tokenizer(cfg, resolve_model(cfg.model, inputs)))
        except UserError as error:
            failed.append(name)
            console.print(f"[red]✗[/red]  {error}", soft_wrap=True)
            continue
        console.print(f"[green]✓[/green]  {name} ({cfg.uses}): {stats['template_checked_rows']} rows of {cfg.input!r} "
                      f"render through the chat template of {cfg.model!r} as they will train")
    if failed:
        raise UserError(f"{args.recipe}: the chat-template check failed for {', '.join(failed)} (above)")
    return 0


def _warn_slow_dtypes(recipe) -> None:
    from pipeline.core.compute_dtype import slow_dtype_warnings

    for warning in slow_dtype_warnings(recipe.steps):
        console.print(f"[yellow]![/yellow]  {warning}", soft_wrap=True)


def cmd_status(args) -> int:
    if Path(args.path).is_file():
        return _status_of_recipe(args)
    if args.override or args.dry_run:
        raise UserError(f"{args.path}: -o and --dry-run go with a recipe file, not a workdir")
    from rich.markup import escape

    from pipeline.core.artifacts import UNREADABLE
    from pipeline.core.status import status

    args.workdir = args.path
    rows = status(Path(args.workdir))
    with_rounds = any(row["round"] is not None for row in rows)  # a recipe with a rounds block
    table = Table(title=str(args.workdir))
    for column in ("step", "type", *(["round"] if with_rounds else []), "state", "rows", "seconds", "key"):
        table.add_column(column, justify="right" if column in ("round", "rows", "seconds") else "left")
    colors = {"complete": "green", "failed": "red", "incomplete": "yellow", "pending": "dim"}
    previous_round = None
    for row in rows:
        if with_rounds and row["round"] != previous_round:
            table.add_section()  # a rule between rounds, and around the block
        previous_round = row["round"]
        table.add_row(row["step"], escape(row["uses"]), *([str(row["round"] or "")] if with_rounds else []),
                      f"[{colors[row['state']]}]{row['state']}", "" if row["rows"] is None else str(row["rows"]),
                      "" if row["seconds"] is None else f"{row['seconds']:.1f}", row["key"] or "")
    console.print(table)
    # What `distill run` says of a step whose output is there but not complete (`output_state`), in its words.
    for row in rows:
        if row["why"] and not row["refused"]:
            console.print(f"[yellow]would run[/yellow]  {row['step']}: {escape(row['why'])}", soft_wrap=True)
    refused = [row for row in rows if row["refused"]]
    if refused:
        workdir = Path(args.workdir)
        raise UserError("; ".join(
            f"step {row['step']!r}: {row['why']}: " + (
                f"`distill run` of this workdir's recipe re-runs the step and replaces {workdir / row['step']}"
                if row["why"].startswith(UNREADABLE) else
                f"move or remove {workdir / row['step']}, or rename step {row['step']!r} in the recipe")
            for row in refused))
    return 0


def _status_of_recipe(args) -> int:
    """What `distill run RECIPE` would run and why, like `dvc status`; runs nothing."""
    from rich.markup import escape

    from pipeline.core.keys import plan
    from pipeline.core.recipe import load_recipe
    from pipeline.core.rounds import split_round
    from pipeline.core.workdir import workdir_for

    recipe = load_recipe(args.path, args.override)
    steps = plan(recipe, dry_run=args.dry_run)
    console.print(f"[bold]{args.path}[/bold] → {workdir_for(recipe, args.dry_run)}")
    _warn_slow_dtypes(recipe)
    previous_round = None
    for step in steps:
        round_number = split_round(step.name)[1]  # only the steps of a rounds block have one
        if round_number not in (None, previous_round):
            console.print(f"[bold]{recipe.rounds.title(round_number)}[/bold]")
        previous_round = round_number
        state = "[yellow]would run [/yellow]" if step.action == "run" else "[green]up to date[/green]"
        why = f": {'; '.join(step.reasons)}" if step.reasons else ""
        indent = "  " if round_number is not None else ""  # a round's steps under its title
        # soft_wrap: a reason is never cut into pieces, so it can be copied and searched for
        console.print(f"{indent}{state}  {step.name} ({step.cfg.uses}, key {step.key}){escape(why)}", soft_wrap=True)
    would_run = sum(step.action == "run" for step in steps)
    console.print(f"{would_run} step(s) would run, {len(steps) - would_run} up to date")
    return 0


def cmd_report(args) -> int:
    from pipeline.commands.run_report.page import write_run_report

    console.print(f"report → {write_run_report(Path(args.workdir), overwrite=args.overwrite)}", soft_wrap=True)
    return 0


def cmd_env(args) -> int:
    from pipeline import __version__
    from pipeline.core.env import device, library_versions

    table = Table(title="distill env")
    table.add_column("component")
    table.add_column("version")
    from pipeline.core.compute_dtype import choose

    for name, version in {"distillery": __version__, **library_versions(), "device": device()}.items():
        table.add_row(name, version)
    for use, choice in (("inference", choose()), ("training", choose(training=True))):
        table.add_row(f"dtype: auto ({use})", f"{choice.dtype}: {choice.reason}")
    console.print(table)
    return 0


def cmd_compare(args) -> int:
    from pipeline.commands.compare import COMPARE_JSON, COMPARE_MD, compare_paths, print_comparison, write_comparison
    from pipeline.core.outputs import COMPARE, claim_dir, make_dir, never_written

    comparison = compare_paths([Path(p) for p in args.paths], args.baseline)
    if not comparison["evaluations"]:
        raise UserError(f"{', '.join(args.paths)}: no evaluation results found (results.json of an evaluate step "
                        "or of `distill eval`)")
    out = Path(args.out) if args.out else None
    if out:
        read = [Path(path) for evaluation in comparison["evaluations"].values() for path in evaluation["paths"]]
        claim_dir(out, [COMPARE_MD, COMPARE_JSON], COMPARE, overwrite=args.overwrite,
                  never=never_written(out, read=read))
    print_comparison(comparison, console)
    if out:
        make_dir(out, COMPARE, "--out")
        console.print(f"comparison → {', '.join(map(str, write_comparison(comparison, out)))}")
    return 0


def cmd_eval(args) -> int:
    from pipeline.commands.eval_command import run_cli

    return run_cli(args)


def cmd_export(args) -> int:
    from pipeline.commands.export import export

    path, rows = export(args.step_dir, args.format, args.out, overwrite=args.overwrite)
    console.print(f"{rows} rows -> {path}")
    return 0


def cmd_bench(args) -> int:
    from pipeline.commands.bench import run_benchmarks
    from pipeline.core.outputs import claim_file, never_written

    if args.json:  # checked before the benchmarks' minutes, written at their end
        read = [Path(path) for path in (args.recipe, args.model) if Path(path).exists()]
        claim_file(Path(args.json), overwrite=args.overwrite, never=never_written(Path(args.json), read=read))
    run_benchmarks(args.targets, args, console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill reasoning into language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe (complete steps are skipped)")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe key, e.g. -o steps.samples.n=8 (repeatable)")
    run.add_argument("--until", metavar="STEP", help="stop after this step")
    run.add_argument("--force", action="append", default=[], metavar="STEP|all",
                     help="re-run this step (and the steps after it that read it) even if complete")
    run.add_argument("--dry-run", action="store_true",
                     help="every step on a handful of rows with tiny budgets, in <workdir>-dry-run")
    run.add_argument("--seeds", metavar="S1,S2,...", help=(
        "run the recipe once per seed, each in <workdir>/seed-S (steps that draw no random numbers, or whose "
        "`seed` is pinned, are shared), then compare the evaluations across seeds"))
    run.add_argument("-v", "--verbose", action="store_true", help=(
        "show what steps and their libraries (vLLM, transformers, datasets, TRL) write as it comes, instead of one "
        "progress row per step with that output in <workdir>/<step>/log.txt"))
    run.set_defaults(func=cmd_run)

    compare = commands.add_parser("compare", help="aggregate evaluations across seeds or runs: mean ± sd, pooled, "
                                                  "paired differences")
    compare.add_argument("paths", nargs="+", metavar="WORKDIR|RESULTS", help=(
        "a workdir of `distill run` (its evaluate steps), a --seeds workdir (its seed-N runs), an evaluation dir "
        "or a results.json"))
    compare.add_argument("--baseline", metavar="MODEL", help=(
        "the model the others are compared with (default: each evaluation's own baseline, its first model)"))
    compare.add_argument("--out", metavar="DIR", help="also write compare.md and compare.json into DIR")
    add_overwrite_argument(compare, "DIR's compare.md and compare.json")
    compare.set_defaults(func=cmd_compare)

    stat = commands.add_parser("status", help="what a recipe would run and why (RECIPE), or a workdir's steps (DIR)")
    stat.add_argument("path", metavar="RECIPE|WORKDIR")
    stat.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="as for `distill run`: status of the recipe with this key overridden")
    stat.add_argument("--dry-run", action="store_true", help="status of the recipe's --dry-run workdir")
    stat.set_defaults(func=cmd_status)

    report = commands.add_parser("report", help="write a run's page: the recipe graph, data funnel, training curves, "
                                                "evaluations and samples, in WORKDIR/run-report/index.html")
    report.add_argument("workdir", metavar="WORKDIR", help=(
        "the workdir of a `distill run`; the page (self-contained, opens from disk) and its data files go in "
        "WORKDIR/run-report/, which is replaced on each report"))
    add_overwrite_argument(report, "WORKDIR/run-report/")
    report.set_defaults(func=cmd_report)

    check = commands.add_parser("check", help="check every training row against its student's chat template, "
                                              "before training")
    check.add_argument("recipe")
    check.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="as for `distill run`")
    check.add_argument("--dry-run", action="store_true", help="check the recipe's --dry-run workdir")
    check.set_defaults(func=cmd_check)

    from pipeline.commands.eval_command import add_cli_arguments

    evaluation = commands.add_parser("eval", help="evaluate models on benchmarks (or --rescore a saved run)")
    add_cli_arguments(evaluation)
    add_overwrite_argument(evaluation, "--out's (or --rescore's) results.json, samples/, report.md and plots")
    evaluation.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="write a finished dataset step as jsonl, parquet or sharegpt")
    export.add_argument("step_dir", help="a step dir, e.g. runs/quickstart/sft_data")
    export.add_argument("--format", required=True, choices=["jsonl", "parquet", "sharegpt"])
    export.add_argument("--out", help="file to write, new unless --overwrite (default: "
                                      "STEP_DIR/export/<step><extension>)")
    add_overwrite_argument(export, "the file it writes")
    export.set_defaults(func=cmd_export)

    push = commands.add_parser("push", help="upload a finished dataset or model step to the Hugging Face Hub, with "
                                            "its card (--dry-run: list what would go)")
    from pipeline.commands.push import add_arguments as add_push_arguments

    add_push_arguments(push)

    bench = commands.add_parser("bench", help="measure sampling, grading, training and caching side by side")
    from pipeline.commands.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    add_overwrite_argument(bench, "--json's file")
    bench.set_defaults(func=cmd_bench)

    steps = commands.add_parser("steps", help="every step type with its settings (--markdown: docs/steps.md)")
    from pipeline.commands.steps_reference import add_arguments as add_steps_arguments

    add_steps_arguments(steps)

    env = commands.add_parser("env", help="print library versions and device")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

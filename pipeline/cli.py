"""`distill`: run recipes, show a workdir's state, print the environment.

Exit codes: 0 success, 1 a step failed, 2 bad input (recipe, override, data, model reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.errors import UserError

console = Console()


def cmd_run(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    recipe = load_recipe(args.recipe, args.override)
    force = [name for value in args.force for name in value.split(",") if name]
    outcomes = run_recipe(recipe, until=args.until, force=force, dry_run=args.dry_run, console=console)
    # A cached evaluate step printed nothing this time: show its table again, the run's headline.
    for outcome in outcomes.values():
        if outcome.state == "skipped" and recipe.steps[outcome.name].uses == "evaluate":
            from pipeline.steps.evaluate import print_table

            print_table(json.loads((outcome.artifact.path / "results.json").read_text())["models"])
    ran = sum(o.state == "ran" for o in outcomes.values())
    console.print(f"[bold]{recipe.name}[/bold]: {ran} step(s) ran, {len(outcomes) - ran} skipped "
                  f"→ {outcomes[next(reversed(outcomes))].artifact.path.parent}")
    return 0


def cmd_status(args) -> int:
    if Path(args.path).is_file():
        return _status_of_recipe(args)
    if args.override or args.dry_run:
        raise UserError(f"{args.path}: -o and --dry-run go with a recipe file, not a workdir")
    from pipeline.runner import status

    args.workdir = args.path
    table = Table(title=str(args.workdir))
    for column in ("step", "type", "state", "rows", "seconds", "key"):
        table.add_column(column, justify="right" if column in ("rows", "seconds") else "left")
    colors = {"complete": "green", "failed": "red", "incomplete": "yellow", "pending": "dim"}
    for row in status(Path(args.workdir)):
        table.add_row(row["step"], row["uses"], f"[{colors[row['state']]}]{row['state']}",
                      "" if row["rows"] is None else str(row["rows"]),
                      "" if row["seconds"] is None else f"{row['seconds']:.1f}", row["key"] or "")
    console.print(table)
    return 0


def _status_of_recipe(args) -> int:
    """What `distill run RECIPE` would run and why, like `dvc status`; runs nothing."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import plan, workdir_for

    recipe = load_recipe(args.path, args.override)
    steps = plan(recipe, dry_run=args.dry_run)
    console.print(f"[bold]{args.path}[/bold] → {workdir_for(recipe, args.dry_run)}")
    for step in steps:
        state = "[yellow]would run [/yellow]" if step.action == "run" else "[green]up to date[/green]"
        why = f": {'; '.join(step.reasons)}" if step.reasons else ""
        # soft_wrap: a reason is never cut into pieces, so it can be copied and searched for
        console.print(f"{state}  {step.name} ({step.cfg.uses}, key {step.key}){why}", soft_wrap=True)
    would_run = sum(step.action == "run" for step in steps)
    console.print(f"{would_run} step(s) would run, {len(steps) - would_run} up to date")
    return 0


def cmd_env(args) -> int:
    from pipeline import __version__
    from pipeline.env import device, library_versions

    table = Table(title="distill env")
    table.add_column("component")
    table.add_column("version")
    for name, version in {"distillery": __version__, **library_versions(), "device": device()}.items():
        table.add_row(name, version)
    console.print(table)
    return 0


def cmd_eval(args) -> int:
    from pipeline.steps.evaluate import run_cli

    return run_cli(args)


def cmd_export(args) -> int:
    from pipeline.export import export

    path, rows = export(args.step_dir, args.format, args.out)
    console.print(f"{rows} rows -> {path}")
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench import run_benchmarks

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
    run.set_defaults(func=cmd_run)

    stat = commands.add_parser("status", help="what a recipe would run and why (RECIPE), or a workdir's steps (DIR)")
    stat.add_argument("path", metavar="RECIPE|WORKDIR")
    stat.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="as for `distill run`: status of the recipe with this key overridden")
    stat.add_argument("--dry-run", action="store_true", help="status of the recipe's --dry-run workdir")
    stat.set_defaults(func=cmd_status)

    from pipeline.steps.evaluate import add_cli_arguments

    evaluation = commands.add_parser("eval", help="evaluate models on benchmarks (or --rescore a saved run)")
    add_cli_arguments(evaluation)
    evaluation.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="write a finished dataset step as jsonl, parquet or sharegpt")
    export.add_argument("step_dir", help="a step dir, e.g. runs/quickstart/sft_data")
    export.add_argument("--format", required=True, choices=["jsonl", "parquet", "sharegpt"])
    export.add_argument("--out", help="file to write (default: <step><extension> in the current directory)")
    export.set_defaults(func=cmd_export)

    bench = commands.add_parser("bench", help="measure sampling, grading, training and caching side by side")
    from pipeline.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

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

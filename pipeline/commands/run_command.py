"""`distill run`: a recipe once, or once per seed (`--seeds`, each in <workdir>/seed-N, sharing the steps whose keys
match, then compared), printing each run's outcome (and, for a recipe with rounds, pass@1 by round) and writing its
run page."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.core.errors import UserError

console = Console()


def run(args) -> int:
    from pipeline.core.recipe import load_recipe
    from pipeline.core.runner import run_recipe
    from pipeline.core.workdir import workdir_for

    recipe = load_recipe(args.recipe, args.override)
    force = [name for value in args.force for name in value.split(",") if name]
    if args.seeds is not None:
        return _run_seeds(recipe, _parse_seeds(args.seeds), args, force)
    outcomes = run_recipe(recipe, until=args.until, force=force, dry_run=args.dry_run, console=console,
                          verbose=args.verbose)
    if outcomes is None:  # this machine only joined another machine's training step
        return 0
    _print_outcomes(recipe, outcomes)
    _write_report(workdir_for(recipe, args.dry_run))
    return 0


def _write_report(workdir: Path) -> None:
    """The run's page (`distill report`), written after every run so it shows the latest state."""
    from pipeline.commands.run_report.page import write_run_report

    console.print(f"run page → {write_run_report(workdir)}", soft_wrap=True)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct integers separated by commas, e.g. --seeds 0,1,2")
    return seeds


def _run_seeds(recipe, seeds: list[int], args, force: list[str]) -> int:
    """The recipe once per seed, each in <workdir>/seed-N, sharing every step whose key is the same in an earlier
    seed's workdir; then `distill compare` over their evaluations, also written to <workdir>/compare.md/.json."""
    from dataclasses import replace

    from pipeline.commands.compare import compare_paths, print_comparison, write_comparison
    from pipeline.core.runner import run_recipe
    from pipeline.core.workdir import prepare_parent_workdir, seed_workdir, workdir_for

    parent = recipe.workdir
    prepare_parent_workdir(parent)
    workdirs = []
    for position, seed in enumerate(seeds, 1):
        seeded = replace(recipe, seed=seed, workdir=seed_workdir(parent, seed),
                         document={**recipe.document, "seed": seed, "workdir": str(seed_workdir(parent, seed))})
        console.rule(f"[bold]seed {seed} ({position}/{len(seeds)})")
        outcomes = run_recipe(seeded, until=args.until, force=force, dry_run=args.dry_run, console=console,
                              share_from=workdirs, label=f"seed {seed} ({position}/{len(seeds)}) ",
                              verbose=args.verbose, run_name_prefix=f"{recipe.name}/seed-{seed}")
        _print_outcomes(seeded, outcomes, prefix=f"seed {seed}: ")
        workdirs.append(workdir_for(seeded, args.dry_run))
        _write_report(workdirs[-1])
    comparison = compare_paths(workdirs)
    if comparison["evaluations"]:
        print_comparison(comparison, console)
        paths = write_comparison(comparison, parent)
        console.print(f"seeds {','.join(map(str, seeds))} → {parent}; comparison → {', '.join(map(str, paths))}")
    return 0


def _print_outcomes(recipe, outcomes, prefix: str = "") -> None:
    # A cached evaluate step printed nothing this time: show its table again, the run's headline.
    for outcome in outcomes.values():
        if outcome.state == "skipped" and recipe.steps[outcome.name].uses == "evaluate":
            from eval.results import print_table

            print_table(json.loads((outcome.artifact.path / "results.json").read_text()))
    if recipe.rounds:
        _print_rounds(recipe, outcomes)
    counts = {state: sum(o.state == state for o in outcomes.values()) for state in ("ran", "copied", "skipped")}
    copied = f", {counts['copied']} copied" if counts["copied"] else ""
    console.print(f"[bold]{prefix}{recipe.name}[/bold]: {counts['ran']} step(s) ran{copied}, {counts['skipped']} "
                  f"skipped → {outcomes[next(reversed(outcomes))].artifact.path.parent}")


def _print_rounds(recipe, outcomes) -> None:
    """For each evaluation after the rounds block that holds two or more of the rounds' models (round 0: the model
    round 1 starts from): pass@1 by round and each round minus the one before, paired over problems."""
    from pipeline.commands.compare import by_round
    from pipeline.core.rounds import split_round

    for outcome in outcomes.values():
        if recipe.steps[outcome.name].uses != "evaluate" or split_round(outcome.name)[1] is not None:
            continue  # an evaluate step inside the block already compares its round with the one before
        results_path = outcome.artifact.path / "results.json"
        rows = by_round(recipe.rounds.models_by_round(), results_path, json.loads(results_path.read_text()))
        if not rows:
            continue
        table = Table(title=f"{outcome.name}: pass@1 (%) by round; minus the round before, paired over problems")
        for column in ("round", "model", "benchmark", "pass@1 ± stderr", "minus the round before [95%]", "MDD"):
            # fold, not cut: a model's name and an interval are read whole even on a narrow terminal
            table.add_column(column, justify="left" if column in ("model", "benchmark") else "right",
                             overflow="fold")
        for row in rows:
            stderr = "" if row["stderr"] is None else f" ± {100 * row['stderr']:.1f}"
            paired = row["minus_round_before"]
            versus = "–" if paired is None else (
                f"{100 * paired['difference']:+.1f}"
                + ("" if paired["stderr"] is None else f" ± {100 * paired['stderr']:.1f}")
                + f" [{100 * paired['ci95'][0]:+.1f}, {100 * paired['ci95'][1]:+.1f}]"
                + ("" if paired["detectable"] else ", no detectable difference"))
            mdd = "–" if paired is None or paired["mdd"] is None else f"{100 * paired['mdd']:.1f}"
            table.add_row(str(row["round"]), row["model"], row["benchmark"], f"{100 * row['pass@1']:.1f}{stderr}",
                          versus, mdd)
        console.print(table)

"""Run a recipe's steps in order, skipping the ones whose output is already complete (what `plan` says:
pipeline.core.keys), each written where `pipeline.core.workdir` says and published whole.

While a step runs, the console shows its progress row and nothing else (`pipeline.core.console`): what the step and its
libraries write goes to `<step>/log.txt` (the scratch dir's log.txt when it fails); each step ends with one line.

A training step that trains across machines runs `distill run` on every machine, over one workdir on a shared
filesystem: machine 0's runs as always, every other machine's only joins the step's launch and writes nothing there
(`_join_from_other_machine`).
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pipeline import __version__
from pipeline.core.artifacts import COMPLETE, MANIFEST, Artifact, Output, complete_key, write_json_atomic
from pipeline.core.cards import write_card
from pipeline.core.console import environment, step_console
from pipeline.core.env import RUN_NAME_ENV, library_versions, machine_rank_from_environment
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import CACHE_FILE, Fingerprints
from pipeline.core.hub import unpinned_warning
from pipeline.core.keys import StepPlan, plan
from pipeline.core.models import hub_revision, is_hub_id
from pipeline.core.outputs import RUN, RUN_FILE, make_dir, remove_made
from pipeline.core.recipe import Recipe
from pipeline.core.rounds import split_round
from pipeline.core.step import StepConfig, step_module
from pipeline.core.workdir import (
    ERROR_FILE,
    LOG_FILE,
    SCRATCH_KEY,
    check_workdir,
    publish,
    scratch_dir_of,
    tmp_dir_of,
    workdir_for,
    workdir_lock,
)


@dataclass
class StepOutcome:
    name: str
    state: str  # ran | skipped | copied (same key in another workdir of `distill run --seeds`)
    artifact: Artifact
    seconds: float


def run_recipe(recipe: Recipe, *, until: str | None = None, force: list[str] = (), dry_run: bool = False,
               console: Console | None = None, share_from: list[Path] = (), label: str = "", verbose: bool = False,
               run_name_prefix: str | None = None) -> dict[str, StepOutcome] | None:
    """Run what `plan` says must run. `share_from`: other workdirs (the other seeds of `distill run --seeds`); a
    step whose complete output with the same key is there is copied from it instead of run again. `label`
    starts every step's progress line (which seed is running). `verbose`: what steps and their libraries write
    is shown as it comes instead of going to their log files. A step's run in experiment trackers is named
    `<run_name_prefix>/<step>` (default prefix: the recipe's name). None on a machine that only joined a
    multi-machine training step (`_join_from_other_machine`): it has no outcomes to report."""
    console = console or Console()
    workdir = workdir_for(recipe, dry_run)
    fingerprints = Fingerprints(workdir / CACHE_FILE)
    # The cache is saved under the workdir lock below: a machine that only joins a multi-machine step takes no lock.
    steps = plan(recipe, until=until, force=force, dry_run=dry_run, fingerprints=fingerprints,
                 save_fingerprints=False)
    _check_before_writing(workdir, steps, console)
    across_machines = any(step.cfg.launch_machines() > 1 for step in steps)
    machine_rank = machine_rank_from_environment() if across_machines else None
    if machine_rank:
        _join_from_other_machine(steps, recipe, workdir, machine_rank, dry_run=dry_run, console=console, label=label,
                                 run_name_prefix=run_name_prefix)
        return None  # machine 0's `distill run` reports the run and writes its page into the shared workdir
    # Made before it is locked (the lock file is in it): a run that loses the lock to another never removes it.
    made = make_dir(workdir, RUN, "workdir")
    outcomes: dict[str, StepOutcome] = {}
    with workdir_lock(workdir):
        try:
            # Another run may have finished steps while this one waited to start: plan again under the lock.
            steps = plan(recipe, until=until, force=force, dry_run=dry_run, fingerprints=fingerprints)
            _write_run_record(workdir, recipe)
            fingerprints.save()
            previous_round = None
            for position, step in enumerate(steps, 1):
                round_number = split_round(step.name)[1]  # only the steps of a rounds block have one
                if round_number not in (None, previous_round):
                    console.print(f"[bold]{escape(label + recipe.rounds.title(round_number))}[/bold]")
                previous_round = round_number
                title = f"{label}[{position}/{len(steps)}] {step.name}"  # its progress row's
                outcomes[step.name] = _take_step(step, title, recipe, workdir, outcomes, dry_run=dry_run,
                                                 console=console, share_from=share_from, verbose=verbose,
                                                 run_name_prefix=run_name_prefix)
        except UserError:
            if not outcomes:
                remove_made(workdir, made)  # a refused run leaves nothing behind; the lock keeps other runs out
            raise
    return outcomes


def _check_before_writing(workdir: Path, steps: list[StepPlan], console: Console) -> None:
    """Everything that can refuse the run does so before the first byte is written (a model without a pinned
    revision is only warned about)."""
    check_workdir(workdir, [step.name for step in steps])
    for step in steps:
        if step.action == "run":
            step.cfg.check_inputs()
    for ref in dict.fromkeys(ref for step in steps for ref in step.inputs["models"]):
        if is_hub_id(ref) and hub_revision(ref)[1] is None:
            console.print(f"[yellow]warning: {unpinned_warning('model', ref, f'{ref}@<commit>')}[/yellow]")
    for step in steps:  # a step's own unpinned sources (a hub dataset `load` reads)
        for warning in step.cfg.run_warnings():
            console.print(f"[yellow]warning: {warning}[/yellow]")


def _write_run_record(workdir: Path, recipe: Recipe) -> None:
    """The run's record (recipe.json): its steps in order and the resolved recipe, which `distill status WORKDIR`
    and `distill report` read."""
    write_json_atomic(workdir / RUN_FILE, {"recipe": recipe.source, "steps": list(recipe.steps),
                                           "document": recipe.document,
                                           "models_by_round": recipe.rounds.models_by_round()
                                           if recipe.rounds else None})


def _take_step(step: StepPlan, title: str, recipe: Recipe, workdir: Path, outcomes: dict[str, StepOutcome], *,
               dry_run: bool, console: Console, share_from: list[Path], verbose: bool,
               run_name_prefix: str | None) -> StepOutcome:
    """Skip one step of the plan, copy it from another seed's workdir or run it, and say which in one line."""
    step_label = f"{title} ({step.cfg.uses})"
    if step.action == "skip":
        artifact = Artifact.from_dir(workdir / step.name)
        console.print(f"[dim]✓ {step_label}: complete, skipped (key {step.key}, {_rows(artifact)})[/dim]")
        return StepOutcome(step.name, "skipped", artifact, 0.0)
    same = None if step.forced else next(
        (d / step.name for d in share_from if complete_key(d / step.name) == step.key), None)
    if same is not None:
        artifact = _copy_step(same, workdir, step.name)
        console.print(f"[dim]✓ {step_label}: same key {step.key} as {same}, copied ({_rows(artifact)})[/dim]")
        return StepOutcome(step.name, "copied", artifact, 0.0)
    if verbose:  # library output follows: say whose
        console.rule(f"[bold]▶ {escape(step_label)}")
    run_name = f"{run_name_prefix or recipe.name}/{step.name}"
    started = time.time()
    try:
        artifact, seconds = _run_step(step, recipe, workdir, outcomes, dry_run, title=title, run_name=run_name,
                                      verbose=verbose)
    except UserError:
        raise
    except Exception:
        log = "" if verbose else f"; its output: {scratch_dir_of(workdir, step.name) / LOG_FILE}"
        console.print(f"[red]✗ {escape(step_label)}: failed after {time.time() - started:.1f}s[/red]"
                      f"{escape(log)}", soft_wrap=True)
        raise
    # why a step with an output runs again; a step with none yet just runs
    why = f"; runs because: {'; '.join(step.reasons)}" if step.reasons != ["no output yet"] else ""
    console.print(f"[green]✓ {escape(step_label)}: done in {seconds:.1f}s[/green] "
                  f"({_rows(artifact)}){escape(why)}", soft_wrap=True)
    return StepOutcome(step.name, "ran", artifact, seconds)


def _join_from_other_machine(steps: list[StepPlan], recipe: Recipe, workdir: Path, machine_rank: int, *,
                             dry_run: bool, console: Console, label: str, run_name_prefix: str | None) -> None:
    """`distill run` on a machine other than machine 0 of a multi-machine training step: this machine's share of each
    such step that runs, and nothing else. Machine 0's `distill run` holds the workdir lock, clears the step's dirs,
    writes its manifest and publishes it; this one writes nothing in the (shared) workdir."""
    if label:
        raise UserError("`distill run --seeds` cannot train across machines: run one seed at a time (-o seed=N, "
                        "with its own workdir)")
    running = [step for step in steps if step.action == "run"]
    running_names = {step.name for step in running}
    joined = [step.name for step in steps if step.cfg.launch_machines() > 1]
    for step in sorted(running, key=lambda step: step.name in joined):  # a step that is not ours is the first news
        waits_for = [parent for parent in recipe.dependencies(step.name) if parent in running_names]
        if step.name not in joined or waits_for:
            why = ("would run too, and only machine 0 runs steps that do not train across machines"
                   if step.name not in joined else f"reads {', '.join(waits_for)}, which would run first")
            raise UserError(f"this is machine {machine_rank} (from NODE_RANK or SLURM_NODEID) of the multi-machine "
                            f"training step {joined[0]!r}; step {step.name!r} ({step.cfg.uses}) {why}. On machines "
                            "other than 0, `distill run` only joins a training step whose inputs are complete: run "
                            f"the steps before it on one machine first (`distill run {recipe.source} --until <step>`), "
                            f"then `distill run {recipe.source} --until {joined[0]}` on every machine")
    if not running:
        console.print(f"machine {machine_rank}: {', '.join(joined)} complete; nothing to join")
    for step in running:
        out = _step_output(step, recipe, workdir, dry_run)
        inputs = {parent: Artifact.from_dir(workdir / parent) for parent in recipe.dependencies(step.name)}
        console.print(f"▶ {escape(step.name)} ({step.cfg.uses}): machine {machine_rank} of "
                      f"{step.cfg.launch_machines()} joins its training (key {step.key}); machine 0 "
                      f"writes its output, {workdir / step.name}", soft_wrap=True)
        started = time.time()
        with environment(**{RUN_NAME_ENV: f"{run_name_prefix or recipe.name}/{step.name}"}):
            step.cfg.join_launch(inputs, out)
        console.print(f"[green]✓ {escape(step.name)}: machine {machine_rank}'s share done in "
                      f"{time.time() - started:.1f}s[/green]")


def _step_output(step: StepPlan, recipe: Recipe, workdir: Path, dry_run: bool) -> Output:
    """Where a step writes while it runs (its tmp and scratch dirs), and its settings."""
    return Output(name=step.name, kind=step.cfg.produces, dir=tmp_dir_of(workdir, step.name),
                  scratch=scratch_dir_of(workdir, step.name), seed=step.cfg.effective_seed(recipe.seed),
                  dry_run=dry_run)


def _copy_step(source: Path, workdir: Path, name: str) -> Artifact:
    """A complete step output with the same key, copied whole (not linked: a later re-run or rescore of either
    copy must not change the other) and published like a run's output."""
    tmp = tmp_dir_of(workdir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, symlinks=True)
    publish(tmp, workdir / name)
    return Artifact.from_dir(workdir / name)


def _run_step(step: StepPlan, recipe: Recipe, workdir: Path, outcomes, dry_run, *, title: str, run_name: str,
              verbose: bool) -> tuple[Artifact, float]:
    name, cfg, key = step.name, step.cfg, step.key
    parents = recipe.dependencies(name)
    out = _step_output(step, recipe, workdir, dry_run)
    tmp, scratch = out.dir, out.scratch
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Scratch (resume state) is only valid for the same key, and --force asks for a fresh start.
    if step.forced or not (scratch / SCRATCH_KEY).exists() or (scratch / SCRATCH_KEY).read_text() != key:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(exist_ok=True)
    (scratch / SCRATCH_KEY).write_text(key)

    import datasets

    # `.map()` on a loaded dataset would otherwise write cache files into the (finished) input step's dir.
    datasets.disable_caching()
    module = step_module(cfg.uses)
    inputs = {p: outcomes[p].artifact for p in parents}
    started = time.time()
    try:
        with step_console(title, None if verbose else tmp / LOG_FILE), environment(**{RUN_NAME_ENV: run_name}):
            print(f"{title} ({cfg.uses}), key {key}, runs because: {'; '.join(step.reasons)}", flush=True)
            artifact = module.run(cfg, inputs, out)
    except UserError:
        # Bad input, not a crash: nothing of this attempt is worth keeping but the work saved to resume from.
        shutil.rmtree(tmp, ignore_errors=True)
        if [p.name for p in scratch.iterdir()] == [SCRATCH_KEY]:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    except Exception as e:
        write_json_atomic(tmp / ERROR_FILE, {"step": name, "key": key, "error": repr(e),
                                             "traceback": traceback.format_exc()})
        _keep_log(tmp, scratch)
        raise
    except KeyboardInterrupt:
        _keep_log(tmp, scratch)
        raise
    seconds = time.time() - started
    manifest = _manifest(step, recipe, artifact, started, seconds, dry_run)
    _write_card(tmp, manifest)  # before the manifest, which says the step is complete
    write_json_atomic(tmp / MANIFEST, manifest)
    final_dir = workdir / name
    publish(tmp, final_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return Artifact.from_dir(final_dir), seconds


def _manifest(step: StepPlan, recipe: Recipe, artifact: Artifact, started: float, seconds: float,
              dry_run: bool) -> dict:
    """What a step's manifest.json records: what it is, its key and everything the key hashes, its stats, when and
    where it ran."""
    from pipeline.core.env import device

    cfg = step.cfg
    return {
        "step": step.name,
        "uses": cfg.uses,
        "produces": cfg.produces,
        "status": COMPLETE,
        "key": step.key,
        "parents": step.inputs["parents"],
        "config": cfg.model_dump(mode="json"),
        "inputs": step.inputs,
        "seed": step.inputs["seed"],
        "dry_run": dry_run,
        "recipe": recipe.source,
        "stats": artifact.stats,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "versions": {"distillery": __version__, **library_versions()},
        "device": device(),
        "dtype": _dtype_record(cfg),
    }


def _write_card(tmp: Path, manifest: dict) -> None:
    """The step's Hub card (pipeline.core.cards). A card that cannot be written costs the step nothing: nothing reads
    it, and `distill push` renders a missing one from the manifests."""
    try:
        write_card(tmp, manifest)
    except Exception as error:  # noqa: BLE001 - documentation, not output: the step's work stands
        print(f"warning: no card written for step {manifest['step']!r} ({type(error).__name__}: {error})", flush=True)


def _dtype_record(cfg: StepConfig) -> dict | None:
    """The manifest's `dtype`: asked, chosen and why (None for a step that runs no model)."""
    choice = cfg.dtype_choice()
    return choice.record() if choice else None


def _keep_log(tmp: Path, scratch: Path) -> None:
    """A failed attempt's tmp dir is emptied when the step next starts; its log stays with the work saved to resume."""
    if (tmp / LOG_FILE).exists():
        os.replace(tmp / LOG_FILE, scratch / LOG_FILE)


def _rows(artifact: Artifact) -> str:
    return f"{artifact.stats['rows']} rows" if "rows" in artifact.stats else artifact.kind

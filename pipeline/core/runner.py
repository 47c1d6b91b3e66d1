"""Run a recipe's steps in order, skipping the ones whose output is already complete.

A step's key is a hash of everything its output depends on (`step_inputs`): its type, resolved config, its
seed (none for a step that draws no random numbers), its parents' keys, the content of every file it reads by
path, the identity of every model it reads, the versions of the libraries that shape its output and the version
of its own code. The record is kept in the manifest, so `plan` can say why a step would run (`input file
data/x.jsonl changed`, `math-verify 0.9.0 -> 0.9.1`, `config: n 4 -> 8`), the way `dvc status` does, before
anything runs.

The runner only ever replaces what it wrote: a directory with a step's name is replaced only if it holds a
Distillery manifest, and a workdir that is a non-empty directory not made by `distill run` is refused (the contract
every command's outputs follow is `pipeline.core.outputs`'s).

While a step runs, the console shows its progress row and nothing else (`pipeline.core.console`): what the step and its
libraries write goes to `<step>/log.txt` (`.<step>.scratch/log.txt` when it fails); each step ends with one line.

A training step that trains across machines runs `distill run` on every machine, over one workdir on a shared
filesystem: machine 0's runs as always, every other machine's only joins the step's launch and writes nothing there
(`_join_from_other_machine`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pipeline import __version__
from pipeline.core.artifacts import (
    COMPLETE,
    FOREIGN,
    MANIFEST,
    NO_OUTPUT,
    UNREADABLE,
    Artifact,
    Output,
    clean_leftovers,
    clean_stale_temp_dirs,
    complete_key,
    output_state,
    publish,
    read_manifest,
    write_json_atomic,
)
from pipeline.core.console import environment, step_console
from pipeline.core.env import RUN_NAME_ENV, library_versions, machine_rank_from_environment
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import CACHE_FILE, Fingerprints
from pipeline.core.models import STEP_PREFIX, hub_revision, is_hub_id, model_identity
from pipeline.core.outputs import RUN, RUN_FILE, made_by, make_dir, remove_made
from pipeline.core.recipe import ROUND_STEP_NAME, STEP_NAME, Recipe, split_round
from pipeline.core.step import STEP_MODULES, StepConfig, step_module

LOCK_FILE = ".lock"  # in the workdir: held by the one `distill run` or `distill report` using it
LOG_FILE = "log.txt"  # what a step and its libraries wrote while it ran, in its dir (in its scratch dir if it failed)


@dataclass
class StepOutcome:
    name: str
    state: str  # ran | skipped | copied (same key in another workdir of `distill run --seeds`)
    artifact: Artifact
    seconds: float


@dataclass
class StepPlan:
    """What `distill run` would do with one step, and why."""

    name: str
    cfg: StepConfig
    key: str
    inputs: dict  # everything the key hashes (written into the manifest)
    action: str  # run | skip
    reasons: list[str] = field(default_factory=list)  # why it runs; empty when skipped
    forced: bool = False


def step_inputs(cfg: StepConfig, seed: int, parent_keys: dict[str, str], fingerprints: Fingerprints,
                versions: dict[str, str]) -> dict:
    """Everything a step's output depends on, as the record its key hashes."""
    inputs = {
        "uses": cfg.uses,
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.effective_seed(seed),
        "parents": parent_keys,
        "files": {input_file_name(path): fingerprints.of(path) for path in dict.fromkeys(cfg.input_paths())},
        "models": {ref: model_identity(ref, fingerprints) for ref in dict.fromkeys(cfg.model_refs())
                   if isinstance(ref, str) and not ref.startswith(STEP_PREFIX)},
        "libraries": {name: versions.get(name, "not installed") for name in cfg.libraries},
        "code": _code_version(cfg, fingerprints),
    }
    dtype = cfg.dtype_choice()
    if dtype is not None:  # `dtype: auto` runs in another dtype on other hardware, and the dtype changes outputs
        inputs["dtype"] = dtype.dtype
    return inputs


def dtype_record(cfg: StepConfig) -> dict | None:
    """The manifest's `dtype`: asked, chosen and why (None for a step that runs no model)."""
    choice = cfg.dtype_choice()
    return choice.record() if choice else None


def input_file_name(path: str) -> str:
    """How a step's key names a file it reads (its content is hashed beside the name). Distillery's own package data
    (a registered benchmark's file in eval/data) by its place in the package, `distillery:eval/data/aime24.jsonl`,
    so the same bytes installed or checked out elsewhere give the same key; any other file as the recipe wrote it
    (a relative path stays relative, so moving a project or running it from another checkout re-runs nothing)."""
    if Path(path).is_absolute():
        resolved = Path(path).resolve()
        for package, root in _package_roots().items():
            if resolved.is_relative_to(root):
                return f"distillery:{package}/{resolved.relative_to(root).as_posix()}"
    return path


def _package_roots() -> dict[str, Path]:
    import eval as eval_package
    import pipeline as pipeline_package

    return {package.__name__: Path(package.__file__).resolve().parent for package in (eval_package, pipeline_package)}


def step_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _code_version(cfg: StepConfig, fingerprints: Fingerprints) -> str:
    if cfg.uses in STEP_MODULES:
        return f"{cfg.uses} {cfg.code_version}"
    source = inspect.getsourcefile(step_module(cfg.uses))
    return f"{cfg.uses} sha256:{fingerprints.of(source)}"


def dry_run_config(cfg: StepConfig) -> StepConfig:
    """Shrink a step for --dry-run: numbers never grow (a limit of 2 stays 2 under an override of 4)."""
    update = {}
    for field_name, small in cfg.dry_run_overrides.items():
        current = getattr(cfg, field_name)
        both_numbers = isinstance(current, (int, float)) and isinstance(small, (int, float))
        update[field_name] = min(current, small) if both_numbers else small
    return cfg.model_copy(update=update)


def _workdir_for(recipe: Recipe, dry_run: bool) -> Path:
    if not dry_run:
        return recipe.workdir
    # beside the workdir; `workdir: .` has no name of its own, so take the directory it stands for
    workdir = recipe.workdir if recipe.workdir.name else recipe.workdir.resolve()
    return workdir.with_name(workdir.name + "-dry-run")


def workdir_for(recipe: Recipe, dry_run: bool) -> Path:
    """`_workdir_for`, refused (naming the workdir) where its path holds a name longer than a file name may be
    (ENAMETOOLONG: every use of it would raise OSError); a workdir that does not exist yet is fine (a run makes it),
    and other problems are reported where the workdir is checked (check_workdir)."""
    workdir = _workdir_for(recipe, dry_run)
    try:
        os.stat(workdir)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise UserError(f"{workdir}: cannot use this path as the workdir ({error.strerror or error})") from None
    return workdir


def plan(recipe: Recipe, *, until: str | None = None, force: list[str] = (), dry_run: bool = False,
         fingerprints: Fingerprints | None = None, save_fingerprints: bool = True) -> list[StepPlan]:
    """Key every step (in order, up to `until`) and say which would run and why. Writes nothing but the
    fingerprint cache of a workdir distill made (and not that without `save_fingerprints`; nor where it cannot be
    written), and removes what a killed run left (`_clean_leftovers_if_idle`).
    A step runs unless its output is complete (`output_state`, the test `distill status` applies too) with its key."""
    names = list(recipe.steps)
    for step in ([until] if until else []) + [f for f in force if f != "all"]:
        if step not in recipe.steps:
            raise UserError(f"{recipe.source}: no step named {step!r} (steps: {', '.join(names)})")
    if until:
        names = names[: names.index(until) + 1]
    workdir = workdir_for(recipe, dry_run)
    _clean_leftovers_if_idle(workdir, names)
    fingerprints = fingerprints or Fingerprints(workdir / CACHE_FILE)
    versions = library_versions()
    forced: set[str] = set(recipe.steps) if "all" in force else set(force)
    plans: dict[str, StepPlan] = {}
    for name in names:
        cfg = dry_run_config(recipe.steps[name]) if dry_run else recipe.steps[name]
        parents = recipe.dependencies(name)
        forced_parents = [p for p in parents if p in forced]
        if forced_parents:
            forced.add(name)  # a forced step's output may differ: re-run what reads it
        inputs = step_inputs(cfg, recipe.seed, {p: plans[p].key for p in parents}, fingerprints, versions)
        step = StepPlan(name, cfg, step_key(inputs), inputs, "skip", forced=name in forced)
        final_dir = workdir / name
        complete, why_not = output_state(final_dir, name)  # what `distill status WORKDIR` says of it, too
        if step.forced:
            step.reasons = [f"parent {p} re-runs (--force)" for p in forced_parents] or ["--force"]
        elif complete is None:
            step.reasons = [why_not]
        elif complete != step.key:
            step.reasons = _why(final_dir, inputs, plans)
        if step.reasons:
            step.action = "run"
            step.reasons += _leftovers(workdir, name, step.key)
        plans[name] = step
    if save_fingerprints and _made_by_distill(workdir):
        fingerprints.save()
    return list(plans.values())


def _why(final_dir: Path, inputs: dict, plans: dict[str, StepPlan]) -> list[str]:
    """The differences between what the step's existing output was made from and what it would be made from now."""
    key, why_not = output_state(final_dir, final_dir.name)
    if key is None:
        return [why_not]
    manifest = read_manifest(final_dir)
    old = manifest.get("inputs")
    if not isinstance(old, dict):
        return ["its output was written by an older Distillery, which kept no record of its inputs"]
    reasons = [f"config: {path} {_short(before)} -> {_short(after)}"
               for path, before, after in _diff(_mapping(old.get("config")), inputs["config"])]
    if old.get("seed") != inputs["seed"]:
        reasons.append(f"seed {old.get('seed')} -> {inputs['seed']}" if inputs["seed"] is not None else
                       f"seed {old.get('seed')} -> none (the step draws no random numbers: keyed without a seed)")
    for parent, key in inputs["parents"].items():
        if _mapping(old.get("parents")).get(parent) != key:
            reruns = parent in plans and plans[parent].action == "run"
            reasons.append(f"parent {parent} {'re-runs' if reruns else 'changed'}")
    for what, label in (("files", "input file"), ("models", "model")):
        before, after = dict(_mapping(old.get(what))), inputs[what]
        if what == "files":  # recorded by absolute path before package data was keyed by its place in the package
            for path in [p for p in before if p not in after and _package_file_name(p) in after]:
                name, digest = _package_file_name(path), before.pop(path)
                if digest == after[name]:
                    reasons.append(f"{label} {name} was keyed by its path {path} (same content; package data is "
                                   "now keyed by its place in the package, wherever it is installed)")
                else:
                    reasons.append(f"{label} {name} changed")
                before[name] = after[name]
        for path in after:
            if path not in before:
                reasons.append(f"new {label} {path}")
            elif before[path] != after[path]:
                reasons.append(f"{label} {path} changed" if what == "files" else
                               f"{label} {path}: {before[path]} -> {after[path]}")
        reasons += [f"no longer reads {label} {path}" for path in before if path not in after]
    for library, version in inputs["libraries"].items():
        if _mapping(old.get("libraries")).get(library) != version:
            reasons.append(f"{library} {_mapping(old.get('libraries')).get(library, 'not recorded')} -> {version}")
    if old.get("code") != inputs["code"]:
        reasons.append(f"step code {old.get('code')} -> {inputs['code']}")
    if old.get("dtype") != inputs.get("dtype"):
        reasons.append(f"dtype {old.get('dtype', 'not recorded')} -> {inputs.get('dtype')}")
    return reasons or ["its inputs changed"]


def _package_file_name(path: str) -> str:
    """`input_file_name` of a path a manifest recorded, also where that package is no longer installed there."""
    parts = Path(path).parts
    if Path(path).is_absolute() and len(parts) > 3 and parts[-3:-1] == ("eval", "data"):
        return f"distillery:eval/data/{parts[-1]}"
    return input_file_name(path)


def _mapping(value) -> dict:
    """A manifest's record, or {} where a damaged or foreign manifest holds something else."""
    return value if isinstance(value, dict) else {}


def _diff(before, after, path: str = ""):
    """(dotted path, before, after) for each setting that differs between two resolved configs."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in dict.fromkeys([*before, *after]):
            yield from _diff(before.get(key), after.get(key), f"{path}.{key}" if path else key)
    elif before != after:
        yield path, before, after


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _leftovers(workdir: Path, name: str, key: str) -> list[str]:
    """What an earlier attempt left: a failure to report, or finished work (shards, checkpoints) to resume from."""
    notes = []
    if (workdir / f".{name}.tmp" / "error.json").exists():
        notes.append("it failed last time (error.json in its .tmp dir)")
    if _scratch_key(workdir / f".{name}.scratch") == key:
        notes.append("resumes the work an interrupted run saved")
    return notes


def _scratch_key(scratch: Path) -> str | None:
    """The key a step's scratch dir holds work for (its KEY file), or None."""
    try:
        return (scratch / "KEY").read_text()
    except (OSError, ValueError):
        return None


def _clean_leftovers_if_idle(workdir: Path, names) -> None:
    """Remove what killed runs left in a workdir distill made (`clean_leftovers`: a half-published step, `.STEP.old`,
    a published step's scratch dir), so that `distill run` and `distill status` see the same steps, and the temporary
    dirs of killed processes (`clean_stale_temp_dirs`). Only where there is something to remove, and only while no
    run is using the workdir: this takes its lock without waiting, for that moment; a busy or read-only workdir is
    left as it is."""
    clean_stale_temp_dirs()
    if not workdir.is_dir() or not _made_by_distill(workdir):
        return
    names = [name for name in names if _left_over(workdir, name)]
    if not names:
        return
    try:
        fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            fd = os.open(workdir / LOCK_FILE, os.O_RDONLY)  # a read-only workdir: nothing can be removed anyway
        except OSError:
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a run is using the workdir: what looks left over may be its work
    try:
        for name in names:
            clean_leftovers(workdir, name)
    finally:
        os.close(fd)


def _left_over(workdir: Path, name: str) -> bool:
    """Whether a kill during or just after publishing step `name` left something (`clean_leftovers` removes it)."""
    scratch, tmp_dir = workdir / f".{name}.scratch", workdir / f".{name}.tmp"
    if (workdir / f".{name}.old").exists() or (tmp_dir / MANIFEST).is_file():
        return True
    if not scratch.is_dir() or tmp_dir.exists():
        return False
    key = output_state(workdir / name, name)[0]
    return key is not None and _scratch_key(scratch) == key


def check_workdir(workdir: Path, steps: list[StepPlan]) -> None:
    """Refuse a workdir distill did not make and any path a step would replace that distill did not write."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not _made_by_distill(workdir):
        raise UserError(f"workdir {workdir} is a non-empty directory that `distill run` did not create; refusing to "
                        "write into it (set `workdir:` to a new or empty directory)")
    for step in steps:
        final_dir = workdir / step.name
        if not final_dir.exists() and not final_dir.is_symlink():
            continue
        # ours: a dir whose manifest names the step, or whose manifest does not read (cut short) in a workdir distill
        # made, which `distill run` re-runs the step over (`output_state`)
        why_not = output_state(final_dir, step.name)[1]
        ours = not why_not.endswith(FOREIGN) and (not why_not.startswith(UNREADABLE) or _made_by_distill(workdir))
        if not ours:
            raise UserError(f"{final_dir} exists and was not written by Distillery for step {step.name!r} "
                            f"(no manifest.json naming it); refusing to replace it: rename step {step.name!r} "
                            "or move that path")


def _made_by_distill(workdir: Path) -> bool:
    return made_by(workdir) == RUN


def prepare_parent_workdir(parent: Path) -> None:
    """The workdir `distill run --seeds` puts its seed-N workdirs in: refused like any workdir if distill did not
    make it, created (and marked) otherwise."""
    check_workdir(parent, [])
    make_dir(parent, RUN, "workdir")


@contextmanager
def workdir_lock(workdir: Path):
    """Hold the workdir's lock while the block runs, or refuse: one `distill run` or `distill report` at a time.
    A refused run removes a workdir it made while it holds this lock; a process that opened the lock file before
    that removal then locks a file no longer at its path, which guards nothing, so that counts as refused too."""
    path = workdir / LOCK_FILE
    busy = UserError(f"{workdir}: another `distill run` or `distill report` is using this workdir; try again when "
                     "it ends")
    try:
        lock = open(path, "a")  # "a": never truncate a lock another process holds
    except FileNotFoundError:
        raise busy from None  # the workdir went away: a run that made it was refused meanwhile
    except OSError as error:
        raise UserError(f"{path}: cannot open the workdir's lock ({error.strerror or error})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise busy
        yield


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
    # Everything that can refuse the run does so before the first byte is written.
    check_workdir(workdir, steps)
    for step in steps:
        if step.action == "run":
            step.cfg.check_inputs()
    for ref in dict.fromkeys(ref for step in steps for ref in step.inputs["models"]):
        if is_hub_id(ref) and hub_revision(ref)[1] is None:
            console.print(f"[yellow]warning: model {ref} has no revision: its weights can change on the hub without "
                          f"any step re-running; pin it as {ref}@<commit>[/yellow]")
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
            write_json_atomic(workdir / RUN_FILE, {"recipe": recipe.source, "steps": list(recipe.steps),
                                                   "document": recipe.document,
                                                   "models_by_round": recipe.rounds.models_by_round()
                                                   if recipe.rounds else None})
            fingerprints.save()
            previous_round = None
            for position, step in enumerate(steps, 1):
                round_number = split_round(step.name)[1]  # only the steps of a rounds block have one
                if round_number not in (None, previous_round):
                    console.print(f"[bold]{escape(label + recipe.rounds.title(round_number))}[/bold]")
                previous_round = round_number
                step_title = f"{label}[{position}/{len(steps)}] {step.name}"  # its progress row's
                step_label = f"{step_title} ({step.cfg.uses})"
                if step.action == "skip":
                    artifact = Artifact.from_dir(workdir / step.name)
                    outcomes[step.name] = StepOutcome(step.name, "skipped", artifact, 0.0)
                    console.print(f"[dim]✓ {step_label}: complete, skipped (key {step.key}, {_rows(artifact)})[/dim]")
                    continue
                same = None if step.forced else next(
                    (d / step.name for d in share_from if complete_key(d / step.name) == step.key), None)
                if same is not None:
                    artifact = _copy_step(same, workdir, step.name)
                    outcomes[step.name] = StepOutcome(step.name, "copied", artifact, 0.0)
                    console.print(f"[dim]✓ {step_label}: same key {step.key} as {same}, copied "
                                  f"({_rows(artifact)})[/dim]")
                    continue
                if verbose:  # library output follows: say whose
                    console.rule(f"[bold]▶ {escape(step_label)}")
                run_name = f"{run_name_prefix or recipe.name}/{step.name}"
                started = time.time()
                try:
                    artifact, seconds = _run_step(step, recipe, workdir, outcomes, dry_run, title=step_title,
                                                  run_name=run_name, verbose=verbose)
                except UserError:
                    raise
                except Exception:
                    log = "" if verbose else f"; its output: {workdir / f'.{step.name}.scratch' / LOG_FILE}"
                    console.print(f"[red]✗ {escape(step_label)}: failed after {time.time() - started:.1f}s[/red]"
                                  f"{escape(log)}", soft_wrap=True)
                    raise
                outcomes[step.name] = StepOutcome(step.name, "ran", artifact, seconds)
                # why a step with an output runs again; a step with none yet just runs
                why = f"; runs because: {'; '.join(step.reasons)}" if step.reasons != ["no output yet"] else ""
                console.print(f"[green]✓ {escape(step_label)}: done in {seconds:.1f}s[/green] "
                              f"({_rows(artifact)}){escape(why)}", soft_wrap=True)
        except UserError:
            if not outcomes:
                remove_made(workdir, made)  # a refused run leaves nothing behind; the lock keeps other runs out
            raise
    return outcomes


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
    return Output(name=step.name, kind=step.cfg.produces, dir=workdir / f".{step.name}.tmp",
                  scratch=workdir / f".{step.name}.scratch", seed=step.cfg.effective_seed(recipe.seed), dry_run=dry_run)


def _copy_step(source: Path, workdir: Path, name: str) -> Artifact:
    """A complete step output with the same key, copied whole (not linked: a later re-run or rescore of either
    copy must not change the other) and published like a run's output."""
    tmp_dir = workdir / f".{name}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.copytree(source, tmp_dir, symlinks=True)
    publish(tmp_dir, workdir / name)
    return Artifact.from_dir(workdir / name)


def _run_step(step: StepPlan, recipe: Recipe, workdir: Path, outcomes, dry_run, *, title: str, run_name: str,
              verbose: bool) -> tuple[Artifact, float]:
    name, cfg, key = step.name, step.cfg, step.key
    parents = recipe.dependencies(name)
    out = _step_output(step, recipe, workdir, dry_run)
    tmp_dir, scratch = out.dir, out.scratch
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    # Scratch (resume state) is only valid for the same key, and --force asks for a fresh start.
    if step.forced or not (scratch / "KEY").exists() or (scratch / "KEY").read_text() != key:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(exist_ok=True)
    (scratch / "KEY").write_text(key)

    import datasets

    # `.map()` on a loaded dataset would otherwise write cache files into the (finished) input step's dir.
    datasets.disable_caching()
    module = step_module(cfg.uses)
    inputs = {p: outcomes[p].artifact for p in parents}
    started = time.time()
    try:
        with step_console(title, None if verbose else tmp_dir / LOG_FILE), environment(**{RUN_NAME_ENV: run_name}):
            print(f"{title} ({cfg.uses}), key {key}, runs because: {'; '.join(step.reasons)}", flush=True)
            artifact = module.run(cfg, inputs, out)
    except UserError:
        # Bad input, not a crash: nothing of this attempt is worth keeping but the work saved to resume from.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if [p.name for p in scratch.iterdir()] == ["KEY"]:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    except Exception as e:
        write_json_atomic(tmp_dir / "error.json", {"step": name, "key": key, "error": repr(e),
                                                   "traceback": traceback.format_exc()})
        _keep_log(tmp_dir, scratch)
        raise
    except KeyboardInterrupt:
        _keep_log(tmp_dir, scratch)
        raise
    seconds = time.time() - started

    from pipeline.core.env import device

    manifest = {
        "step": name,
        "uses": cfg.uses,
        "produces": cfg.produces,
        "status": COMPLETE,
        "key": key,
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
        "dtype": dtype_record(cfg),
    }
    write_json_atomic(tmp_dir / MANIFEST, manifest)
    final_dir = workdir / name
    publish(tmp_dir, final_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return Artifact.from_dir(final_dir), seconds


def _keep_log(tmp_dir: Path, scratch: Path) -> None:
    """A failed attempt's tmp dir is emptied when the step next starts; its log stays with the work saved to resume."""
    if (tmp_dir / LOG_FILE).exists():
        os.replace(tmp_dir / LOG_FILE, scratch / LOG_FILE)


def _rows(artifact: Artifact) -> str:
    return f"{artifact.stats['rows']} rows" if "rows" in artifact.stats else artifact.kind


def status(workdir: Path) -> list[dict]:
    """One row per step of the last run in `workdir`: type, round (None outside a rounds block), state, rows,
    seconds, key, and `why`: what keeps an output that is there from being complete, in `plan`'s words (its
    `output_state`: output missing, manifest unreadable, not this step's), else None; `refused`: whether that makes
    `distill status WORKDIR` exit 2 (a manifest that does not read, a path that is not the step's output).
    Reads only (besides removing what killed runs left, `_clean_leftovers_if_idle`), so a read-only workdir works.
    A recipe.json that is not one `distill run` wrote is refused (UserError naming it)."""
    run_file = workdir / RUN_FILE
    if not run_file.exists():
        raise UserError(f"{workdir}: not a Distillery workdir (no {RUN_FILE}); run a recipe first")
    steps, document_steps = _last_run(run_file)
    _clean_leftovers_if_idle(workdir, steps)
    rows = []
    for name in steps:
        step_dir, tmp_dir, scratch = workdir / name, workdir / f".{name}.tmp", workdir / f".{name}.scratch"
        spec = document_steps.get(name)
        uses = spec.get("uses") if isinstance(spec, dict) else None
        row = {"step": name, "uses": uses if isinstance(uses, str) else "?", "round": split_round(name)[1],
               "state": "pending", "rows": None, "seconds": None, "key": None, "why": None, "refused": False}
        key, why_not = output_state(step_dir, name)  # what `plan` (`distill run`) decides by
        if why_not and why_not != NO_OUTPUT:
            row.update(why=why_not, refused=why_not.startswith(UNREADABLE) or why_not.endswith(FOREIGN))
        # A started-but-unfinished run outranks an older complete output of the same step; a scratch dir that holds
        # the complete output's key is what a kill just after publishing left, not a run of its own.
        if (tmp_dir / "error.json").exists():
            row["state"] = "failed"
        elif tmp_dir.exists() or (scratch.exists() and (key is None or _scratch_key(scratch) != key)):
            row["state"] = "incomplete"
        elif key is not None:
            stats, seconds = _complete_record(step_dir)
            row.update(state="complete", rows=stats.get("rows"), seconds=seconds, key=key)
        elif row["why"]:
            row["state"] = "incomplete"
        rows.append(row)
    return rows


def _last_run(run_file: Path) -> tuple[list[str], dict]:
    """The step names and the recipe document's steps from a workdir's recipe.json, or a UserError naming it."""
    todo = ("it is not a record `distill run` wrote: run the recipe into this workdir again (`distill run RECIPE`) to "
            "rewrite it, or give `distill status` a recipe file or another workdir")
    try:
        last_run = json.loads(run_file.read_text())
    except OSError as error:
        raise UserError(f"{run_file}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise UserError(f"{run_file}: not UTF-8 text; {todo}") from None
    except ValueError as error:
        raise UserError(f"{run_file}: not valid JSON ({error}); {todo}") from None
    if not isinstance(last_run, dict) or not isinstance(last_run.get("document"), dict):
        raise UserError(f"{run_file}: not a Distillery run record (a JSON object with `recipe`, `steps` and "
                        f"`document`); {todo}")
    steps = last_run.get("steps")
    if not isinstance(steps, list) or not all(
            isinstance(name, str) and (STEP_NAME.fullmatch(name) or ROUND_STEP_NAME.fullmatch(name)) for name in steps):
        raise UserError(f"{run_file}: `steps` is not a list of step names; {todo}")
    if len(set(steps)) != len(steps):
        raise UserError(f"{run_file}: `steps` names a step twice; {todo}")
    document_steps = last_run["document"].get("steps")
    return steps, document_steps if isinstance(document_steps, dict) else {}


def _complete_record(step_dir: Path) -> tuple[dict, float | None]:
    """A complete manifest's stats and seconds (empty where it records none)."""
    try:
        manifest = read_manifest(step_dir)
    except (OSError, ValueError):
        return {}, None
    seconds = manifest.get("seconds")
    return _mapping(manifest.get("stats")), seconds if isinstance(seconds, (int, float)) else None

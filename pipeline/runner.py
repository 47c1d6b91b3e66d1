"""Run a recipe's steps in order, skipping the ones whose output is already complete.

A step's key is a hash of its type, its resolved config, the recipe seed and its parents' keys, so a
changed setting re-runs that step and, through the keys, every step downstream of it, and nothing else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline import __version__
from pipeline.artifacts import (COMPLETE, MANIFEST, Artifact, Output, complete_key, publish, read_manifest,
                                write_json_atomic)
from pipeline.errors import UserError
from pipeline.recipe import Recipe
from pipeline.steps import StepConfig, step_module

RUN_FILE = "recipe.json"  # step order and resolved recipe of the last run, read by `distill status`


@dataclass
class StepOutcome:
    name: str
    state: str  # ran | skipped
    artifact: Artifact
    seconds: float


def step_key(cfg: StepConfig, seed: int, parent_keys: dict[str, str]) -> str:
    payload = {"uses": cfg.uses, "config": cfg.model_dump(mode="json"), "seed": seed, "parents": parent_keys}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dry_run_config(cfg: StepConfig) -> StepConfig:
    """Shrink a step for --dry-run: numbers never grow (a limit of 2 stays 2 under an override of 4)."""
    update = {}
    for field_name, small in cfg.dry_run_overrides.items():
        current = getattr(cfg, field_name)
        both_numbers = isinstance(current, (int, float)) and isinstance(small, (int, float))
        update[field_name] = min(current, small) if both_numbers else small
    return cfg.model_copy(update=update)


def workdir_for(recipe: Recipe, dry_run: bool) -> Path:
    return recipe.workdir.with_name(recipe.workdir.name + "-dry-run") if dry_run else recipe.workdir


@contextmanager
def workdir_lock(workdir: Path):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{workdir}: another `distill run` is using this workdir") from None
        yield


def run_recipe(recipe: Recipe, *, until: str | None = None, force: list[str] = (), dry_run: bool = False,
               console: Console | None = None) -> dict[str, StepOutcome]:
    console = console or Console()
    names = list(recipe.steps)
    for step in ([until] if until else []) + [f for f in force if f != "all"]:
        if step not in recipe.steps:
            raise UserError(f"{recipe.source}: no step named {step!r} (steps: {', '.join(names)})")
    if until:
        names = names[: names.index(until) + 1]
    workdir = workdir_for(recipe, dry_run)

    outcomes: dict[str, StepOutcome] = {}
    forced: set[str] = set(recipe.steps) if "all" in force else set(force)
    with workdir_lock(workdir):
        write_json_atomic(workdir / RUN_FILE, {"recipe": recipe.source, "steps": list(recipe.steps),
                                               "document": recipe.document})
        for position, name in enumerate(names, 1):
            cfg = dry_run_config(recipe.steps[name]) if dry_run else recipe.steps[name]
            parents = recipe.dependencies(name)
            if any(p in forced for p in parents):
                forced.add(name)  # a forced step's output may differ: re-run what reads it
            key = step_key(cfg, recipe.seed, {p: outcomes[p].artifact.key for p in parents})
            final_dir = workdir / name
            label = f"[{position}/{len(names)}] {name} ({cfg.uses})"
            if name not in forced and complete_key(final_dir) == key:
                artifact = Artifact.from_dir(final_dir)
                outcomes[name] = StepOutcome(name, "skipped", artifact, 0.0)
                console.print(f"[dim]✓ {label}: complete, skipped (key {key}, {_rows(artifact)})[/dim]")
                continue
            console.rule(f"[bold]▶ {label}")
            artifact, seconds = _run_step(name, cfg, key, recipe, workdir, outcomes, parents, dry_run)
            outcomes[name] = StepOutcome(name, "ran", artifact, seconds)
            console.print(f"[green]✓ {label}: done in {seconds:.1f}s[/green] ({_rows(artifact)})")
    return outcomes


def _run_step(name, cfg, key, recipe, workdir, outcomes, parents, dry_run) -> tuple[Artifact, float]:
    tmp_dir = workdir / f".{name}.tmp"
    scratch = workdir / f".{name}.scratch"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    # Scratch (resume state) is only valid for the same key: a changed config starts clean.
    if (scratch / "KEY").exists() and (scratch / "KEY").read_text() != key:
        shutil.rmtree(scratch)
    scratch.mkdir(exist_ok=True)
    (scratch / "KEY").write_text(key)

    import datasets

    # `.map()` on a loaded dataset would otherwise write cache files into the (finished) input step's dir.
    datasets.disable_caching()
    module = step_module(cfg.uses)
    out = Output(name=name, kind=cfg.produces, dir=tmp_dir, scratch=scratch, seed=recipe.seed, dry_run=dry_run)
    inputs = {p: outcomes[p].artifact for p in parents}
    started = time.time()
    try:
        artifact = module.run(cfg, inputs, out)
    except Exception as e:
        write_json_atomic(tmp_dir / "error.json", {"step": name, "key": key, "error": repr(e),
                                                   "traceback": traceback.format_exc()})
        raise
    seconds = time.time() - started

    from pipeline.env import device, library_versions

    manifest = {
        "step": name,
        "uses": cfg.uses,
        "produces": cfg.produces,
        "status": COMPLETE,
        "key": key,
        "parents": {p: outcomes[p].artifact.key for p in parents},
        "config": cfg.model_dump(mode="json"),
        "seed": recipe.seed,
        "dry_run": dry_run,
        "recipe": recipe.source,
        "stats": artifact.stats,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "versions": {"distillery": __version__, **library_versions()},
        "device": device(),
    }
    write_json_atomic(tmp_dir / MANIFEST, manifest)
    final_dir = workdir / name
    publish(tmp_dir, final_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return Artifact.from_dir(final_dir), seconds


def _rows(artifact: Artifact) -> str:
    return f"{artifact.stats['rows']} rows" if "rows" in artifact.stats else artifact.kind


def status(workdir: Path) -> list[dict]:
    """One row per step of the last run in `workdir`: state, rows, seconds, key."""
    run_file = workdir / RUN_FILE
    if not run_file.exists():
        raise UserError(f"{workdir}: not a Distillery workdir (no {RUN_FILE}); run a recipe first")
    last_run = json.loads(run_file.read_text())
    steps, document_steps = last_run["steps"], last_run["document"].get("steps", {})
    rows = []
    for name in steps:
        step_dir = workdir / name
        row = {"step": name, "uses": document_steps.get(name, {}).get("uses", "?"), "state": "pending",
               "rows": None, "seconds": None, "key": None}
        # A started-but-unfinished run outranks an older complete output of the same step.
        if (workdir / f".{name}.tmp" / "error.json").exists():
            row["state"] = "failed"
        elif (workdir / f".{name}.tmp").exists() or (workdir / f".{name}.scratch").exists():
            row["state"] = "incomplete"
        elif complete_key(step_dir):
            manifest = read_manifest(step_dir)
            row.update(state="complete", rows=manifest["stats"].get("rows"), seconds=manifest["seconds"],
                       key=manifest["key"])
        rows.append(row)
    return rows

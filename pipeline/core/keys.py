"""A step's key, and why a step would run: the plan `distill run` follows and `distill status RECIPE` shows.

A step's key is a hash of everything its output depends on (`step_inputs`): its type, resolved config, its
seed (none for a step that draws no random numbers), its parents' keys, the content of every file it reads by
path, the identity of every model it reads, the versions of the libraries that shape its output and the version
of its own code. The record is kept in the manifest, so `plan` can say why a step would run (`input file
data/x.jsonl changed`, `math-verify 0.9.0 -> 0.9.1`, `config: n 4 -> 8`), the way `dvc status` does, before
anything runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.artifacts import output_state, read_manifest
from pipeline.core.env import library_versions
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import CACHE_FILE, Fingerprints
from pipeline.core.models import STEP_PREFIX, model_identity
from pipeline.core.recipe import Recipe
from pipeline.core.step import STEP_MODULES, StepConfig, step_module
from pipeline.core.workdir import (
    ERROR_FILE,
    clean_leftovers_if_idle,
    made_by_distill,
    scratch_dir_of,
    scratch_key,
    tmp_dir_of,
    workdir_for,
)


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
        "config": keyed_config(cfg),
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


def keyed_config(cfg: StepConfig) -> dict:
    """The step's settings as its key hashes them: every field, except a `keyed_when_set` field at its default."""
    config = cfg.model_dump(mode="json")
    for name in cfg.keyed_when_set:
        if getattr(cfg, name) == type(cfg).model_fields[name].get_default(call_default_factory=True):
            del config[name]
    return config


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
    """Where Distillery's packages are, found as `import` would find them but not imported: only their data is
    keyed here (the recipe engine reads no code of the layers above it)."""
    return {package: Path(importlib.util.find_spec(package).origin).resolve().parent
            for package in ("eval", "pipeline")}


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


def plan(recipe: Recipe, *, until: str | None = None, force: list[str] = (), dry_run: bool = False,
         fingerprints: Fingerprints | None = None, save_fingerprints: bool = True) -> list[StepPlan]:
    """Key every step (in order, up to `until`) and say which would run and why. Writes nothing but the
    fingerprint cache of a workdir distill made (and not that without `save_fingerprints`; nor where it cannot be
    written), and removes what a killed run left (`clean_leftovers_if_idle`).
    A step runs unless its output is complete (`output_state`, the test `distill status` applies too) with its key."""
    names = list(recipe.steps)
    for step in ([until] if until else []) + [f for f in force if f != "all"]:
        if step not in recipe.steps:
            raise UserError(f"{recipe.source}: no step named {step!r} (steps: {', '.join(names)})")
    if until:
        names = names[: names.index(until) + 1]
    workdir = workdir_for(recipe, dry_run)
    clean_leftovers_if_idle(workdir, names)
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
    if save_fingerprints and made_by_distill(workdir):
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
            for path in [p for p in before if p not in after and _recorded_file_name(p) in after]:
                name, digest = _recorded_file_name(path), before.pop(path)
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


def _recorded_file_name(path: str) -> str:
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
    if (tmp_dir_of(workdir, name) / ERROR_FILE).exists():
        notes.append("it failed last time (error.json in its .tmp dir)")
    if scratch_key(scratch_dir_of(workdir, name)) == key:
        notes.append("resumes the work an interrupted run saved")
    return notes

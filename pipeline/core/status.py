"""`distill status WORKDIR`: the state of each step of a workdir's last run, read from disk.

A step is complete by the one test `distill run` applies too (`pipeline.core.artifacts.output_state`), so status
and run never disagree; a step that started and did not finish shows as failed or incomplete by what it left in
its dirs (`pipeline.core.workdir`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.artifacts import FOREIGN, NO_OUTPUT, UNREADABLE, output_state, read_manifest
from pipeline.core.errors import UserError
from pipeline.core.outputs import RUN_FILE
from pipeline.core.recipe import STEP_NAME
from pipeline.core.rounds import ROUND_STEP_NAME, split_round
from pipeline.core.workdir import ERROR_FILE, clean_leftovers_if_idle, scratch_dir_of, scratch_key, tmp_dir_of


def status(workdir: Path) -> list[dict]:
    """One row per step of the last run in `workdir`: type, round (None outside a rounds block), state, rows,
    seconds, key, and `why`: what keeps an output that is there from being complete, in `plan`'s words (its
    `output_state`: output missing, manifest unreadable, not this step's), else None; `refused`: whether that makes
    `distill status WORKDIR` exit 2 (a manifest that does not read, a path that is not the step's output).
    Reads only (besides removing what killed runs left, `clean_leftovers_if_idle`), so a read-only workdir works.
    A recipe.json that is not one `distill run` wrote is refused (UserError naming it)."""
    run_file = workdir / RUN_FILE
    if not run_file.exists():
        raise UserError(f"{workdir}: not a Distillery workdir (no {RUN_FILE}); run a recipe first")
    steps, document_steps = _last_run(run_file)
    clean_leftovers_if_idle(workdir, steps)
    rows = []
    for name in steps:
        step_dir, tmp, scratch = workdir / name, tmp_dir_of(workdir, name), scratch_dir_of(workdir, name)
        spec = document_steps.get(name)
        uses = spec.get("uses") if isinstance(spec, dict) else None
        row = {"step": name, "uses": uses if isinstance(uses, str) else "?", "round": split_round(name)[1],
               "state": "pending", "rows": None, "seconds": None, "key": None, "why": None, "refused": False}
        key, why_not = output_state(step_dir, name)  # what `plan` (`distill run`) decides by
        if why_not and why_not != NO_OUTPUT:
            row.update(why=why_not, refused=why_not.startswith(UNREADABLE) or why_not.endswith(FOREIGN))
        # A started-but-unfinished run outranks an older complete output of the same step; a scratch dir that holds
        # the complete output's key is what a kill just after publishing left, not a run of its own.
        if (tmp / ERROR_FILE).exists():
            row["state"] = "failed"
        elif tmp.exists() or (scratch.exists() and (key is None or scratch_key(scratch) != key)):
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
    stats, seconds = manifest.get("stats"), manifest.get("seconds")
    return stats if isinstance(stats, dict) else {}, seconds if isinstance(seconds, (int, float)) else None

"""The steps of a run's workdir as the run page shows them: state, rows, seconds and key as `distill status` reads
them, the steps each one reads, and the manifest of each complete one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.artifacts import COMPLETE, read_manifest
from pipeline.core.errors import UserError
from pipeline.core.models import STEP_PREFIX
from pipeline.core.outputs import RUN_FILE
from pipeline.core.status import status


@dataclass
class StepView:
    """One step of the last run, as the report shows it."""

    name: str
    uses: str
    state: str  # complete | failed | incomplete | pending (pipeline.core.status.status)
    rows: int | None
    seconds: float | None
    key: str | None
    parents: list[str]  # the earlier steps it reads (datasets and step: models)
    path: Path
    manifest: dict = field(default_factory=dict)  # empty unless complete

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {})

    @property
    def produces(self) -> str | None:
        return self.manifest.get("produces")


def read_steps(workdir: Path) -> list[StepView]:
    """The steps of the last run in `workdir`, in run order, with their manifests where complete."""
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such directory (give the workdir of a `distill run`)")
    seed_runs = sorted(workdir.glob(f"seed-*/{RUN_FILE}"))
    if not (workdir / RUN_FILE).is_file() and seed_runs:
        raise UserError(f"{workdir}: a `distill run --seeds` workdir; report one seed's run, e.g. "
                        f"`distill report {seed_runs[0].parent}`")
    rows = status(workdir)  # raises the UserError for a dir that is not a workdir
    document_steps = json.loads((workdir / RUN_FILE).read_text())["document"].get("steps", {})
    steps = []
    for row in rows:
        name = row["step"]
        manifest = read_manifest(workdir / name) if row["state"] == COMPLETE else {}
        parents = list(manifest["parents"]) if manifest else _parents_in_recipe(document_steps.get(name, {}))
        steps.append(StepView(name, row["uses"], row["state"], row["rows"], row["seconds"], row["key"],
                              parents, workdir / name, manifest))
    return steps


def _parents_in_recipe(spec: dict) -> list[str]:
    """What a step that has not run reads, from its recipe entry: its `input` and every `step:NAME` it names (the
    runner's `Recipe.dependencies`, without validating a config whose files may not be readable from here)."""
    names = [spec["input"]] if isinstance(spec.get("input"), str) else []

    def step_refs(value):
        if isinstance(value, str) and value.startswith(STEP_PREFIX):
            yield value.removeprefix(STEP_PREFIX)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from step_refs(item)

    for value in spec.values():
        names += step_refs(value)
    return list(dict.fromkeys(names))

"""A step type for testing the runner alone: fast, and able to sleep or fail on demand.

Used as `uses: tests.toy_steps` (a dotted module path, the way users plug in their own steps).
TOY_SLEEP_S (env) makes `run` sleep, so a test can kill the process mid-step.
"""

import os
import time
from typing import ClassVar

from pydantic import Field

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.step import StepConfig


class Config(StepConfig):
    rows: int = Field(default=3, ge=1, description="Rows to add.")
    fail: bool = Field(default=False, description="Raise instead of writing.")
    model: str | None = Field(default=None, description="A model the step says it reads (it only records it).")
    notes: str | None = Field(default=None, description="A file path, undeclared: found by the path heuristic.")

    dry_run_overrides: ClassVar[dict] = {"rows": 1}

    def model_refs(self) -> list[str]:
        return [self.model] if self.model else []


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import datasets

    time.sleep(float(os.environ.get("TOY_SLEEP_S", "0")))
    if cfg.fail:
        raise RuntimeError("toy step asked to fail")
    found_in_scratch = sorted(p.name for p in out.scratch.iterdir() if p.name != "KEY")
    (out.scratch / "progress").write_text("work a killed run would resume from")
    upstream = inputs[cfg.input].dataset()["value"] if cfg.input else []
    values = list(upstream) + [f"{out.name}-{i}" for i in range(cfg.rows)]
    return out.write_dataset(datasets.Dataset.from_dict({"value": values}), found_in_scratch=found_in_scratch)

"""A step type for testing the runner alone: fast, and able to sleep or fail on demand.

Used as `uses: tests.toy_steps` (a dotted module path, the way users plug in their own steps).
TOY_SLEEP_S (env) makes `run` sleep, so a test can kill the process mid-step.
"""

import os
import time
from typing import ClassVar

from pydantic import Field

from pipeline.artifacts import Artifact, Output
from pipeline.steps import StepConfig


class Config(StepConfig):
    rows: int = Field(default=3, ge=1, description="Rows to add.")
    fail: bool = Field(default=False, description="Raise instead of writing.")

    dry_run_overrides: ClassVar[dict] = {"rows": 1}


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import datasets

    time.sleep(float(os.environ.get("TOY_SLEEP_S", "0")))
    if cfg.fail:
        raise RuntimeError("toy step asked to fail")
    upstream = inputs[cfg.input].dataset()["value"] if cfg.input else []
    values = list(upstream) + [f"{out.name}-{i}" for i in range(cfg.rows)]
    return out.write_dataset(datasets.Dataset.from_dict({"value": values}))

"""A toy step that says it runs a model (`dtype`), for testing how the runner keys and records the dtype choice.

Used as `uses: tests.toy_dtype_step`; it writes the dtype it was told to run in.
"""

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.step import StepConfig


class Config(DtypeSetting, StepConfig):
    pass


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import datasets

    return out.write_dataset(datasets.Dataset.from_dict({"dtype": [cfg.dtype_choice().dtype]}))

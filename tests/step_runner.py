"""Run one step module directly on hand-made rows, the way the runner would hand them over."""

from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output


def run_on_rows(module, tmp_path, rows, *, uses, input_name="graded", dry_run=False, **config):
    """Save `rows` as step `input_name`'s dataset, run step `uses` (from `module`) on it: (artifact, dataset)."""
    Dataset.from_list(rows).save_to_disk(str(tmp_path / input_name / "data"))
    inputs = {input_name: Artifact(input_name, "dataset", tmp_path / input_name)}
    out = Output(name=uses, kind="dataset", dir=tmp_path / "out", scratch=tmp_path / "scratch", seed=0,
                 dry_run=dry_run)
    artifact = module.run(module.Config(uses=uses, input=input_name, **config), inputs, out)
    return artifact, artifact.dataset()

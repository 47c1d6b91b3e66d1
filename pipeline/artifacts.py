"""What a step leaves on disk, and how it gets there without ever looking complete too early.

    <workdir>/<step>/manifest.json   step type, key, resolved config, rows, timings, versions, status
    <workdir>/<step>/data/           a datasets.Dataset (save_to_disk)      -- dataset steps
    <workdir>/<step>/model/          a Hugging Face model dir               -- model steps
    <workdir>/<step>/*               anything else (results.json, report.md) -- report steps

A step writes into `<workdir>/.<step>.tmp/`; the runner writes the manifest last and renames the
directory into place, so a killed step leaves no directory that says complete. Work a step wants
to keep across a crash (sample shards, Trainer checkpoints) goes in `<workdir>/.<step>.scratch/`,
which survives until the step completes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
COMPLETE = "complete"


@dataclass
class Artifact:
    """A finished step's output, as later steps see it."""

    name: str
    kind: str  # dataset | model | report
    path: Path  # the step directory
    key: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def dataset(self):
        import datasets

        if self.kind != "dataset":
            raise TypeError(f"step {self.name!r} produced a {self.kind}, not a dataset")
        return datasets.load_from_disk(str(self.data_dir))

    @classmethod
    def from_dir(cls, path: Path) -> "Artifact":
        manifest = read_manifest(path)
        return cls(name=manifest["step"], kind=manifest["produces"], path=path, key=manifest["key"],
                   stats=manifest.get("stats", {}))


@dataclass
class Output:
    """Handed to a step's `run`: where to write, and the run's settings."""

    name: str
    kind: str
    dir: Path  # temporary step dir, renamed into place by the runner on success
    scratch: Path  # survives a crash; cleared once the step completes or its key changes
    seed: int | None  # None for a step that draws no random numbers
    dry_run: bool = False

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def write_dataset(self, dataset, **stats) -> Artifact:
        """Save a datasets.Dataset as this step's output; `stats` go into the manifest."""
        # datasets 5.2 writes no data file for 0 rows unless asked for one shard, and then cannot load it.
        dataset.save_to_disk(str(self.data_dir), num_shards=1 if len(dataset) == 0 else None)
        stats.setdefault("rows", len(dataset))
        return Artifact(self.name, "dataset", self.dir, stats=stats)

    def model_written(self, **stats) -> Artifact:
        """Call after saving a model (or a peft adapter) into `model_dir`; `stats` go into the manifest."""
        if not any((self.model_dir / f).exists() for f in ("config.json", "adapter_config.json")):
            raise RuntimeError(f"step {self.name!r} did not write a model or adapter into {self.model_dir}")
        return Artifact(self.name, "model", self.dir, stats=stats)

    def report_written(self, **stats) -> Artifact:
        return Artifact(self.name, "report", self.dir, stats=stats)


def read_manifest(step_dir: Path) -> dict[str, Any]:
    with open(step_dir / MANIFEST) as f:
        return json.load(f)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_key(step_dir: Path) -> str | None:
    """The key of a complete step dir, or None if absent, broken or incomplete."""
    try:
        manifest = read_manifest(step_dir)
    except (OSError, ValueError):
        return None
    return manifest.get("key") if manifest.get("status") == COMPLETE else None


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temp dir into place, replacing an older output of the same step (never anything else)."""
    if final_dir.exists():
        if not (final_dir / MANIFEST).is_file():
            raise FileExistsError(f"{final_dir} holds no {MANIFEST}: not a step output, not replacing it")
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)

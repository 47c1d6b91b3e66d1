"""`load`: read problems from JSONL, JSON, parquet or an Arrow dir into the `problems` contract.

Every column of the file passes through (so a file of existing completions can be re-graded by
load -> verify); `id`, `problem` and `answer` are checked: ids unique and non-empty, problem and
answer non-empty, answer turned into a string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, field_validator

from pipeline.artifacts import Artifact, Output
from pipeline.errors import UserError
from pipeline.steps import StepConfig
from pipeline.tables import check_problems, read_table

REQUIRED_COLUMNS = ("id", "problem", "answer")


class Config(StepConfig):
    path: str = Field(description="JSONL/JSON/parquet file, or a directory written by datasets.save_to_disk.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns on load, source -> contract name, e.g. {question: problem}.")
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N rows.")
    require: list[str] = Field(
        default=list(REQUIRED_COLUMNS),
        description="Columns that must be present and non-empty in every row.")
    unique_ids: bool = Field(
        default=True,
        description="Refuse repeated ids. Turn off to load several completions per problem for re-grading.")

    dry_run_overrides: ClassVar[dict] = {"limit": 4}
    path_fields: ClassVar = ("path",)
    libraries: ClassVar = ("datasets",)
    # 2: pipeline.tables reads JSON(L) itself: mixed str/number columns become exact strings, ISO dates stay strings.
    # 3: a column of numbers with an integer beyond 64 bits is exact strings too (pyarrow made it floats).
    code_version: ClassVar[str] = "3"
    uses_seed: ClassVar = False  # the first `limit` rows, in file order

    # the rows check_inputs read, so that run does not read the file a second time
    _checked_rows: Any = PrivateAttr(default=None)

    def check_inputs(self) -> None:
        self._checked_rows = problems(self)  # a file that cannot load fails the run before anything is written

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not Path(path).exists():
            raise ValueError(f"file not found: {path} (relative paths are read from {Path.cwd()})")
        return path


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    rows = cfg._checked_rows if cfg._checked_rows is not None else problems(cfg)
    return out.write_dataset(rows, source=cfg.path)


def problems(cfg: Config):
    """The file's rows as the step writes them: renamed, cut to `limit`, ids and answers as strings, checked."""
    import datasets

    ds = read_table(cfg.path)
    unknown = [c for c in cfg.columns if c not in ds.column_names]
    if unknown:
        raise UserError(f"{cfg.path}: columns {unknown} named in `columns` are not in the file ({ds.column_names})")
    if cfg.columns:
        ds = ds.rename_columns(cfg.columns)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{cfg.path}: no rows")
    # Ids and answers are strings in every contract, whatever the file stored (ints, floats).
    for column in ("id", "answer"):
        if column not in ds.column_names:
            continue
        feature = ds.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            ds = ds.cast_column(column, datasets.Value("string"))  # arrow writes integers as str() does, in C
        elif getattr(feature, "dtype", None) != "string":  # floats, booleans, lists, objects: as str() writes them
            ds = ds.map(lambda row, c=column: {c: None if row[c] is None else str(row[c])},
                        features=datasets.Features({**ds.features, column: datasets.Value("string")}))
    check_problems(ds, cfg.path, cfg.require, cfg.unique_ids)
    return ds

"""`load`: read problems from JSONL, JSON, parquet or an Arrow dir into the `problems` contract.

Every column of the file passes through (so a file of existing completions can be re-graded by
load -> verify); `id`, `problem` and `answer` are checked: ids unique and non-empty, problem and
answer non-empty strings or numbers (an object, a list, a boolean, NaN or an infinity is refused with
its row), answer turned into a string. `columns` may not rename two columns onto one name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, field_validator

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.funnel import FunnelStage
from pipeline.core.step import StepConfig
from pipeline.text.json_lines import number_texts
from pipeline.text.problems import check_problems
from pipeline.text.tables import read_table

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
    # 2: pipeline.text.tables reads JSON(L) itself: mixed str/number columns become exact strings, ISO dates stay strings.
    # 3: a column of numbers with an integer beyond 64 bits is exact strings too (pyarrow made it floats).
    # 4: problem and answer must be strings or numbers (objects, lists, booleans, NaN refused); a JSON column mixing
    #    booleans with strings keeps them as booleans (was the strings "true"/"false").
    code_version: ClassVar[str] = "4"
    uses_seed: ClassVar = False  # the first `limit` rows, in file order

    # the rows check_inputs read, so that run does not read the file a second time
    _checked_rows: Any = PrivateAttr(default=None)

    def check_inputs(self) -> None:
        self._checked_rows = problems(self)  # a file that cannot load fails the run before anything is written

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not path.strip():  # Path("") is the working directory: it would be hashed whole before failing
            raise ValueError("empty path: name a data file or a dir written by datasets.save_to_disk")
        if not Path(path).exists():
            raise ValueError(f"file not found: {path} (relative paths are read from {Path.cwd()})")
        return path

    @field_validator("columns")
    @classmethod
    def _one_source_per_name(cls, columns: dict[str, str]) -> dict[str, str]:
        sources: dict[str, list[str]] = {}
        for source, target in columns.items():
            if not target.strip():
                raise ValueError(f"{source!r} is renamed to an empty name")
            sources.setdefault(target, []).append(source)
        for target, named in sources.items():
            if len(named) > 1:
                raise ValueError(f"{' and '.join(map(repr, named))} are each renamed to {target!r}; "
                                 "a column can come from one source only")
        return columns


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: the rows are the problems."""
    return FunnelStage("problems", stats["rows"])


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
        _check_renames(cfg, ds.column_names)
        ds = ds.rename_columns(cfg.columns)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{cfg.path}: no rows")
    # Checked as the file holds them, before the conversion below could turn an object or NaN into text.
    check_problems(ds, cfg.path, cfg.require, cfg.unique_ids)
    # Ids and answers are strings in every contract, whatever the file stored (ints, floats).
    for column in ("id", "answer"):
        if column not in ds.column_names:
            continue
        feature = ds.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
            # Arrow reads 1 beside 2.5 as the float 1.0; the answer the file wrote is "1": the numbers as written.
            source = next((old for old, new in cfg.columns.items() if new == column), column)
            texts = number_texts(cfg.path, source)
            if texts is not None and len(texts) >= len(ds):
                order = ds.column_names
                ds = ds.remove_columns([column]).add_column(column, texts[:len(ds)],
                                                            feature=datasets.Value("string")).select_columns(order)
                continue
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            ds = ds.cast_column(column, datasets.Value("string"))  # arrow writes integers as str() does, in C
        elif getattr(feature, "dtype", None) != "string":  # floats, booleans, lists, objects: as str() writes them
            ds = ds.map(lambda row, c=column: {c: None if row[c] is None else str(row[c])},
                        features=datasets.Features({**ds.features, column: datasets.Value("string")}))
    return ds


def _check_renames(cfg: Config, file_columns: list[str]) -> None:
    """Refuse `columns` that would leave two columns with one name: a source renamed onto a column the file has and
    `columns` does not rename away, or (a recipe not validated by Config) two sources renamed to one name."""
    taken: dict[str, str] = {column: column for column in file_columns if column not in cfg.columns}
    for source, target in cfg.columns.items():
        if target in taken:
            other = taken[target]
            if other == target:
                raise UserError(f"{cfg.path}: `columns: {{{source}: {target}}}` renames {source!r} onto the file's "
                                f"own column {target!r}; rename that one away too (e.g. `{target}: {target}_orig`) "
                                f"or drop one of them")
            raise UserError(f"{cfg.path}: `columns` renames both {other!r} and {source!r} to {target!r}; a column "
                            "can come from one source only")
        taken[target] = source

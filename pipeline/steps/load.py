"""`load`: read problems, or published traces, from a local file or a Hugging Face Hub dataset into the `problems`
(or `samples`) contract.

The source is a file (`path`: JSONL, JSON, parquet or an Arrow dir) or a dataset laid out as a Hugging Face Hub
repository (`hub`: a hub id, or a local directory with a README.md whose YAML `configs:` name the data files).

Every column passes through (so a file of existing completions can be re-graded by load -> verify); `id`,
`problem` and `answer` are checked: ids unique and non-empty, problem and answer non-empty strings or numbers (an
object, a list, a boolean, NaN or an infinity is refused with its row), answer turned into a string. `columns` may
not rename two columns onto one name. A dataset without ids gets them from `ids: row`: each row's position in the
source ("0", "1", ...; not padded, so the same row keeps its id under any `limit`).

From the Hub (pipeline.text.hub_datasets, through `datasets.load_dataset`): `hub: org/name` with `config`, `split`,
`revision` (pinned like models, `org/name@REVISION` or `revision:`; one rule, pipeline.core.hub) and `data_files`.
The step's key covers the revision for a hub id (unpinned: `distill run` warns) and the files' content for a local
directory. Offline (HF_HUB_OFFLINE=1, or no network) it reads the hub cache, and a dataset or revision that is not
cached is refused (exit 2) naming both, before anything runs. `streaming: true` reads the split in batches (memory
holds one), stopping at `limit`; without it `datasets` prepares the split in its cache ($HF_DATASETS_CACHE).

Published traces (pipeline.text.traces): `explode: {completion: generations, published_correct:
correctness.math_verify_reparsed_answer, ...}` turns each problem's equal-length list columns into one row per
trace in the `samples` contract (`id`, `sample_idx`, `prompt`, `completion`, the targets named, and the problem's
columns repeated), refusing lists of unequal length with the row id; `conversation: conversations` turns a column
of chat turns into `prompt` / `completion` (think span kept verbatim; `problem` from the user turn when absent).
The problems checks (`require`, unique ids) apply to the source rows, so each (id, sample_idx) is unique; `limit`
counts source rows. verify reads the result directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from pipeline.core import hub
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig
from pipeline.text import hub_datasets, traces
from pipeline.text.json_lines import number_texts
from pipeline.text.problems import check_problems
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE
from pipeline.text.tables import read_table

REQUIRED_COLUMNS = ("id", "problem", "answer")
HUB_ONLY = ("config", "revision", "data_files", "streaming")


class Config(StepConfig):
    path: str | None = Field(
        default=None, description="JSONL/JSON/parquet file, or a directory written by datasets.save_to_disk. "
                                  "Give `path` or `hub`, not both.")
    hub: str | None = Field(
        default=None, description="A Hugging Face Hub dataset, `org/name` or `org/name@REVISION`, read through "
                                  "datasets.load_dataset (offline: from the hub cache); or a local directory laid "
                                  "out as a Hub dataset repo (README.md with YAML `configs:`, data files).")
    config: str | None = Field(default=None, description="hub: the dataset's config (subset); null = its default.")
    split: str = Field(default="train", description="hub: the split to read.")
    revision: str | None = Field(
        default=None, description="hub: the commit (or tag/branch) to read, as `@REVISION` in `hub` does; null = "
                                  "unpinned (the default branch; `distill run` warns: the data can change under "
                                  "the same key).")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None, description="hub: data file patterns to read instead of the config's, e.g. data/train-0000*"
                                  ".parquet (a pattern, a list, or split -> patterns).")
    streaming: bool = Field(
        default=False, description="hub: read the split in batches (a set larger than memory), stopping at "
                                   "`limit`, instead of preparing it whole in the datasets cache.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns on load, source -> contract name, e.g. {question: problem}.")
    drop_columns: list[str] = Field(
        default_factory=list, description="Columns to leave out (before renaming), e.g. a list of messages that "
                                          "repeats the traces.")
    ids: Literal["row"] | None = Field(
        default=None, description="For data without an `id` column: `row` gives each row its position in the "
                                  "source as its id (\"0\", \"1\", ...; unpadded, stable under `limit`).")
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N rows (of the source: "
                                                              "problems, before explode).")
    require: list[str] = Field(
        default=list(REQUIRED_COLUMNS),
        description="Columns that must be present and non-empty in every row (of the source; with "
                    "`conversation`, after `problem` is taken from the user turn).")
    unique_ids: bool = Field(
        default=True,
        description="Refuse repeated ids. Turn off to load several completions per problem for re-grading.")
    explode: dict[str, str] = Field(
        default_factory=dict,
        description="Published traces: target -> source list column (or `struct.field`), one row per list item in "
                    "the samples contract, e.g. {completion: generations, published_correct: "
                    "correctness.math_verify_reparsed_answer, finish_reason: finish_reasons}. Needs `completion`; "
                    "lists of one row must have equal lengths; the sources are left out, the other columns repeated.")
    conversation: str | None = Field(
        default=None, description="Published traces: a column of chat turns [{from|role, value|content}] to turn "
                                  "into `prompt` (the turns before the last assistant one) and `completion` (that "
                                  "turn, think span kept).")
    prompt_template: str = Field(
        default=DEFAULT_PROMPT_TEMPLATE, description="explode: the user turn of each trace's `prompt`, rendered "
                                                     "from the problem's {columns} (the sample step's default).")

    dry_run_overrides: ClassVar[dict] = {"limit": 4}
    path_fields: ClassVar = ("path",)
    libraries: ClassVar = ("datasets",)
    # 2: pipeline.text.tables reads JSON(L) itself: mixed str/number columns become exact strings, ISO dates stay strings.
    # 3: a column of numbers with an integer beyond 64 bits is exact strings too (pyarrow made it floats).
    # 4: problem and answer must be strings or numbers (objects, lists, booleans, NaN refused); a JSON column mixing
    #    booleans with strings keeps them as booleans (was the strings "true"/"false").
    code_version: ClassVar[str] = "4"
    # Added with the Hub and published traces: at their defaults a recipe's key is what it was.
    keyed_when_set: ClassVar = ("hub", "config", "split", "revision", "data_files", "streaming", "drop_columns",
                                "ids", "explode", "conversation", "prompt_template")
    uses_seed: ClassVar = False  # the first `limit` rows, in file order

    # the rows check_inputs read, so that run does not read the file a second time
    _checked_rows: Any = PrivateAttr(default=None)
    _hub_source: Any = PrivateAttr(default=None)

    def input_paths(self) -> list[str]:
        """The data file, or the local directory `hub` names (its files are hashed; a hub id is keyed by revision)."""
        if self.hub is not None:
            return [self.hub] if hub_datasets.is_local(self.hub) else []
        return [self.path] if self.path is not None else []

    def run_warnings(self) -> list[str]:
        if self.hub is not None and self.revision is None and not hub_datasets.is_local(self.hub):
            return [hub.unpinned_warning("dataset", self.hub, f"{self.hub}@<commit> (or `revision: <commit>`)")]
        return []

    def check_inputs(self) -> None:
        if self.hub is None:
            self._checked_rows = problems(self)  # a file that cannot load fails the run before anything is written
            return
        # A hub dataset: resolved now (offline and not cached: refused before anything runs) and its columns checked
        # from a streaming view; its rows are read by run (a prepared or streamed split can be large).
        source = self._hub_source = hub_datasets.resolve(self.hub, self.revision, self.config, self.split,
                                                         self.data_files)
        features = hub_datasets.features(source, self.config, self.split, self.data_files)
        _check_column_names(self, list(features), source.name())
        renamed = {self.columns.get(name, name): feature for name, feature in features.items()
                   if name not in self.drop_columns}  # as named after drop_columns and columns
        if self.explode and None not in renamed.values():
            traces.check_spec(renamed, self.explode, source.name())
        if self.conversation and self.conversation not in renamed:
            raise UserError(f"{source.name()}: conversation column {self.conversation!r} is not in the data "
                            f"(columns: {', '.join(renamed)})")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is None:
            return path
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

    @field_validator("explode")
    @classmethod
    def _explode_targets(cls, spec: dict[str, str]) -> dict[str, str]:
        if spec and "completion" not in spec:
            raise ValueError("explode needs a `completion` target: the list of traces, e.g. {completion: generations}")
        for target, source in spec.items():
            if target in traces.RESERVED_TARGETS:
                raise ValueError(f"explode target {target!r} is written by load itself (id, sample_idx, prompt)")
            if not target.strip() or not source.strip():
                raise ValueError(f"explode: {target!r}: {source!r}: a target and its source are column names")
        return spec

    @model_validator(mode="after")
    def _one_source(self) -> Config:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give `path` (a local data file) or `hub` (a Hub dataset or a local dataset repo dir), "
                             "one of them")
        if self.path is not None:
            given = [name for name in HUB_ONLY if getattr(self, name) != type(self).model_fields[name].default]
            given += ["split"] if self.split != "train" else []
            if given:
                raise ValueError(f"{', '.join(given)}: settings of `hub`; `path` reads one file as it is")
        elif hub_datasets.is_local(self.hub):
            if self.revision is not None:
                raise ValueError(f"revision: hub {self.hub!r} is a local directory, which has no revision")
        else:
            if not hub.HUB_ID.fullmatch(self.hub):
                raise ValueError(f"hub {self.hub!r} is neither a local directory nor a hub id (org/name, or "
                                 "org/name@REVISION)")
            repo, revision = hub.split_ref(self.hub)
            if revision is not None:
                if self.revision is not None and self.revision != revision:
                    raise ValueError(f"hub {self.hub!r} pins revision {revision!r} and `revision` says "
                                     f"{self.revision!r}; give it once")
                self.hub, self.revision = repo, revision  # one spelling, so both give the same key
        if self.explode and self.conversation:
            raise ValueError("explode and conversation: give one (list columns of traces, or a chat per row)")
        return self


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: the rows are the problems (or, from published traces, the traces)."""
    if "traces" in stats:
        return FunnelStage("published traces", stats.get("problems"),
                           [Count("problems", "problems read", stats.get("problems", 0))])
    return FunnelStage("problems", stats["rows"])


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    if cfg.hub is None:
        rows = cfg._checked_rows if cfg._checked_rows is not None else problems(cfg)
        source, stats = cfg.path, {}
    else:
        hub_source = cfg._hub_source or hub_datasets.resolve(cfg.hub, cfg.revision, cfg.config, cfg.split,
                                                             cfg.data_files)
        source = hub_source.name()
        raw = hub_datasets.rows(hub_source, cfg.config, cfg.split, cfg.data_files, streaming=cfg.streaming,
                                limit=cfg.limit, scratch=out.scratch)
        _check_column_names(cfg, raw.column_names, source)
        rows = problems(cfg, raw, source)
        stats = {"hub": cfg.hub, "revision": cfg.revision, "commit": hub_source.commit, "config": cfg.config,
                 "split": cfg.split}
    if cfg.explode or cfg.conversation:
        problem_count = len(rows)
        rows = published_traces(cfg, rows, source)
        stats.update(problems=problem_count, traces=len(rows))
    return out.write_dataset(rows, source=source, **stats)


def published_traces(cfg: Config, rows, source: str):
    """The checked problem rows as one row per trace (`explode`), or with `sample_idx` (`conversation`)."""
    if cfg.explode:
        rows = traces.explode_lists(rows, cfg.explode, cfg.prompt_template, source, _scratch_file("traces.arrow"))
        if cfg.unique_ids:
            return rows  # each problem once: its list positions are its traces' sample_idx
    # prompt and completion were read by `problems`; a problem in several rows numbers its traces on across them
    return traces.number_traces(rows, _scratch_file("numbered.arrow"))


def _check_column_names(cfg: Config, names: list[str], source: str) -> None:
    """Refuse settings naming columns the source does not have, before any row is read."""
    missing = [c for c in [*cfg.drop_columns, *cfg.columns] if c not in names]
    if missing:
        raise UserError(f"{source}: columns {missing} named in `drop_columns`/`columns` are not in the data "
                        f"({', '.join(names)})")


def problems(cfg: Config, ds=None, source: str | None = None):
    """The source's rows as the step writes them (before explode): columns dropped and renamed, cut to `limit`,
    given ids (`ids: row`), a conversation read into prompt/completion, ids and answers as strings, checked."""
    import datasets

    if ds is None:
        source = cfg.path
        ds = read_table(cfg.path)
        if cfg.drop_columns or cfg.columns:
            _check_column_names(cfg, ds.column_names, source)
    if cfg.drop_columns:
        ds = ds.remove_columns(cfg.drop_columns)
    unknown = [c for c in cfg.columns if c not in ds.column_names]
    if unknown:
        raise UserError(f"{source}: columns {unknown} named in `columns` are not in the file ({ds.column_names})")
    if cfg.columns:
        _check_renames(cfg, ds.column_names, source)
        ds = ds.rename_columns(cfg.columns)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{source}: no rows")
    if cfg.ids == "row":
        if "id" in ds.column_names:
            raise UserError(f"{source}: `ids: row` gives each row an id, but the data has an `id` column; drop "
                            "`ids` or rename that column away (`columns: {id: source_id}`)")
        ds = ds.add_column("id", [str(index) for index in range(len(ds))], feature=datasets.Value("string"))
        ds = ds.select_columns(["id", *[c for c in ds.column_names if c != "id"]])
    elif (cfg.explode or cfg.conversation) and "id" not in ds.column_names:
        raise UserError(f"{source}: published traces need an id per problem: an `id` column (rename one with "
                        "`columns: {NAME: id}`) or `ids: row` (the row's position)")
    if cfg.conversation:
        ds = traces.from_conversations(ds, cfg.conversation, source, _scratch_file("conversations.arrow"))
    # Checked as the file holds them, before the conversion below could turn an object or NaN into text.
    check_problems(ds, source, cfg.require, cfg.unique_ids)
    # Ids and answers are strings in every contract, whatever the file stored (ints, floats).
    for column in ("id", "answer"):
        if column not in ds.column_names:
            continue
        feature = ds.features[column]
        if cfg.path is not None and isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
            # Arrow reads 1 beside 2.5 as the float 1.0; the answer the file wrote is "1": the numbers as written.
            original = next((old for old, new in cfg.columns.items() if new == column), column)
            texts = number_texts(cfg.path, original)
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


def _check_renames(cfg: Config, file_columns: list[str], where: str) -> None:
    """Refuse `columns` that would leave two columns with one name: a source renamed onto a column the file has and
    `columns` does not rename away, or (a recipe not validated by Config) two sources renamed to one name."""
    taken: dict[str, str] = {column: column for column in file_columns if column not in cfg.columns}
    for source, target in cfg.columns.items():
        if target in taken:
            other = taken[target]
            if other == target:
                raise UserError(f"{where}: `columns: {{{source}: {target}}}` renames {source!r} onto the file's "
                                f"own column {target!r}; rename that one away too (e.g. `{target}: {target}_orig`) "
                                f"or drop one of them")
            raise UserError(f"{where}: `columns` renames both {other!r} and {source!r} to {target!r}; a column "
                            "can come from one source only")
        taken[target] = source



def _scratch_file(name: str) -> Path:
    """A new Arrow file in this process's temporary dir (removed at exit), as the table readers use: `problems` runs
    before the step has a scratch dir (check_inputs), and the file is memory-mapped until the step has written."""
    import os
    import tempfile

    from pipeline.core.artifacts import temp_dir

    handle, path = tempfile.mkstemp(suffix=f"-{name}", dir=temp_dir())
    os.close(handle)
    return Path(path)

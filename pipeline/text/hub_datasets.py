"""Reading a dataset laid out as a Hugging Face Hub dataset repository (a README.md whose YAML `configs:` name the
data files of each config and split, and the data files: parquet, JSON lines, CSV, ...), from the Hub or from a
local directory, through `datasets.load_dataset`: for the `load` step's `hub:`.

A hub id is resolved by the one rule of `pipeline.core.hub` (the same as models'): a snapshot of that revision in
the hub cache, downloaded when online (only the README and the chosen config's files for the chosen split, when the
README names them), the cached one offline, else a UserError naming the dataset and the revision. A local directory
is read as it is. Either way the rows come from `datasets.load_dataset` on that directory: map-style (prepared into
the datasets cache, $HF_DATASETS_CACHE, as `datasets` always does) or, with `streaming`, an IterableDataset read in
batches of BATCH_ROWS into an Arrow file in the step's scratch dir (`rows`), stopping at `limit`, so a split larger
than memory is never held in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core import hub
from pipeline.core.errors import UserError
from pipeline.text.columns import BATCH_ROWS

README = "README.md"


@dataclass(frozen=True)
class HubSource:
    """Where a `hub:` dataset is read from, once resolved."""

    ref: str  # as the recipe wrote it (the hub id without its revision, or the local dir)
    directory: str  # the local dir: the snapshot in the hub cache, or the dir itself
    revision: str | None  # the revision asked for (None: unpinned, or a local dir)
    commit: str | None  # the commit the snapshot is (None for a local dir)

    def name(self) -> str:
        """How messages and the manifest name the source."""
        if self.commit is None:
            return self.ref
        return f"{self.ref}@{self.revision}" if self.revision == self.commit else \
            f"{self.ref}@{self.revision or hub.DEFAULT_BRANCH} (commit {self.commit})"


def is_local(ref: str) -> bool:
    """Whether `hub:` names a local directory (it is then read as a dataset repository, not asked of the Hub)."""
    try:
        return Path(ref).expanduser().is_dir()
    except (OSError, RuntimeError, ValueError):
        return False


def resolve(ref: str, revision: str | None, config: str | None, split: str,
            data_files=None) -> HubSource:
    """The local directory to read `ref` from: the dir itself, or the hub cache's snapshot of `revision`."""
    if is_local(ref):
        return HubSource(ref, str(Path(ref).expanduser()), None, None)
    if hub.offline():
        directory = hub.snapshot(ref, revision, repo_type="dataset")
    else:  # only the card first, then only the files the chosen config and split read
        card_dir = hub.snapshot(ref, revision, repo_type="dataset", allow_patterns=[README])
        patterns = _patterns(data_files) if data_files is not None else \
            config_patterns(Path(card_dir) / README, config, split)
        directory = hub.snapshot(ref, revision, repo_type="dataset",
                                 allow_patterns=None if patterns is None else [README, *patterns])
    return HubSource(ref, directory, revision, Path(directory).name)


def config_patterns(readme: Path, config: str | None, split: str) -> list[str] | None:
    """The data file patterns the card's YAML `configs:` give `config` (None: the default one) for `split`; None
    when the card does not say (then every file of the repository is fetched)."""
    if not readme.is_file():
        return None
    from huggingface_hub import DatasetCard

    try:
        configs = DatasetCard.load(readme).data.to_dict().get("configs") or []
    except Exception:  # noqa: BLE001 - a card we cannot read: fetch everything, datasets will say what is wrong
        return None
    chosen = [c for c in configs if isinstance(c, dict) and (
        c.get("config_name") == config if config else c.get("default") or c.get("config_name") == "default")]
    if not chosen and not config and len(configs) == 1:
        chosen = configs
    if not chosen or "data_files" not in chosen[0]:
        return None
    files = chosen[0]["data_files"]
    if isinstance(files, list) and files and all(isinstance(f, dict) for f in files):
        files = [f.get("path") for f in files if f.get("split") == split]
    return _patterns(files) or None


def _patterns(files) -> list[str]:
    """`data_files` (a pattern, a list of them, or a split -> pattern(s) mapping) as a flat list of patterns."""
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [p for value in files.values() for p in _patterns(value)]
    return [p for value in files or [] for p in _patterns(value)]


def open_split(source: HubSource, config: str | None, split: str, data_files=None, *, streaming: bool):
    """The split as `datasets` reads it: a Dataset, or an IterableDataset with `streaming`. A config, split or
    data file that is not there is a UserError naming the dataset and what it has."""
    import datasets

    try:
        return datasets.load_dataset(source.directory, name=config, split=split, data_files=data_files,
                                     streaming=streaming)
    except Exception as error:  # noqa: BLE001 - an unknown config or split, an unreadable file: say which
        what = f"config {config!r}, " if config else ""
        raise UserError(f"hub dataset {source.name()}: cannot read {what}split {split!r}: "
                        f"{type(error).__name__}: {error}") from None


def features(source: HubSource, config: str | None, split: str, data_files=None) -> dict:
    """The split's columns and their `datasets` features, read without preparing it (a streaming view: the files'
    schema, or the first row's columns with unknown (None) features)."""
    stream = open_split(source, config, split, data_files, streaming=True)
    if stream.features is not None:
        return dict(stream.features)
    try:
        return dict.fromkeys(next(iter(stream)))
    except StopIteration:
        return {}


def rows(source: HubSource, config: str | None, split: str, data_files=None, *, streaming: bool,
         limit: int | None, scratch: Path):
    """The split's first `limit` rows (all without one) as a Dataset. With `streaming`, read BATCH_ROWS at a time
    into an Arrow file in `scratch` and memory-mapped back: memory holds one batch, and reading stops at `limit`."""
    if not streaming:
        ds = open_split(source, config, split, data_files, streaming=False)
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    from datasets import Dataset, Features
    from datasets.arrow_writer import ArrowWriter

    stream = open_split(source, config, split, data_files, streaming=True)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "source.arrow"
    taken = 0
    writer = None
    try:
        for batch in stream.with_format("arrow").iter(batch_size=BATCH_ROWS):
            if limit is not None and taken + batch.num_rows > limit:
                batch = batch.slice(0, limit - taken)
            if writer is None:
                features = stream.features or Features.from_arrow_schema(batch.schema)
                writer = ArrowWriter(features=features, path=str(path))
            writer.write_table(batch)  # cast to the first batch's features
            taken += batch.num_rows
            if limit is not None and taken >= limit:
                break
        if writer is None:
            raise UserError(f"hub dataset {source.name()}: split {split!r} has no rows")
        writer.finalize()
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    return Dataset.from_file(str(path))

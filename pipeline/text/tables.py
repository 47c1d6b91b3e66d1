"""Read a table of problems (JSONL, JSON, parquet, Arrow file or a saved dataset dir) as a `datasets.Dataset`:
`read_table`, which picks the reader by what is on disk.

Used by the `load` step and by the benchmark registry (eval/benchmarks.py), which then check the problems contract
(`pipeline.text.problems`). Bad input raises `UserError` with a message that names the file and, where there is one,
the line and row id — never a `datasets` traceback:

- JSON and JSONL: `pipeline.text.json_tables` (parsed block by block into a memory-mapped Arrow file; what becomes of
  a column of mixed types), after `pipeline.text.json_lines` has checked the text line by line.
- parquet and .arrow files: `pipeline.text.arrow_tables`; dataset dirs (datasets.save_to_disk) by `datasets`,
  memory-mapped; a file or dir that cannot be read is reported with the reason.
- A path that is empty, or names a FIFO, a socket or a device, is refused before anything opens it (a FIFO would
  block the reader forever).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.fingerprints import special_file_kind
from pipeline.text.arrow_tables import error_reason, read_arrow_file
from pipeline.text.json_tables import read_json

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_SUFFIX_HELP = "use .jsonl, .json, .parquet, .arrow or a dir written by datasets.save_to_disk"


def read_table(path: str | os.PathLike):
    """A datasets.Dataset from a file or a saved dataset dir, chosen by what is on disk."""
    name = str(path)
    if not name.strip():  # Path("") is the working directory
        raise UserError("empty path: name a data file or a dir written by datasets.save_to_disk")
    p = Path(path)
    try:
        mode = p.stat().st_mode  # follows links: what is read is what it points at
    except FileNotFoundError:
        raise UserError(f"{name}: file not found (relative paths are read from {Path.cwd()})") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None
    # Before anything opens it: reading a FIFO blocks until a writer comes, a device may never end.
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{name}: is a {special_file_kind(mode)}, not a regular file or directory")
    if stat.S_ISDIR(mode):
        return _read_dataset_dir(p, name)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{name}: unsupported file type {suffix!r} ({_SUFFIX_HELP})")
    if not p.is_file():
        raise UserError(f"{name}: not a regular file")
    try:
        if suffix in (".jsonl", ".json"):
            return read_json(p, name)
        return read_arrow_file(p, name, suffix)
    except UserError:
        raise
    except OSError as e:  # unreadable: permissions, I/O errors
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None


def _read_dataset_dir(p: Path, name: str):
    import datasets

    saved = (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
    if not saved and p.suffix.lower() in SUFFIXES:
        raise UserError(f"{name}: is a directory, not a {p.suffix} file")
    if not saved:
        hint = ""
        if (p / "data" / "state.json").is_file():
            hint = f"; a step's dataset is in {p / 'data'}"
        raise UserError(f"{name}: is a directory but not a dataset saved by datasets.save_to_disk "
                        f"(no state.json){hint}; {_SUFFIX_HELP}")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - reported, not a traceback
        raise UserError(f"{name}: cannot read this saved dataset: {error_reason(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise UserError(f"{name}: a DatasetDict with splits {splits}; point at one split's dir, "
                            f"e.g. {p / splits[0]}" if splits else f"{name}: a DatasetDict with no splits")
        ds = ds[splits[0]]
    return ds

"""`distill export STEP_DIR --format jsonl|parquet|sharegpt`: a finished dataset step, in a file other tools read.

    jsonl      one JSON object per row, every column (verl, TRL `load_dataset("json", ...)`, anything)
    parquet    the same table as parquet
    sharegpt   LLaMA-Factory's ShareGPT layout, a JSON list: SFT data (`messages`) as
               {"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}]}; preference pairs
               (`prompt`, `chosen`, `rejected`) as {"id", "conversations", "chosen": {...}, "rejected": {...}}

By default the file goes into `<step dir>/export/` (a directory `distill export` makes and marks, so a later export
replaces its own file); `--out FILE` must be a new file, or --overwrite. Never, whatever the flags, a step's input
(`pipeline.core.outputs`): the load step's data file, the step's own data.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.outputs import EXPORT, claim_dir, claim_file, make_dir, never_written, write_file

EXPORT_DIR = "export"  # in the step dir: the export's default place
FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet", "sharegpt": ".sharegpt.json"}
_SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def export(step_dir: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
           ) -> tuple[Path, int]:
    """Write the dataset of a complete step dir in `fmt`; returns (path written, rows).

    Default path: `<step dir>/export/<step name><extension>`.
    """
    from pipeline.core.artifacts import Artifact, complete_key

    step_dir = Path(step_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if complete_key(step_dir) is None:
        raise UserError(f"{step_dir}: not a complete step dir (no manifest.json saying complete)")
    artifact = Artifact.from_dir(step_dir)
    if artifact.kind != "dataset":
        raise UserError(f"{step_dir}: step {artifact.name!r} produced a {artifact.kind}; only datasets export")
    dataset = artifact.dataset()
    never = never_written(step_dir, Path(out or step_dir))
    if out:
        path = claim_file(Path(out), overwrite=overwrite, never=never)
    else:
        (path,) = claim_dir(step_dir / EXPORT_DIR, [f"{artifact.name}{FORMATS[fmt]}"], EXPORT, overwrite=overwrite,
                            never=never)
    # made before anything is written: a row ShareGPT cannot hold refuses the export
    records = [sharegpt_record(row, str(step_dir)) for row in dataset] if fmt == "sharegpt" else None
    if not out:
        make_dir(path.parent, EXPORT, "export dir")
    write_file(path, lambda tmp: _write(dataset, fmt, records, tmp))
    return path, len(dataset)


def _write(dataset, fmt: str, records: list[dict] | None, path: Path) -> None:
    if fmt == "jsonl":
        dataset.to_json(str(path), lines=True, force_ascii=False)
    elif fmt == "parquet":
        dataset.to_parquet(str(path))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1))


def sharegpt_record(row: dict, source: str) -> dict:
    """One row of SFT data (`messages`) or of preference pairs (`prompt`, `chosen`, `rejected`) in ShareGPT form."""
    if "messages" in row:
        return {"id": row.get("id"), "conversations": _turns(row["messages"], source)}
    if {"prompt", "chosen", "rejected"} <= set(row):
        chosen, rejected = _turns(row["chosen"], source), _turns(row["rejected"], source)
        if len(chosen) != 1 or len(rejected) != 1:
            raise UserError(f"{source}: row id {row.get('id')!r}: chosen and rejected must be one assistant message "
                            "each for ShareGPT")
        return {"id": row.get("id"), "conversations": _turns(row["prompt"], source),
                "chosen": chosen[0], "rejected": rejected[0]}
    raise UserError(f"{source}: sharegpt needs a `messages` column (SFT data) or `prompt`, `chosen`, `rejected` "
                    f"(pairs); this dataset has {sorted(row)}. Use --format jsonl or parquet")


def _turns(messages: list[dict], source: str) -> list[dict]:
    turns = []
    for message in messages:
        if message["role"] not in _SHAREGPT_ROLES:
            raise UserError(f"{source}: role {message['role']!r} has no ShareGPT equivalent")
        turns.append({"from": _SHAREGPT_ROLES[message["role"]], "value": message["content"]})
    return turns

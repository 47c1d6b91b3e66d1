"""The run page's sample browser data: every browsable dataset (a sample or verify step's rows, an evaluation's
samples of one benchmark) as chunk files of rows and one index file (problem, model, label of every row) that the
page's filters run on, each a script that hands its JSON to the page (a page opened from file:// may not fetch())."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.commands.run_report.step_views import StepView
from pipeline.core.errors import UserError

DATA_DIR = "data"  # in run-report/, where the page's <script> tags find the files

def write_browser_data(workdir: Path, steps: list[StepView], data_dir: Path, rows_per_chunk: int) -> list[dict]:
    """Chunk files of every browsable dataset (a step's rows with completions, an evaluation's samples of one
    benchmark) and a small index per dataset (problem, model, label of every row) that filters run on; returns what
    the page needs to know of each: its name, title, row count and where its files are."""
    import datasets

    sources = []
    for step in steps:
        if not step.complete:
            continue
        if step.produces == "dataset" and "completion" in _columns(step.path / "data"):
            rows = _step_rows(datasets.load_from_disk(str(step.path / "data")), rows_per_chunk)
            sources.append(_write_source(len(sources), step.name, f"{step.name} ({step.uses})", rows, data_dir))
        elif step.uses == "evaluate" and (step.path / "samples").is_dir():
            samples = datasets.load_from_disk(str(step.path / "samples"))
            meta = json.loads((step.path / "results.json").read_text())["meta"]
            benchmark_of_row = samples["benchmark"]
            for benchmark in meta["n"]:
                of_benchmark = samples.select([row for row, name in enumerate(benchmark_of_row) if name == benchmark])
                rows = _evaluation_rows(of_benchmark, meta, benchmark, rows_per_chunk)
                sources.append(_write_source(len(sources), f"{step.name}/{benchmark}",
                                             f"{step.name}: {benchmark} (evaluate)", rows, data_dir))
    return sources


def _columns(data_dir: Path) -> list[str]:
    """A saved dataset's column names, read from its metadata without loading it."""
    try:
        return list(json.loads((data_dir / "dataset_info.json").read_text())["features"])
    except (OSError, ValueError, KeyError):
        return []


def _step_rows(dataset, rows_per_chunk: int):
    """A sample or verify dataset's rows as the browser shows them, a chunk at a time."""
    for batch in dataset.iter(batch_size=rows_per_chunk):
        count = len(batch["completion"])

        def column(name, default=None):
            return batch.get(name) or [default] * count

        prompts = column("prompt") if "prompt" in batch else [[{"role": "user", "content": p}]
                                                              for p in column("problem", "")]
        yield [{"id": str(problem_id), "model": model or "", "sample": sample, "label": label,
                "prompt": prompt, "completion": (prefix or "") + (completion or ""), "extracted": extracted,
                "answer": answer, "finish": finish}
               for problem_id, model, sample, label, prompt, prefix, completion, extracted, answer, finish in zip(
                   column("id"), column("model"), column("sample_idx"), column("label"), prompts,
                   column("think_prefix", ""), batch["completion"], column("extracted"), column("answer"),
                   column("finish_reason"))]


def _evaluation_rows(samples, meta: dict, benchmark: str, rows_per_chunk: int):
    """An evaluation's samples of one benchmark, with the prompt each was sampled from: its samples keep no prompt,
    so it is rendered again from the benchmark file, if that file is still the one evaluated."""
    prompts = _benchmark_prompts(meta, benchmark)
    for batch in samples.iter(batch_size=rows_per_chunk):
        yield [{"id": str(problem_id), "model": model, "sample": sample, "label": label,
                "prompt": prompts.get(problem_id, [{"role": "note", "content": "(the benchmark file changed or is "
                                                                               "gone: prompt not shown)"}]),
                "completion": meta["models"][model]["completion_prefix"] + completion, "extracted": extracted,
                "answer": answer, "finish": finish}
               for problem_id, model, sample, label, completion, extracted, answer, finish in zip(
                   batch["id"], batch["model"], batch["sample_idx"], batch["label"], batch["completion"],
                   batch["extracted"], batch["answer"], batch["finish_reason"])]


def _benchmark_prompts(meta: dict, benchmark: str) -> dict[str, list[dict]]:
    from eval.benchmarks import load_benchmark
    from eval.run import sha256_files
    from pipeline.text.prompts import render_prompt

    try:
        source, problems = load_benchmark(benchmark)
    except UserError:
        return {}
    if sha256_files([source.path]) != meta["benchmarks"][benchmark]["sha256"]:
        return {}
    return {row["id"]: [{"role": "user", "content": render_prompt(meta["prompt_template"], row)}]
            for row in problems}


def _write_source(number: int, name: str, title: str, chunks, data_dir: Path) -> dict:
    """Write one dataset's chunk files and index file; what the page knows of it. The files are named by its number
    and its name, made safe for a file name."""
    stem = f"{number:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
    problems, models, labels, index_rows = {}, {}, {}, []
    for chunk, rows in enumerate(chunks):
        (data_dir / f"{stem}-{chunk:04d}.js").write_text(
            f"distillReport.chunkLoaded({json.dumps(name)}, {chunk}, {compact_json(rows)});\n", encoding="utf-8")
        index_rows += [[problems.setdefault(row["id"], len(problems)), models.setdefault(row["model"], len(models)),
                        -1 if row["label"] is None else labels.setdefault(row["label"], len(labels))] for row in rows]
    index = {"problems": list(problems), "models": list(models), "labels": list(labels), "rows": index_rows}
    (data_dir / f"{stem}-index.js").write_text(
        f"distillReport.indexLoaded({json.dumps(name)}, {compact_json(index)});\n", encoding="utf-8")
    return {"name": name, "title": title, "rows": len(index_rows), "files": f"{DATA_DIR}/{stem}"}


def compact_json(value) -> str:
    """JSON as the page's scripts read it: compact, non-ASCII text as it is, anything else as its str()."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)

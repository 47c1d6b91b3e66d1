"""Benchmark registry: a name -> its problems file in eval/data/, how its golds parse, and its default n.

A benchmark spec is a registered name (`math500`), any JSONL/JSON/parquet file of problems (`id`, `problem`,
`answer`), or either with a `:N` suffix for its first N problems (`aime24:5`, `my/file.jsonl:10`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError

# Package data (setup.cfg [options.package_data]), found from this file so that it does not depend on the working
# directory and ships in the wheel. Provenance and checksums: data/SOURCES.md in the repo.
BENCHMARK_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    # How golds parse (eval.answers): True = LaTeX, False = plain numbers, None = decide per gold.
    gold_is_latex: bool | None
    # Samples per problem when an evaluate step does not set n (open-r1 / lighteval practice).
    default_n: int
    description: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("aime24", BENCHMARK_DIR / "aime24.jsonl", False, 64, "AIME 2024 I+II, 30 integer answers"),
        Benchmark("aime25", BENCHMARK_DIR / "aime25.jsonl", False, 64, "AIME 2025 I+II, 30 integer answers"),
        Benchmark("amc23", BENCHMARK_DIR / "amc23.jsonl", False, 16, "AMC 12 2023 (Qwen2.5-Math 40-problem set)"),
        Benchmark("math500", BENCHMARK_DIR / "math500.jsonl", True, 4, "MATH-500, LaTeX answers"),
        Benchmark("gsm8k", BENCHMARK_DIR / "gsm8k_test.jsonl", False, 1, "GSM8K test, 1319 integer answers"),
        Benchmark("arith_test", BENCHMARK_DIR / "arith_test.jsonl", False, 4,
                  "200 two-number arithmetic problems (data/make_arithmetic.py)"),
    ]
}


def split_spec(spec: str) -> tuple[str, int | None]:
    """`name:N` -> (name, N); a spec without a numeric suffix -> (spec, None)."""
    base, sep, suffix = spec.rpartition(":")
    if sep and suffix.isdigit() and base:
        if int(suffix) < 1:
            raise UserError(f"benchmark {spec!r}: the :N suffix must be at least 1")
        return base, int(suffix)
    return spec, None


def get_benchmark(spec: str) -> Benchmark:
    """The Benchmark a spec names (a `:N` suffix is ignored here); a file path gives an ad-hoc benchmark."""
    name, _ = split_spec(spec)
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    path = Path(name).expanduser()
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise UserError(f"benchmark file not found: {name} (relative paths are read from {Path.cwd()})")
        return Benchmark(path.stem, path, None, 1, f"problems from {path}")
    known = ", ".join(BENCHMARKS)
    raise UserError(f"unknown benchmark {name!r}; known benchmarks: {known} (or a .jsonl/.json/.parquet file)")


def load_benchmark(spec: str, limit: int | None = None) -> tuple[Benchmark, list[dict]]:
    """The benchmark and its problems as dicts with `id`, `problem`, `answer` (str) and the file's other columns.

    `limit` and a `:N` suffix both cut to the first problems; with both, the smaller wins.
    """
    from pipeline.text.problems import check_problems
    from pipeline.text.tables import read_table

    benchmark = get_benchmark(spec)
    _, suffix_limit = split_spec(spec)
    limits = [n for n in (limit, suffix_limit) if n is not None]
    if not benchmark.path.is_file():
        raise UserError(f"benchmark {benchmark.name!r}: data file {benchmark.path} is missing")
    table = read_table(str(benchmark.path))
    if limits:
        table = table.select(range(min(min(limits), len(table))))
    check_problems(table, str(benchmark.path), ["id", "problem", "answer"])
    rows = table.to_list()
    for row in rows:
        row["id"], row["answer"] = str(row["id"]), str(row["answer"])
    return benchmark, rows

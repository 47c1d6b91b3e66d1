"""`filter`: drop rows and problems from a problems/samples/graded dataset, saying what went and why.

Filters, applied in this order (a problem removed by one is not looked at by the next):

    drop_truncated     sample rows that stopped at the token limit (finish_reason "length" or label truncated)
    min/max_pass_rate  problems whose pass_rate (from verify: correct / graded samples) is outside the window,
                       and, as `ungraded`, problems with no pass rate (not one sample graded: bad gold, timeouts,
                       errors), whose difficulty is unknown
    dedupe_exact       problems whose text, lower-cased with whitespace collapsed, repeats an earlier problem's
    near_duplicate     problems whose n-gram Jaccard similarity with an earlier kept problem reaches the threshold
    decontaminate      problems sharing an n-gram (default 8 tokens) with a bundled benchmark problem; a problem
                       shorter than n tokens counts as contaminated only if it equals a benchmark problem

Everything removed is listed in `removed.jsonl` in the step dir (`id`, `reason`, `detail`; one line per
problem, or per sample row for drop_truncated) and counted per reason in the manifest.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import ClassVar

from pydantic import Field, model_validator

from pipeline.steps import StepConfig, require_columns

REMOVED_FILE = "removed.jsonl"
# words and single punctuation/operator characters: "12 + 7" and "12 * 7" must not look alike
_TOKEN = re.compile(r"\w+|[^\w\s]")


class Config(StepConfig):
    input: str = Field(description="Name of the step whose dataset (needs `id` and `problem`) is filtered.")
    drop_truncated: bool = Field(default=False, description="Drop sample rows cut off at the token limit.")
    min_pass_rate: float | None = Field(default=None, ge=0, le=1,
                                        description="Drop problems with a lower pass_rate (needs verify output); "
                                                    "with either bound, problems with no pass rate go too.")
    max_pass_rate: float | None = Field(default=None, ge=0, le=1,
                                        description="Drop problems with a higher pass_rate, e.g. 0.99 drops "
                                                    "problems every sample solved.")
    dedupe_exact: bool = Field(default=True, description="Drop problems whose normalised text repeats an earlier "
                                                         "problem's (case and whitespace ignored).")
    near_duplicate: float | None = Field(
        default=None, gt=0, le=1,
        description="Drop problems whose n-gram Jaccard similarity with an earlier kept problem is at least this "
                    "(e.g. 0.8); null: off.")
    near_duplicate_ngram: int = Field(default=5, ge=1, description="Token n-gram size for near_duplicate.")
    decontaminate: list[str] = Field(
        default=["aime24", "aime25", "amc23", "math500", "gsm8k", "arith_test"],
        description="Benchmarks (registered names or problem files) whose problems must not appear; [] turns it off.")
    decontaminate_ngram: int = Field(default=8, ge=1, description="Token n-gram size for decontamination.")

    path_fields: ClassVar = ()
    uses_seed: ClassVar = False

    def input_paths(self) -> list[str]:
        from eval.benchmarks import get_benchmark

        return [str(get_benchmark(spec).path) for spec in self.decontaminate]

    @model_validator(mode="after")
    def _window(self):
        low, high = self.min_pass_rate, self.max_pass_rate
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_pass_rate {self.min_pass_rate} is above max_pass_rate {self.max_pass_rate}")
        return self


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Token n-grams of text; a text shorter than n tokens is one gram (itself)."""
    words = tokens(text)
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def run(cfg: Config, inputs, out):
    data = inputs[cfg.input].dataset()
    needed = ["id", "problem"] + (["pass_rate"] if cfg.min_pass_rate is not None or cfg.max_pass_rate is not None
                                  else [])
    require_columns(data, needed, step="filter", source=cfg.input)
    columns = data.select_columns([c for c in ("id", "problem", "pass_rate", "finish_reason", "label")
                                   if c in data.column_names]).to_dict()
    ids = [str(i) for i in columns["id"]]
    removed: list[dict] = []
    dropped_rows: set[int] = set()

    if cfg.drop_truncated:
        for row in range(len(ids)):
            reasons = [columns[c][row] for c in ("finish_reason", "label") if c in columns]
            if "length" in reasons or "truncated" in reasons:
                dropped_rows.add(row)
                removed.append({"id": ids[row], "reason": "truncated", "detail": f"row {row}"})

    problems: dict[str, str] = {}  # id -> problem text, input order
    pass_rates: dict[str, float | None] = {}
    for row, problem_id in enumerate(ids):
        problems.setdefault(problem_id, columns["problem"][row] or "")
        if "pass_rate" in columns:
            pass_rates.setdefault(problem_id, columns["pass_rate"][row])
    dropped: dict[str, str] = {}  # problem id -> reason

    def drop(problem_id: str, reason: str, detail: str) -> None:
        dropped[problem_id] = reason
        removed.append({"id": problem_id, "reason": reason, "detail": detail})

    if cfg.min_pass_rate is not None or cfg.max_pass_rate is not None:
        low, high = cfg.min_pass_rate or 0.0, 1.0 if cfg.max_pass_rate is None else cfg.max_pass_rate
        for problem_id, rate in pass_rates.items():
            if rate is None:
                drop(problem_id, "ungraded", "no graded sample, so no pass_rate")
            elif not low <= rate <= high:
                drop(problem_id, "pass_rate", f"pass_rate {rate:.3f} outside [{low}, {high}]")

    if cfg.dedupe_exact:
        first_with_text: dict[str, str] = {}
        for problem_id, text in problems.items():
            if problem_id in dropped:
                continue
            normalised = " ".join(text.lower().split())
            if normalised in first_with_text:
                drop(problem_id, "duplicate", f"same text as {first_with_text[normalised]}")
            else:
                first_with_text[normalised] = problem_id

    if cfg.near_duplicate is not None:
        _drop_near_duplicates(cfg, problems, dropped, drop)

    if cfg.decontaminate:
        _decontaminate(cfg, problems, dropped, drop)

    kept_rows = [row for row, problem_id in enumerate(ids) if row not in dropped_rows and problem_id not in dropped]
    out.dir.mkdir(parents=True, exist_ok=True)
    with open(out.dir / REMOVED_FILE, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in removed)
    counts: dict[str, int] = defaultdict(int)
    for entry in removed:
        counts[entry["reason"]] += 1
    return out.write_dataset(
        data.select(kept_rows),
        rows_in=len(ids),
        problems_in=len(problems),
        problems_kept=len({ids[row] for row in kept_rows}),
        **{f"removed_{reason}": counts[reason] for reason in ("truncated", "ungraded", "pass_rate", "duplicate",
                                                               "near_duplicate", "contaminated")},
    )


def _drop_near_duplicates(cfg: Config, problems: dict[str, str], dropped: dict[str, str], drop) -> None:
    """Compare each problem with the kept ones sharing an n-gram (an inverted index, not all pairs)."""
    index: dict[tuple, list[str]] = defaultdict(list)
    grams_of: dict[str, set] = {}
    for problem_id, text in problems.items():
        if problem_id in dropped:
            continue
        grams = ngrams(text, cfg.near_duplicate_ngram)
        best, best_id = 0.0, None
        for other in {o for gram in grams for o in index[gram]}:
            similarity = len(grams & grams_of[other]) / len(grams | grams_of[other])
            if similarity > best:
                best, best_id = similarity, other
        if best_id is not None and best >= cfg.near_duplicate:
            drop(problem_id, "near_duplicate", f"Jaccard {best:.2f} with {best_id}")
            continue
        grams_of[problem_id] = grams
        for gram in grams:
            index[gram].append(problem_id)


def _decontaminate(cfg: Config, problems: dict[str, str], dropped: dict[str, str], drop) -> None:
    from eval.benchmarks import load_benchmark

    source_of_gram: dict[tuple, str] = {}  # benchmark n-gram -> "benchmark:id"
    for spec in cfg.decontaminate:
        benchmark, rows = load_benchmark(spec)
        for row in rows:
            for gram in ngrams(row["problem"], cfg.decontaminate_ngram):
                source_of_gram.setdefault(gram, f"{benchmark.name}:{row['id']}")
    for problem_id, text in problems.items():
        if problem_id in dropped:
            continue
        grams = ngrams(text, cfg.decontaminate_ngram)
        # a short problem is a single whole-text gram: only an identical benchmark problem matches it
        hit = next((gram for gram in grams if gram in source_of_gram), None)
        if hit is not None:
            drop(problem_id, "contaminated",
                 f"{cfg.decontaminate_ngram}-gram {' '.join(hit)!r} also in {source_of_gram[hit]}")

"""`filter`: drop rows and problems from a problems/samples/graded dataset, saying what went and why.

Filters, applied in this order (a problem removed by one is not looked at by the next):

    keep_where /       sample rows whose column holds (drop_where) or does not hold (keep_where) one of the listed
    drop_where         values: a published dataset's own marks, e.g. the REDI paper's `problem_is_valid: [Yes]` and
                       `source: [cn_k12]` dropped (recipes/regenerate-redi-data.yaml)
    drop_truncated     sample rows that stopped at the token limit (finish_reason "length" or label truncated)
    min/max_pass_rate  problems whose pass_rate (from verify: correct / graded samples) is outside the window,
                       and, as `ungraded`, problems with no pass rate (not one sample graded: bad gold, timeouts,
                       errors), whose difficulty is unknown
    dedupe_exact       problems whose text, lower-cased with whitespace collapsed, repeats an earlier problem's
    near_duplicate     problems whose n-gram Jaccard similarity with an earlier kept problem reaches the threshold,
                       among the candidates MinHash LSH finds (it can miss a pair, rarely: `_drop_near_duplicates`)
    decontaminate      problems sharing an n-gram (default 8 tokens) with a bundled benchmark problem; a problem
                       shorter than n tokens counts as contaminated only if it equals a benchmark problem

Everything removed is listed in `removed.jsonl` in the step dir (`id`, `reason`, `detail`; one line per
problem, or per sample row for the row rules: keep/drop_where, drop_truncated) and counted per reason in the
manifest.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import ClassVar

from pydantic import Field, model_validator

from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig, require_columns

REMOVED_FILE = "removed.jsonl"
# near_duplicate's MinHash LSH. Each candidate it returns is checked by exact Jaccard, so a false positive costs one
# comparison and a false negative a missed duplicate: the band layout is chosen weighting misses 0.98 to false
# positives 0.02 (datasketch's weights). 128 permutations give 17 bands of 7 rows at threshold 0.8: a pair at
# exactly 0.8 is a candidate with probability 0.98, at 0.85 0.9986, at 0.6 0.38, at 0.3 0.0003; 64 permutations
# (10 bands of 6) would catch only 0.95 at 0.8 for 40% less index memory (datasketch keeps ~330 bytes per band and
# problem: ~5.5 KiB per kept problem at 128). The seed fixes the permutations, so the step is deterministic.
MINHASH_PERMUTATIONS = 128
MINHASH_SEED = 1
LSH_WEIGHTS = (0.02, 0.98)  # (false positive, false negative)
ColumnValue = str | int | float | bool | None  # a value keep_where / drop_where compare a column's with
# words and single punctuation/operator characters: "12 + 7" and "12 * 7" must not look alike
_TOKEN = re.compile(r"\w+|[^\w\s]")


class Config(StepConfig):
    input: str = Field(description="Name of the step whose dataset (needs `id` and `problem`) is filtered.")
    keep_where: dict[str, list[ColumnValue]] = Field(
        default_factory=dict,
        description="Keep only rows whose column holds one of the listed values, e.g. {problem_is_valid: [Yes]}; "
                    "with several columns a row must match each.")
    drop_where: dict[str, list[ColumnValue]] = Field(
        default_factory=dict, description="Drop rows whose column holds one of the listed values, e.g. "
                                          "{source: [cn_k12]}.")
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
    libraries: ClassVar = ("datasketch",)  # its MinHash and LSH decide which near duplicates are found
    # 2: near_duplicate finds its candidates with MinHash LSH (it can miss a pair the exact rule would find), and
    # ties in similarity name the earliest kept problem
    # 3: a problem all of whose rows drop_truncated removed is gone: no longer the earlier copy of a duplicate, nor
    #    listed again by the pass-rate window
    code_version: ClassVar = "3"
    keyed_when_set: ClassVar = ("keep_where", "drop_where")

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


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: the rows kept, and what each check removed."""
    return FunnelStage("rows kept", stats["problems_kept"], dropped=[
        Count(key, f"{key.removeprefix('removed_').replace('_', ' ')} (problems; rows for the row rules)", value)
        for key, value in stats.items() if key.startswith("removed_")])


def run(cfg: Config, inputs, out):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.text.columns import arrow_columns, problem_index
    from pipeline.text.rows import warn_dry_run_stand_ins

    data = inputs[cfg.input].dataset()
    needed = ["id", "problem"] + (["pass_rate"] if cfg.min_pass_rate is not None or cfg.max_pass_rate is not None
                                  else [])
    require_columns(data, needed + list(cfg.keep_where) + list(cfg.drop_where), step="filter", source=cfg.input)
    # Column arrays, not Python rows: per-row Python objects of a million samples would be most of the memory.
    columns = arrow_columns(data, [c for c in ("id", "problem", "pass_rate", "finish_reason", "label")
                                   if c in data.column_names])
    codes, problem_ids = problem_index(pc.cast(columns["id"], pa.string()))
    first_rows = np.unique(codes, return_index=True)[1]  # each problem's first row; problems in input order
    removed: list[dict] = []
    row_dropped = np.zeros(len(codes), dtype=bool)  # by a row rule: keep/drop_where, then drop_truncated
    if cfg.keep_where or cfg.drop_where:
        row_dropped = _rows_by_value(cfg, data, codes, problem_ids, removed)

    if cfg.drop_truncated:
        cut = np.zeros(len(codes), dtype=bool)
        for column, value in (("finish_reason", "length"), ("label", "truncated")):
            if column in columns.column_names:
                cut |= pc.fill_null(pc.equal(columns[column], value), False).to_numpy(zero_copy_only=False)
        cut &= ~row_dropped
        removed += [{"id": problem_ids[codes[row]], "reason": "truncated", "detail": f"row {row}"}
                    for row in np.flatnonzero(cut).tolist()]
        row_dropped |= cut
    stand_ins = {}
    if out.dry_run and len(codes) and row_dropped.all():  # as select does: the steps after this one run on something
        row_dropped[:], removed = False, []
        warn_dry_run_stand_ins("filter", "the row rules keep no row", len(codes))
        stand_ins = {"dry_run_stand_ins": len(codes)}

    # id -> problem text (its first row's), input order
    first_texts = columns["problem"].take(pa.array(first_rows)).to_pylist()
    problems: dict[str, str] = {problem_id: text or "" for problem_id, text in zip(problem_ids, first_texts)}
    pass_rates: dict[str, float | None] = {}
    if "pass_rate" in columns.column_names:
        pass_rates = dict(zip(problem_ids, columns["pass_rate"].take(pa.array(first_rows)).to_pylist()))
    dropped: dict[str, str] = {}  # problem id -> reason
    # a problem whose every row a row rule removed is gone: it must not make a later problem its duplicate
    rows_left = np.bincount(codes[~row_dropped], minlength=len(problem_ids))
    dropped.update({problem_ids[i]: "rows" for i in np.flatnonzero(rows_left == 0).tolist()})

    def drop(problem_id: str, reason: str, detail: str) -> None:
        dropped[problem_id] = reason
        removed.append({"id": problem_id, "reason": reason, "detail": detail})

    if cfg.min_pass_rate is not None or cfg.max_pass_rate is not None:
        low, high = cfg.min_pass_rate or 0.0, 1.0 if cfg.max_pass_rate is None else cfg.max_pass_rate
        for problem_id, rate in pass_rates.items():
            if problem_id in dropped:
                continue
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

    problem_dropped = np.array([problem_id in dropped for problem_id in problem_ids], dtype=bool)
    kept_rows = np.flatnonzero(~row_dropped & ~problem_dropped[codes])
    out.dir.mkdir(parents=True, exist_ok=True)
    with open(out.dir / REMOVED_FILE, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in removed)
    counts: dict[str, int] = defaultdict(int)
    for entry in removed:
        counts[entry["reason"]] += 1
    return out.write_dataset(
        data.select(kept_rows),
        rows_in=len(codes),
        problems_in=len(problems),
        problems_kept=len(np.unique(codes[kept_rows])),
        **{f"removed_{reason}": counts[reason] for reason in ("truncated", "ungraded", "pass_rate", "duplicate",
                                                               "near_duplicate", "contaminated")},
        **{f"removed_{reason}": counts[reason] for reason in ("keep_where", "drop_where") if getattr(cfg, reason)},
        **stand_ins,
    )


def _rows_by_value(cfg: Config, data, codes, problem_ids, removed: list[dict]):
    """The rows keep_where / drop_where remove (a boolean per row), each listed in `removed` with its rule."""
    import numpy as np

    from pipeline.text.columns import arrow_columns

    gone = np.zeros(len(codes), dtype=bool)
    for rule, keep in (("keep_where", True), ("drop_where", False)):
        for column, values in getattr(cfg, rule).items():
            held = arrow_columns(data, [column])[column].to_pylist()
            for row, value in enumerate(held):
                # `value in values` would take True for 1 and 1.0 for 1: the type must match too
                listed = any(type(value) is type(v) and value == v for v in values)
                if not gone[row] and listed != keep:
                    gone[row] = True
                    removed.append({"id": problem_ids[codes[row]], "reason": rule,
                                    "detail": f"row {row}: {column} = {value!r}"})
    return gone


def _drop_near_duplicates(cfg: Config, problems: dict[str, str], dropped: dict[str, str], drop) -> None:
    """Compare each problem with the earlier kept ones that MinHash LSH offers as candidates, by exact Jaccard.

    The exact rule compares a problem with every earlier kept problem; comparing with those that share an n-gram (an
    inverted index, until 2026-11-30) made it superlinear, as common phrasings put most problems in each other's
    lists (MATH/GSM8K training problems at 0.8: 2k 0.9 s, 4k 6.0 s, 8k 15.4 s). LSH offers candidates in about
    constant time per problem and each is checked exactly, so a problem is dropped only for a pair that reaches the
    threshold; the cost is the pairs LSH misses (see MINHASH_PERMUTATIONS). Measured on the 14,916 MATH and GSM8K
    training problems in data/train: at 0.8 the exact rule drops 44 and LSH the same 44 (none missed); at 0.9 11
    and 11; at 0.7 82 and 81 (the one missed pair has Jaccard 0.71). Exact 23-31 s, LSH 3-6 s there.
    """
    import xxhash  # a dependency of datasets
    from datasketch import MinHash, MinHashLSH

    # Index keys are positions in input order, so that a tie in similarity goes to the earliest kept problem
    # whatever order the index returns its candidates in.
    problem_ids, texts = list(problems), list(problems.values())
    # at 1.0 the layout would be one band, which datasketch refuses; identical n-gram sets collide in any layout
    lsh = MinHashLSH(threshold=min(cfg.near_duplicate, 0.99), num_perm=MINHASH_PERMUTATIONS, weights=LSH_WEIGHTS)
    # drawn once and shared by every sketch; xxh32 hashes an n-gram faster than datasketch's default sha1
    permutations = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=MINHASH_SEED, hashfunc=xxhash.xxh32_intdigest)
    for position, problem_id in enumerate(problem_ids):
        if problem_id in dropped:
            continue
        grams = ngrams(texts[position], cfg.near_duplicate_ngram)
        if not grams:  # an empty problem shares no n-gram with any other
            continue
        signature = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=MINHASH_SEED, hashfunc=permutations.hashfunc,
                            permutations=permutations.permutations, scheme=permutations.scheme)
        # tokens never hold the unit separator, so distinct n-grams stay distinct byte strings
        signature.update_batch(["\x1f".join(gram).encode() for gram in grams])
        best, best_position = 0.0, None
        for other in sorted(lsh.query(signature)):
            other_grams = ngrams(texts[other], cfg.near_duplicate_ngram)
            similarity = len(grams & other_grams) / len(grams | other_grams)
            if similarity > best:
                best, best_position = similarity, other
        if best_position is not None and best >= cfg.near_duplicate:
            drop(problem_id, "near_duplicate", f"Jaccard {best:.2f} with {problem_ids[best_position]}")
            continue
        lsh.insert(position, signature, check_duplication=False)


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

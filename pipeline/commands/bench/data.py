"""`distill bench data`: time and peak memory of the driver-side data steps at 10k, 100k, 1M rows.

Once sampling is spread over many machines, `load`, `verify`'s bookkeeping, `select`, `pairs` and `filter` run on
one driver over every row; each must stay linear in time and bounded in memory. Per size (`--data-rows`), on
synthetic rows of realistic length:

    load             a JSONL file of that many problems (~200 characters, GSM8K-like phrasing from a dozen
                     templates, so that most problems share long n-grams with thousands of others)
    verify           that many samples (4 per problem; completions of 1-4k characters, log-uniform, with their
                     reasoning/response split, prompt, prompt text, think prefix) whose grades are all in the step's
                     progress file already, as when it resumes: only the driver's bookkeeping runs (pass rates,
                     label counts, the graded columns, writing the dataset), no math-verify
    select, pairs    verify's output (first_correct; one pair per problem)
    filter           verify's output: truncated rows, pass rate above 0.99, exact and near duplicates (0.8),
                     decontamination against the bundled benchmarks
    filter_problems  load's output (that many problems): the same problem filters, near duplicates being most of it

Each case runs in a fresh process (`run_child`), so one case's memory never shows in another's. Its numbers: wall
seconds of the step's `run` (reading its input, computing, writing its dataset); peak anonymous RSS above the
process's baseline (RssAnon of /proc/self/status, sampled every 5 ms from a thread, baseline read once pyarrow,
datasets and the step are imported): the memory the step allocates. File-backed pages of the memory-mapped Arrow
files it reads are left out: the kernel drops them under pressure, and they would make reading a 5 GB dataset look
like holding it. Raw peak RSS (ru_maxrss, those pages included) is reported too.

Planted in the problems, so that the filters have work: 1% repeat an earlier problem with other case and spacing,
3% an earlier problem with a short instruction added (5-gram Jaccard about 0.85-0.93).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pipeline.commands.bench import child_main, run_child

CASES = ("load", "verify", "select", "pairs", "filter", "filter_problems")
SAMPLES_PER_PROBLEM = 4
BATCH_ROWS = 5_000  # rows generated and written at a time
THINK_PREFIX = "<think>\n"
PROMPT_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
MODEL = "bench/teacher"
NAMES = ("Ava", "Ben", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam", "Mei",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara", "Zoe")
ITEMS = ("apple", "notebook", "marble", "ticket", "cupcake", "pencil", "sticker", "book", "flower", "cookie",
         "shirt", "stamp", "card", "toy car", "bottle")
UNITS = ("dollars", "cents", "hours", "minutes", "days", "weeks")
# GSM8K-like phrasing: a problem is an opening, a time, a turn and a question, each drawn from these with numbers,
# names and items filled in; problems share these phrases (n-grams) with thousands of others, as real ones share
# "How many ... does ... have left?", but two problems are seldom alike as a whole.
OPENINGS = ("{a} has {x} {item}s", "{a} buys {x} {item}s at the market", "A store sells {item}s for ${x} each",
            "There are {x} {item}s in a big box", "{a} collects {x} {item}s every week",
            "{a} bakes {x} {item}s for a party", "A class of {x} students is making {item}s",
            "{a} earns ${x} an hour packing {item}s", "A factory makes {x} {item}s each day",
            "{a} and {b} share {x} {item}s equally")
TIMES = ("on Monday", "during the summer holidays", "after school", "at the weekend fair", "before lunch",
         "every morning", "in the first week of May", "last year", "on the way home", "at the library")
TURNS = ("{b} gives {a} {y} more", "{a} gives away {y} of them to {b}", "{b} eats {y} of them",
         "the price goes up by {y} percent", "{a} sells {y} of them for ${z} each", "{y} of them turn out broken",
         "{b} brings twice as many as {a}", "{a} loses {y} of them on the bus", "{b} takes a third of them",
         "{a} puts them into boxes of {z}")
QUESTIONS = ("How many {item}s does {a} have left?", "How much money, in {unit}, does {a} make in total?",
             "What fraction of the {item}s are left at the end?", "How many {unit} will it take to finish?",
             "How many more {item}s does {b} have than {a}?", "How many full boxes can {a} fill?",
             "What is the total cost of all the {item}s, in {unit}?", "How many {item}s were there at first?",
             "If {a} started with {z} more, how many would there be now?",
             "What percent of the {item}s does {b} end up with?")

FILLER = ("Let me set up the problem first.", "Now I need to be careful with the units here.",
          "Wait, let me re-check that step.", "So far this looks consistent.", "Let me try another way to verify.",
          "Hmm, that does not look right, so I will redo the subtraction.", "That matches the earlier estimate.")

# what a near duplicate adds to an earlier problem: 3-7 tokens on ~40, n-gram Jaccard ~0.85-0.93
ADDED = (" Explain briefly.", " Give a whole number.", " Round to the nearest whole number.",
         " Show each step of the work.", " Write the answer in words.")


def problem_texts(count: int, seed: int) -> list[str]:
    """`count` GSM8K-like problems, with 1% exact (case/spacing) and 3% near duplicates of earlier ones planted."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(count):
        draw = rng.random()
        if texts and draw < 0.01:
            earlier = rng.choice(texts[-1000:])
            texts.append("  " + earlier.upper() if rng.random() < 0.5 else earlier.replace(" ", "  ", 3))
        elif texts and draw < 0.04:
            texts.append(rng.choice(texts[-1000:]) + rng.choice(ADDED))
        else:
            template = (f"{rng.choice(OPENINGS)} {rng.choice(TIMES)}. Then {rng.choice(TURNS)}, and later "
                        f"{rng.choice(TURNS)} {rng.choice(TIMES)}. {rng.choice(QUESTIONS)}")
            texts.append(template.format(
                a=rng.choice(NAMES), b=rng.choice(NAMES), item=rng.choice(ITEMS), unit=rng.choice(UNITS),
                x=rng.randint(2, 999), y=rng.randint(2, 99), z=rng.randint(2, 99)))
    return texts


def reasoning_text(rng: random.Random, length: int) -> str:
    """About `length` characters of step-by-step arithmetic and filler, like a reasoning trace."""
    parts, size = [], 0
    while size < length:
        if rng.random() < 0.3:
            part = rng.choice(FILLER)
        else:
            a, b = rng.randint(2, 9999), rng.randint(2, 999)
            part = f"We have {a} and {b}, so {a} + {b} = {a + b} and {a} * {b} = {a * b}."
        parts.append(part)
        size += len(part) + 1
    return " ".join(parts)


def write_inputs(spec: dict) -> dict:
    """Write the cases' inputs under `workdir`: problems.jsonl, the samples dataset and verify's progress file
    holding a grade for every sample. Generated BATCH_ROWS at a time, so memory stays bounded."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    from eval.answers import Grade
    from pipeline.steps.verify import PROGRESS_FILE

    rows, workdir = spec["rows"], Path(spec["workdir"])
    problems = rows // SAMPLES_PER_PROBLEM
    texts = problem_texts(problems, seed=0)
    rng = random.Random(1)
    with open(workdir / "problems.jsonl", "w") as f:
        for number, text in enumerate(texts):
            f.write(json.dumps({"id": f"p{number}", "problem": text, "answer": str(number % 997),
                                "source": "bench"}) + "\n")
    with open(workdir / "problems_all.jsonl", "w") as f:  # `rows` problems, for load and filter_problems
        for number, text in enumerate(problem_texts(rows, seed=2)):
            f.write(json.dumps({"id": f"q{number}", "problem": text, "answer": str(number % 997),
                                "source": "bench"}) + "\n")

    message = {"content": datasets.Value("string"), "role": datasets.Value("string")}
    features = datasets.Features({
        "id": datasets.Value("string"), "problem": datasets.Value("string"), "answer": datasets.Value("string"),
        "source": datasets.Value("string"), "sample_idx": datasets.Value("int64"),
        "prompt": datasets.List(message), "prompt_text": datasets.Value("string"),
        "completion": datasets.Value("string"), "reasoning": datasets.Value("string"),
        "response": datasets.Value("string"), "finish_reason": datasets.Value("string"),
        "prompt_tokens": datasets.Value("int64"), "completion_tokens": datasets.Value("int64"),
        "model": datasets.Value("string"), "think_prefix": datasets.Value("string")})
    progress = workdir / "verify_scratch" / PROGRESS_FILE
    progress.parent.mkdir(parents=True)
    raw = workdir / "samples.arrow"
    chars = 0
    with ArrowWriter(features=features, path=str(raw)) as writer, open(progress, "w") as log:
        batch: list[dict] = []
        for row in range(problems * SAMPLES_PER_PROBLEM):
            number, sample_idx = divmod(row, SAMPLES_PER_PROBLEM)
            if sample_idx == 0:
                difficulty, bad_gold = rng.random(), rng.random() < 0.01
            length = round(math.exp(rng.uniform(math.log(1000), math.log(4000))))
            reasoning = reasoning_text(rng, length)
            truncated = rng.random() < 0.1
            answer = str(number % 997)
            response = "" if truncated else f"Adding it all up gives {answer}.\n\nThe answer is $\\boxed{{{answer}}}$."
            completion = reasoning if truncated else f"{reasoning}\n</think>\n\n{response}"
            chars += len(completion)
            grade = grade_of(rng, truncated, bad_gold, difficulty, answer, Grade)
            log.write(json.dumps([row, grade.label, grade.correct, grade.extracted, grade.error]) + "\n")
            prompt_text = texts[number] + PROMPT_SUFFIX
            batch.append({
                "id": f"p{number}", "problem": texts[number], "answer": answer, "source": "bench",
                "sample_idx": sample_idx, "prompt": [{"content": prompt_text, "role": "user"}],
                "prompt_text": f"<|im_start|>user\n{prompt_text}<|im_end|>\n<|im_start|>assistant\n{THINK_PREFIX}",
                "completion": completion, "reasoning": reasoning, "response": response,
                "finish_reason": "length" if truncated else "stop", "prompt_tokens": len(prompt_text) // 4,
                "completion_tokens": len(completion) // 4, "model": MODEL, "think_prefix": THINK_PREFIX})
            if len(batch) == BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=features.arrow_schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=features.arrow_schema))
        writer.finalize()
    datasets.Dataset.from_file(str(raw)).save_to_disk(str(workdir / "samples" / "data"))
    raw.unlink()
    return {"problems": problems, "samples": problems * SAMPLES_PER_PROBLEM,
            "mean_completion_chars": round(chars / max(problems * SAMPLES_PER_PROBLEM, 1))}


def grade_of(rng: random.Random, truncated: bool, bad_gold: bool, difficulty: float, answer: str, grade):
    """A verify grade for one synthetic sample: the label mix of a real run, a few ungraded ones included."""
    if bad_gold:
        return grade("bad_gold", False, answer)
    if truncated:
        return grade("truncated", False, "")
    draw = rng.random()
    if draw < 0.005:
        return grade("timeout", False, "")
    if draw < 0.006:
        return grade("error", False, "", error="RecursionError: maximum recursion depth exceeded")
    if rng.random() < difficulty:
        return grade("correct", True, answer)
    return grade("incorrect", False, str(int(answer) + 1)) if rng.random() < 0.8 else grade("no_answer", False, "")


class AnonPeak:
    """Peak RssAnon of this process while in the `with` block, sampled every 5 ms by a thread."""

    def __init__(self):
        self.peak_kib = anon_rss_kib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak_kib = max(self.peak_kib, anon_rss_kib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, anon_rss_kib())


def anon_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (needs Linux)")


def run_case(spec: dict) -> dict:
    """Run one step on the inputs `write_inputs` made, in this process: its wall seconds and peak memory."""
    import resource
    from importlib import import_module

    import datasets  # noqa: F401 -- imported before the baseline is read, as every step needs it
    import pyarrow  # noqa: F401 -- likewise

    from pipeline.core.artifacts import Artifact, Output

    datasets.disable_progress_bars()
    case, workdir = spec["case"], Path(spec["workdir"])
    if case == "inputs":
        return write_inputs(spec)
    step = "filter" if case == "filter_problems" else case
    module = import_module(f"pipeline.steps.{step}")
    inputs = {name: Artifact(name, "dataset", workdir / name) for name in ("samples", "graded", "problems")}
    # verify's scratch holds its progress file, with every grade already
    scratch = workdir / ("verify_scratch" if case == "verify" else f"{case}_scratch")
    out = Output(name=case, kind="dataset", dir=workdir / case, scratch=scratch, seed=None)
    configs = {
        "load": dict(path=str(workdir / "problems_all.jsonl")),
        "verify": dict(input="samples"),
        "select": dict(input="graded"),
        "pairs": dict(input="graded"),
        "filter": dict(input="graded", drop_truncated=True, max_pass_rate=0.99, near_duplicate=0.8),
        "filter_problems": dict(input="problems", near_duplicate=0.8),
    }
    cfg = module.Config(uses=step, **configs[case])
    baseline_kib = anon_rss_kib()
    with AnonPeak() as peak:
        started = time.perf_counter()
        artifact = module.run(cfg, inputs, out)
        seconds = time.perf_counter() - started
    if case in ("load", "verify"):  # their outputs are the later cases' inputs
        (workdir / case).rename(workdir / ("problems" if case == "load" else "graded"))
    return {"case": case, "seconds": round(seconds, 3), "rows_in": spec["rows_in"],
            "rows_out": artifact.stats["rows"],
            "peak_anon_above_baseline_gib": round((peak.peak_kib - baseline_kib) / 2**20, 3),
            "baseline_anon_gib": round(baseline_kib / 2**20, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "stats": {k: v for k, v in artifact.stats.items() if isinstance(v, (int, float)) and v is not None}}


def row_counts(text: str) -> list[int]:
    """`--data-rows 10000,100000`: increasing row counts, each at least SAMPLES_PER_PROBLEM."""
    import argparse

    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated row counts: {text!r}") from None
    if sorted(set(counts)) != counts or counts[0] < SAMPLES_PER_PROBLEM:
        raise argparse.ArgumentTypeError(f"row counts must increase and be at least {SAMPLES_PER_PROBLEM}: {text!r}")
    return counts


def case_names(text: str) -> list[str]:
    """`--data-cases load,filter`: some of CASES, run in CASES order (load and verify make the others' inputs)."""
    import argparse

    names = text.split(",")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown}; cases are {', '.join(CASES)}")
    return [case for case in CASES if case in names or case in ("load", "verify")]


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    results: dict = {"sizes": {}}
    for rows in opts.data_rows:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-data-{rows}-"))
        try:
            started = time.perf_counter()
            made = run_child("pipeline.commands.bench.data", {"case": "inputs", "rows": rows, "workdir": str(workdir)})
            made["seconds"] = round(time.perf_counter() - started, 1)
            cases = {}
            for case in opts.data_cases:
                rows_in = rows if case in ("load", "filter_problems") else made["samples"]
                cases[case] = run_child("pipeline.commands.bench.data", {"case": case, "rows_in": rows_in,
                                                                "workdir": str(workdir)})
                console.print(f"data {rows:,} rows: {case} {cases[case]['seconds']:.2f} s, "
                              f"{cases[case]['peak_anon_above_baseline_gib']:.2f} GiB above baseline")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results["sizes"][str(rows)] = {"inputs": made, "cases": cases}

    table = Table(title="distill bench data — seconds / peak GiB above baseline (raw peak RSS)")
    table.add_column("step")
    for rows in opts.data_rows:
        table.add_column(f"{rows:,} rows", justify="right")
    for case in opts.data_cases:
        table.add_row(case, *(
            "{seconds:.2f} s / {peak_anon_above_baseline_gib:.2f} ({peak_rss_gib:.2f})".format(
                **results["sizes"][str(rows)]["cases"][case]) for rows in opts.data_rows))
    console.print(table)
    smallest, largest = str(opts.data_rows[0]), str(opts.data_rows[-1])
    if smallest != largest:
        # time per row at the largest size over that at the smallest: ~1 when a step scales linearly
        results["per_row_time_growth"] = {
            case: round((results["sizes"][largest]["cases"][case]["seconds"] / int(largest))
                        / max(results["sizes"][smallest]["cases"][case]["seconds"] / int(smallest), 1e-9), 2)
            for case in opts.data_cases}
        console.print("time per row, largest / smallest size: " + ", ".join(
            f"{case} {growth}" for case, growth in results["per_row_time_growth"].items()))
    return results, {}


if __name__ == "__main__":
    child_main({case: run_case for case in (*CASES, "inputs")})

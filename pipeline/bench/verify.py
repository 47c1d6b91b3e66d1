"""`distill bench verify`: how much faster the grading pool (eval.grading_pool's `grade_many`, the verify step's path, with
the step's default timeout) grades with 2 workers than with 1, on the same samples, clean and with 5% pathological.

The samples look like a teacher's output: per problem (MATH-500 and GSM8K in equal numbers, in random order), four
consecutive samples sharing its gold answer, as the sample step writes them: the reference solution (correct), the
same solution with a different final answer (incorrect), its first half cut at the token limit (truncated) and a
reply with no answer. No completion is graded twice or against two golds. The pathological set is the same samples
with 5% of the completions replaced by ones math-verify cannot grade in bounded time (or that try hard to make it
so): power towers, 50k characters of garbage, unbalanced or deeply nested braces, huge literals.

This machine's own speed varies from second to second (a shared host), so the cases run in rounds, 1 and 2 workers
back to back, and the headlines are medians over rounds of per-round ratios. Each round also measures the machine's
ceiling: how much faster two processes run a pure-Python loop than one process runs both halves.
`verify_speedup` = clean, 1-worker seconds / 2-worker seconds; `verify_pathological_slowdown` = 2 workers, seconds
with 5% pathological / seconds clean (issue #3: 5% pathological samples must not double the time).

Times include starting the pool's workers, forked from the grading server; the server itself starts once per
process (`server_start_s`, paid once by a verify step) before the rounds.
"""

from __future__ import annotations

import random
import statistics
import string
import time
from collections import Counter

PATHOLOGICAL_FRACTION = 0.05
SAMPLES_PER_PROBLEM = 4
CEILING_LOOP = 10_000_000  # iterations of the pure-Python loop, ~1 s in one process


def pathological_completions(rng: random.Random) -> list[str]:
    garbage = "".join(rng.choice(string.printable) for _ in range(50_000))
    return [
        "So the answer is \\boxed{10^{10^{10^{10}}}}.",
        "\\boxed{9^{9^{9}}}",
        "\\boxed{2^{3^{4^{5}}}}",
        garbage,
        "\\boxed{" + garbage.replace("}", ")") + "}",
        "\\boxed{\\frac{1}{2" + "{" * 5000,  # unbalanced braces
        "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
        "\\boxed{" + "9" * 50_000 + "}",
        "The answer is $10^{10^{100}}$.",
        "\\boxed{" + "+".join(["x^{2}"] * 2000) + "}",
    ]


def teacher_like_samples(samples: int, seed: int = 0) -> tuple[dict, dict]:
    """Two sets of {"completions", "golds", "finish_reasons"}: clean, and with PATHOLOGICAL_FRACTION of the
    completions replaced."""
    from eval.benchmarks import load_benchmark
    from eval.answers import last_boxed
    from pipeline.errors import UserError

    _, math500 = load_benchmark("math500")
    _, gsm8k = load_benchmark("gsm8k", limit=len(math500))
    available = [("math", r) for r in math500] + [("gsm8k", r) for r in gsm8k]
    if not 0 < samples <= SAMPLES_PER_PROBLEM * len(available):
        raise UserError(f"bench verify: --samples must be 1 to {SAMPLES_PER_PROBLEM * len(available)} "
                        f"({SAMPLES_PER_PROBLEM} per MATH-500/GSM8K problem), got {samples}")
    rng = random.Random(seed)
    rows = rng.sample(available, -(-samples // SAMPLES_PER_PROBLEM))
    completions, golds, finish_reasons = [], [], []
    for source, row in rows:
        if source == "math":
            solution = row["solution"]
            boxed = last_boxed(solution)
            wrong = solution.replace(boxed, "\\boxed{" + boxed[len("\\boxed{"):-1] + " + 1}")
        else:
            answer = int(row["answer"].replace(",", ""))
            solution = f"{row['solution']}\nSo the answer is {answer}."
            wrong = f"{row['solution']}\nSo the answer is {answer + 1}."
        completions += [solution, wrong, solution[:len(solution) // 2], "I am not sure how to solve this."]
        golds += [row["answer"]] * SAMPLES_PER_PROBLEM
        finish_reasons += ["stop", "stop", "length", "stop"]
    clean = {"completions": completions[:samples], "golds": golds[:samples], "finish_reasons": finish_reasons[:samples]}
    bad = pathological_completions(rng)
    mixed = {key: list(values) for key, values in clean.items()}
    for k, i in enumerate(rng.sample(range(samples), round(PATHOLOGICAL_FRACTION * samples))):
        mixed["completions"][i], mixed["finish_reasons"][i] = bad[k % len(bad)], "stop"
    return clean, mixed


def timed_grading(data: dict, workers: int, timeout_s: float) -> tuple[float, Counter]:
    from eval.grading_pool import grade_many

    started = time.perf_counter()
    grades = grade_many(data["completions"], data["golds"], finish_reasons=data["finish_reasons"], workers=workers,
                        timeout_s=timeout_s)
    return time.perf_counter() - started, Counter(g.label for g in grades)


def _loop(iterations: int) -> float:
    started = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i * i
    return time.perf_counter() - started


def parallel_ceiling(pool) -> float:
    """How much faster two processes run two halves of a pure-Python loop than one process runs both."""
    one = pool.apply(_loop, (CEILING_LOOP,))
    started = time.perf_counter()
    pool.map(_loop, [CEILING_LOOP // 2] * 2, chunksize=1)
    return one / (time.perf_counter() - started)


def run(opts, console) -> tuple[dict, dict]:
    import multiprocessing

    from rich.table import Table

    from eval.grading_pool import grade_many
    from pipeline.errors import UserError
    from pipeline.steps.verify import Config

    if opts.rounds < 1:
        raise UserError(f"bench verify: --rounds must be at least 1, got {opts.rounds}")
    timeout_s = Config.model_fields["timeout_s"].default
    sets = dict(zip(("clean", "pathological"), teacher_like_samples(opts.samples)))
    started = time.perf_counter()
    grade_many(["\\boxed{1}"], ["1"], workers=1, timeout_s=timeout_s)
    server_start_s = time.perf_counter() - started

    rounds: list[dict] = []
    labels: dict[tuple[str, int], Counter] = {}
    with multiprocessing.get_context("spawn").Pool(2) as ceiling_pool:
        ceiling_pool.map(_loop, [1, 1])  # started before the clock runs
        for round_number in range(opts.rounds):
            seconds = {}
            for name, data in sets.items():
                for workers in (1, 2) if round_number % 2 == 0 else (2, 1):  # drift does not favour either
                    seconds[name, workers], labels_now = timed_grading(data, workers, timeout_s)
                    if labels.setdefault((name, workers), labels_now) != labels_now:
                        raise RuntimeError(f"bench verify: the {name} set graded differently in two rounds "
                                           f"({labels[name, workers]} vs {labels_now})")
            rounds.append({"seconds": {f"{name}_{workers}": round(s, 3) for (name, workers), s in seconds.items()},
                           "speedup": round(seconds["clean", 1] / seconds["clean", 2], 3),
                           "pathological_speedup": round(seconds["pathological", 1] / seconds["pathological", 2], 3),
                           "pathological_slowdown": round(seconds["pathological", 2] / seconds["clean", 2], 3),
                           "ceiling": round(parallel_ceiling(ceiling_pool), 3)})
    for name in sets:
        if labels[name, 1] != labels[name, 2]:
            raise RuntimeError(f"bench verify: 1 and 2 workers disagree on the {name} set ({labels[name, 1]} vs "
                               f"{labels[name, 2]})")

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3)

    headlines = {"verify_speedup": median("speedup"), "verify_pathological_slowdown": median("pathological_slowdown")}
    pathological = round(PATHOLOGICAL_FRACTION * opts.samples)
    table = Table(title=f"distill bench verify — {opts.samples} MATH-500/GSM8K samples, clean and with "
                        f"{pathological} pathological, timeout {timeout_s:g} s, {opts.rounds} rounds (medians)")
    for column in ("set", "1 worker s", "2 workers s", "speedup", "machine ceiling", "correct", "timeout"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name in sets:
        one = statistics.median(r["seconds"][f"{name}_1"] for r in rounds)
        two = statistics.median(r["seconds"][f"{name}_2"] for r in rounds)
        speedup = median("speedup" if name == "clean" else "pathological_speedup")
        table.add_row(name, f"{one:.2f}", f"{two:.2f}", f"{speedup:.2f}", f"{median('ceiling'):.2f}",
                      str(labels[name, 1]["correct"]), str(labels[name, 1]["timeout"]))
    console.print(table)
    raw = {"samples": opts.samples, "pathological": pathological, "timeout_s": timeout_s,
           "server_start_s": round(server_start_s, 2), "ceiling": median("ceiling"),
           "speedup_over_ceiling": round(headlines["verify_speedup"] / median("ceiling"), 3),
           "labels": {f"{name}_{workers}": dict(counts.most_common()) for (name, workers), counts in labels.items()},
           "rounds": rounds}
    return raw, headlines

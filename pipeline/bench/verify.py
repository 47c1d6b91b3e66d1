"""`distill bench verify`: graded samples/s of the grading pool (eval.grader's `grade_many`, the verify step's path,
with the step's default timeout) with 1 and 2 workers, on the same items clean and with 5% pathological completions.

Clean items: MATH-500 reference solutions against their own gold and against another problem's gold, GSM8K
solutions ending in "So the answer is N", and answers with no number. The pathological set is the same items with
5% of the completions replaced by ones math-verify cannot grade in bounded time (or that try hard to make it so):
power towers, 50k characters of garbage, unbalanced or deeply nested braces, huge literals.

Rates are over the wall time including starting the workers, as the verify step pays it; start-up (grading one item
per worker) and the rate after it are reported too. `verify_speedup` = clean, 2 workers / 1;
`verify_pathological_slowdown` = seconds with 5% pathological / seconds clean, 2 workers (issue #3: 5% pathological
samples must not double the time).
"""

from __future__ import annotations

import random
import string
import time
from collections import Counter

PATHOLOGICAL_FRACTION = 0.05


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


def mixed_items(samples: int, seed: int = 0) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """((completions, golds) clean, (completions, golds) with PATHOLOGICAL_FRACTION of the completions replaced)."""
    from eval.benchmarks import load_benchmark

    rng = random.Random(seed)
    _, math500 = load_benchmark("math500")
    _, gsm8k = load_benchmark("gsm8k", limit=len(math500))  # as many GSM8K as MATH-500 rows: half cheap, half LaTeX
    pool: list[tuple[str, str]] = []
    for i, row in enumerate(math500):
        pool.append((row["solution"], row["answer"]))
        pool.append((row["solution"], math500[(i + 1) % len(math500)]["answer"]))
    for row in gsm8k:
        pool.append((f"{row['solution']}\nSo the answer is {row['answer']}.", row["answer"]))
        pool.append(("I am not sure how to solve this.", row["answer"]))
    clean = [rng.choice(pool) for _ in range(samples)]
    completions, golds = [c for c, _ in clean], [g for _, g in clean]
    bad = pathological_completions(rng)
    mixed = list(completions)
    for k, i in enumerate(rng.sample(range(samples), round(PATHOLOGICAL_FRACTION * samples))):
        mixed[i] = bad[k % len(bad)]
    return (completions, golds), (mixed, golds)


def grade_rate(name: str, completions: list[str], golds: list[str], workers: int, timeout_s: float) -> dict:
    from eval.grader import grade_many

    def timed_grades(count: int) -> tuple[float, list]:
        started = time.perf_counter()
        grades = grade_many(completions[:count], golds[:count], workers=workers, timeout_s=timeout_s)
        return time.perf_counter() - started, grades

    startup, _ = timed_grades(workers)
    seconds, grades = timed_grades(len(completions))
    return {"set": name, "workers": workers, "seconds": round(seconds, 2),
            "samples_per_s": round(len(grades) / seconds, 1), "startup_s": round(startup, 2),
            # start-up is timed on its own pool; on a loaded machine it can exceed the whole run's time
            "after_startup_samples_per_s": round((len(grades) - workers) / (seconds - startup), 1)
            if seconds > startup else None,
            "labels": dict(Counter(g.label for g in grades).most_common())}


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    from pipeline.steps.verify import Config

    timeout_s = Config.model_fields["timeout_s"].default
    sets = dict(zip(("clean", "pathological"), mixed_items(opts.samples)))
    cases = [grade_rate(name, *data, workers=workers, timeout_s=timeout_s)
             for name, data in sets.items() for workers in (1, 2)]
    for one, two in zip(cases[::2], cases[1::2]):
        if one["labels"].get("correct") != two["labels"].get("correct"):
            raise RuntimeError(f"bench verify: 1 and 2 workers disagree on the {one['set']} set ({one['labels']} vs "
                               f"{two['labels']})")
    clean_1, clean_2, _, pathological_2 = cases
    headlines = {"verify_speedup": round(clean_2["samples_per_s"] / clean_1["samples_per_s"], 3),
                 "verify_pathological_slowdown": round(pathological_2["seconds"] / clean_2["seconds"], 3)}

    pathological = round(PATHOLOGICAL_FRACTION * opts.samples)
    table = Table(title=f"distill bench verify — {opts.samples} MATH-500/GSM8K completions, clean and with "
                        f"{pathological} pathological, timeout {timeout_s:g} s")
    # every label's count is in the JSON
    for column in ("set", "workers", "seconds", "samples/s", "start-up s", "samples/s after start-up", "correct",
                   "timeout"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for case in cases:
        after = case["after_startup_samples_per_s"]
        table.add_row(case["set"], str(case["workers"]), f"{case['seconds']:.2f}", f"{case['samples_per_s']:.0f}",
                      f"{case['startup_s']:.2f}", "-" if after is None else f"{after:.0f}",
                      str(case["labels"].get("correct", 0)), str(case["labels"].get("timeout", 0)))
    console.print(table)
    raw = {"samples": opts.samples, "pathological": pathological, "timeout_s": timeout_s, "cases": cases,
           "clean_2_workers_s": clean_2["seconds"], "pathological_2_workers_s": pathological_2["seconds"]}
    return raw, headlines

"""`distill bench verify`: how much faster the grading pool (eval.grading_pool's `grade_many`, the verify step's
path, with the step's default timeout) grades with 2 workers than with 1, on the same samples, clean and with 5%
pathological.

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

Long traces: reasoning traces run to 10k-100k characters. The last case grades `--samples` / 20 teacher-like traces
of that length (`long_traces`) two ways, back to back in each round: the verify step's path (`grade_many`, 2 workers,
its default timeout) and plain math-verify, `verify(parse(gold), parse(response))` with default configs in a
`multiprocessing.Pool(2)` (started and warmed before the clock, so its start-up is not counted; ours' is). Reported:
traces/s of each, the speedup = plain seconds / ours (median of per-round ratios), and how often each agrees with
the label the trace was built to have (correct or not).
"""

from __future__ import annotations

import math
import random
import re
import statistics
import string
import time
from collections import Counter

PATHOLOGICAL_FRACTION = 0.05
SAMPLES_PER_PROBLEM = 4
CEILING_LOOP = 10_000_000  # iterations of the pure-Python loop, ~1 s in one process
SAMPLES_PER_TRACE = 20  # the long-trace case grades --samples / 20 traces
TRACE_CHARS = (10_000, 100_000)  # lengths of the long traces, log-uniform
# How a long trace ends, and whether it is correct: the final answer boxed or stated in prose, right or wrong; cut at
# the token limit inside the reasoning; or stopped (finish_reason "stop") mid-sentence in the write-up after it.
TRACE_ENDINGS = {"boxed": True, "boxed_wrong": False, "prose": True, "prose_wrong": False, "truncated": False,
                 "stopped": False}
# Reasoning a teacher writes between the solution's steps: re-checks, side computations, tentative boxes. {a}, {b},
# {c} are small random integers; {gold} is the problem's gold answer, written as a guess in the middle.
REASONING_LINES = [
    "Wait, let me double check that. {a} + {b} = {a_plus_b}, so that part holds.",
    "Hmm, so we have $x^2 - {a_plus_b}x + {ab} = 0$, which factors as $(x - {a})(x - {b}) = 0$.",
    "Let me recompute: $\\frac{{{ab}}}{{{b}}} = {a}$, yes.",
    "Alternatively, maybe I should try {a} \\times {b} = {ab}. No, that does not fit the condition.",
    "So the intermediate value is \\boxed{{{c}}}. Let me re-check this before going on.",
    "Okay, let's see. If $n = {a}$, then $2n + 1 = {odd}$.",
    "But wait, the problem says something slightly different. Let me reread it.",
    "That gives {a} * {b} - {c} = {ab_minus_c}, which is not what we want.",
    "Let me think about this differently.\n",
]
GUESS_LINE = "Hmm, so maybe the answer is {gold}? I am not sure yet, let me verify this more carefully."


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
    from eval.answers import last_boxed
    from eval.benchmarks import load_benchmark
    from pipeline.core.errors import UserError

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


def long_traces(count: int, seed: int = 0) -> dict:
    """{"completions", "golds", "finish_reasons", "expected"}: `count` teacher-like traces of TRACE_CHARS, one per
    TRACE_ENDINGS in turn for each of count / len(TRACE_ENDINGS) problems (MATH-500 and GSM8K alternating), with
    `expected` whether the trace's answer is the gold's value.

    A trace is `<think>` + reasoning + `</think>` + the reference solution as the write-up. The reasoning mixes the
    solution's own sentences (boxes unwrapped) with REASONING_LINES and, once, the gold written as a guess; its
    re-check boxes never hold the gold. `truncated` traces stop inside the reasoning, mid-line, at the token limit;
    `stopped` ones stop mid-sentence halfway through the write-up's text before its answer."""
    from eval.answers import last_boxed
    from eval.benchmarks import load_benchmark

    _, math500 = load_benchmark("math500")
    _, gsm8k = load_benchmark("gsm8k", limit=len(math500))
    rng = random.Random(seed)
    problems = -(-count // len(TRACE_ENDINGS))
    sources = [row for pair in zip(rng.sample(math500, problems), rng.sample(gsm8k, problems)) for row in pair]
    traces: dict[str, list] = {"completions": [], "golds": [], "finish_reasons": [], "expected": []}
    for row in sources[:problems]:
        gold = row["answer"]
        if "\\boxed" in row["solution"]:
            boxed = last_boxed(row["solution"])
            right = row["solution"]
            wrong = right.replace(boxed, "\\boxed{" + boxed[len("\\boxed{"):-1] + " + 1}")
            prose = right.replace(boxed, boxed[len("\\boxed{"):-1])
            prose_right = f"{prose}\n\nTherefore, the final answer is \\( {gold} \\)."
            prose_wrong = f"{prose}\n\nTherefore, the final answer is \\( {gold} + 1 \\)."
        else:
            value = int(gold.replace(",", ""))
            right = f"{row['solution']}\n\nThe answer is $\\boxed{{{value}}}$."
            wrong = f"{row['solution']}\n\nThe answer is $\\boxed{{{value + 1}}}$."
            prose_right = f"{row['solution']}\n\nTherefore, the final answer is {value}."
            prose_wrong = f"{row['solution']}\n\nTherefore, the final answer is {value + 1}."
        write_ups = {"boxed": right, "boxed_wrong": wrong, "prose": prose_right, "prose_wrong": prose_wrong,
                     "stopped": _stopped_midway(right)}
        for ending, correct in TRACE_ENDINGS.items():
            length = round(math.exp(rng.uniform(*map(math.log, TRACE_CHARS))))
            if ending == "truncated":
                reasoning = _reasoning(rng, row["solution"], gold, length)
                completion, finish_reason = f"<think>\n{reasoning}"[:length], "length"
            else:
                reasoning = _reasoning(rng, row["solution"], gold, length - len(write_ups[ending]))
                completion, finish_reason = f"<think>\n{reasoning}\n</think>\n\n{write_ups[ending]}", "stop"
            for key, value in zip(traces, (completion, gold, finish_reason, correct)):
                traces[key].append(value)
    return {key: values[:count] for key, values in traces.items()}


def _reasoning(rng: random.Random, solution: str, gold: str, chars: int) -> str:
    """About `chars` characters of reasoning around a solution's sentences (see long_traces)."""
    steps = re.split(r"(?<=[.:])\s+", re.sub(r"\\boxed\{", "{", solution))
    lines, written, guessed = [], 0, False
    guess_at = rng.randrange(max(1, chars // 2))
    while written < chars:
        if written >= guess_at and not guessed:
            lines.append(GUESS_LINE.format(gold=gold))
            guessed = True
        elif rng.random() < 0.3:
            lines.append(rng.choice(steps))
        else:
            a, b = rng.randrange(2, 40), rng.randrange(2, 40)
            c = rng.randrange(2, 500)
            c += str(c) == gold.strip()  # a re-check box never holds the gold
            lines.append(rng.choice(REASONING_LINES).format(a=a, b=b, c=c, a_plus_b=a + b, ab=a * b,
                                                            odd=2 * a + 1, ab_minus_c=a * b - c))
        written += len(lines[-1]) + 1
    return "\n".join(lines)


def _stopped_midway(write_up: str) -> str:
    """The write-up cut mid-sentence halfway to its answer, after a word (a reply that ends on a number may have just
    stated it)."""
    half = write_up[:write_up.index("\\boxed") // 2]
    words = list(re.finditer(r"[A-Za-z](?= )", half))
    return half[:words[-1].end()] if words else half


def _plain_math_verify(gold_and_response: tuple[str, str]) -> bool:
    """Plain math-verify as a user calls it: default configs, the gold as given (a Pool worker: its main thread)."""
    from math_verify import parse, verify

    gold, response = gold_and_response
    return bool(verify(parse(gold), parse(response)))


def _warm_plain_math_verify() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _plain_math_verify(("\\frac{1}{2}", "The answer is $\\frac{1}{2}$."))


def long_trace_rounds(traces: dict, rounds: int, timeout_s: float) -> tuple[list[dict], dict[str, list[bool]]]:
    """Per round, the seconds of ours and of plain math-verify on the traces (order alternating); and each one's
    correct-or-not per trace, the same in every round (else RuntimeError)."""
    import multiprocessing

    from eval.grading_pool import grade_many

    items = list(zip(traces["golds"], traces["completions"]))
    per_round, verdicts = [], {}
    with multiprocessing.get_context("spawn").Pool(2, initializer=_warm_plain_math_verify) as plain_pool:
        plain_pool.map(_loop, [1, 1], chunksize=1)  # up and warm before the clock (round 0 times ours first)
        for round_number in range(rounds):
            seconds = {}
            for grader in ("ours", "plain") if round_number % 2 == 0 else ("plain", "ours"):
                started = time.perf_counter()
                if grader == "ours":
                    correct = [g.correct for g in grade_many(traces["completions"], traces["golds"], workers=2,
                                                             timeout_s=timeout_s,
                                                             finish_reasons=traces["finish_reasons"])]
                else:
                    correct = plain_pool.map(_plain_math_verify, items, chunksize=1)
                seconds[grader] = time.perf_counter() - started
                if verdicts.setdefault(grader, correct) != correct:
                    raise RuntimeError(f"bench verify: {grader} graded the long traces differently in two rounds")
            per_round.append({"ours_s": round(seconds["ours"], 3), "plain_s": round(seconds["plain"], 3),
                              "speedup": round(seconds["plain"] / seconds["ours"], 3)})
    return per_round, verdicts


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
    from pipeline.core.errors import UserError
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

    traces = long_traces(max(len(TRACE_ENDINGS), opts.samples // SAMPLES_PER_TRACE))
    trace_rounds, trace_verdicts = long_trace_rounds(traces, opts.rounds, timeout_s)
    trace_results = {"traces": len(traces["completions"]),
                  "mean_chars": round(statistics.mean(map(len, traces["completions"]))),
                  "speedup": round(statistics.median(r["speedup"] for r in trace_rounds), 3), "rounds": trace_rounds}
    table = Table(title=f"distill bench verify — {trace_results['traces']} long traces (mean "
                        f"{trace_results['mean_chars']:,} characters), 2 workers each, {opts.rounds} rounds (medians)")
    for column in ("grader", "s", "traces/s", "agrees with the built label", "correct"):
        table.add_column(column, justify="left" if column == "grader" else "right")
    for grader in ("ours", "plain"):
        grader_s = statistics.median(r[f"{grader}_s"] for r in trace_rounds)
        agreement = statistics.mean(v == e for v, e in zip(trace_verdicts[grader], traces["expected"]))
        trace_results[grader] = {"seconds": round(grader_s, 3), "agreement": round(agreement, 3),
                                 "traces_per_s": round(trace_results["traces"] / grader_s, 2),
                                 "correct": sum(trace_verdicts[grader])}
        table.add_row("ours (grade_many)" if grader == "ours" else "plain math-verify", f"{grader_s:.2f}",
                      f"{trace_results[grader]['traces_per_s']:.1f}", f"{agreement:.3f}",
                      str(trace_results[grader]["correct"]))
    console.print(table)
    headlines["verify_long_trace_speedup"] = trace_results["speedup"]
    console.print(f"long traces: ours grades {trace_results['speedup']:.2f}x as fast as plain math-verify "
                  f"({sum(traces['expected'])} of {trace_results['traces']} built correct)")

    raw = {"samples": opts.samples, "pathological": pathological, "timeout_s": timeout_s,
           "server_start_s": round(server_start_s, 2), "ceiling": median("ceiling"),
           "speedup_over_ceiling": round(headlines["verify_speedup"] / median("ceiling"), 3),
           "labels": {f"{name}_{workers}": dict(counts.most_common()) for (name, workers), counts in labels.items()},
           "rounds": rounds, "long_traces": trace_results}
    return raw, headlines

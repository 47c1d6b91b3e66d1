"""Generate data/fixtures/openr1-math-raw/: a small dataset in OpenR1-Math-Raw's schema, laid out as the Hub stores it.

OpenR1-Math-Raw (open-r1 on the Hugging Face Hub) holds one row per problem with DeepSeek-R1's traces in list
columns; the REDI paper built its SFT and pair data from it. This fixture has its columns and types, as the REDI
authors' preprocessing reads them (Tim-Siu/reinforcement-distillation, experiments_trl/data_preprocess/):

    problem, solution, answer, problem_type, question_type, problem_is_valid ("Yes"/"No"), solution_is_valid,
    source (olympiads, cn_k12, ...), synthetic (bool), generations (list of traces), generations_count,
    correctness: {llama_verification, math_verify_answer, math_verify_reparsed_answer} (a list of bools each, one per
    trace), reparsed_answers (list), messages (list of {role, content})

Nothing is copied from the dataset: the problems are generated arithmetic and algebra with known answers, the traces
are templated `<think>...</think>` reasoning ending in a boxed answer, right or wrong, some cut off before they
answer, some answering in another form (0.5 for 1/2). The published correctness flags agree with the truth except
where planted otherwise (about one trace in twelve), so that verify's agreement table has both kinds of cell.
Seeded: the same bytes on every run.

    python data/make_openr1_raw.py                     # rewrites data/fixtures/openr1-math-raw/
    python data/make_openr1_raw.py --out-dir /tmp/x    # writes the dataset repository under /tmp/x
"""

from __future__ import annotations

import argparse
import random
from fractions import Fraction
from pathlib import Path

PROBLEMS = 300
SEED = 0
OUT_DIR = Path(__file__).resolve().parent / "fixtures" / "openr1-math-raw"
SOURCES = ["olympiads", "olympiads", "amc_aime", "aops_forum", "number_theory", "inequalities", "cn_k12", "cn_k12"]
PROBLEM_TYPES = ["Algebra", "Number Theory", "Combinatorics", "Geometry"]
CARD = """---
license: apache-2.0  # this project's licence: generated, not copied
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---

# openr1-math-raw fixture

A generated stand-in for OpenR1-Math-Raw's schema (see data/make_openr1_raw.py): {problems} problems, {traces}
traces. Not real data: for tests and recipes/regenerate-redi-data.yaml.
"""


def make_problem(rng: random.Random, index: int) -> tuple[str, str, str]:
    """(problem text, answer as the dataset writes it, the same answer in another form a trace may give)."""
    kind = index % 3
    if kind == 0:
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 9)
        return f"Compute $({a} + {b}) \\times {c}$.", str((a + b) * c), str((a + b) * c)
    if kind == 1:
        x, k, m = rng.randint(2, 40), rng.randint(2, 9), rng.randint(1, 50)
        return f"Solve for $x$: ${k}x + {m} = {k * x + m}$.", str(x), f"x = {x}"
    p, q = rng.randint(1, 9), rng.randint(2, 12)
    while Fraction(p, q).denominator == 1:
        q += 1
    value = Fraction(p, q)
    other = f"{value.numerator / value.denominator:.6g}" if value.denominator in (2, 4, 5, 8) else str(value)
    return (f"A bag has {q * 3} marbles, of which {p * 3} are red. What fraction of the marbles is red? "
            "Give it in lowest terms.", f"\\frac{{{value.numerator}}}{{{value.denominator}}}", other)


def make_trace(rng: random.Random, problem: str, answer: str, other_form: str, kind: str) -> str:
    steps = [f"Let me read the problem: {problem}", "First I set up what is asked.",
             "Let me check the arithmetic again, step by step.", "Wait, I should double-check that.",
             "Yes, that is consistent."]
    thought = "\n\n".join(rng.sample(steps, k=rng.randint(2, len(steps))))
    if kind == "cut":  # stopped by the token limit inside the reasoning: no answer at all
        return f"<think>\n{thought}\n\nSo the next thing to compute is"
    given = {"right": answer, "right_other_form": other_form, "wrong": _wrong(rng, answer)}[kind]
    return (f"<think>\n{thought}\n</think>\n\nWorking it through, the result follows from the steps above.\n\n"
            f"The answer is $\\boxed{{{given}}}$.")


def _wrong(rng: random.Random, answer: str) -> str:
    if answer.startswith("\\frac"):
        numerator, denominator = answer[6:-1].split("}{")
        return f"\\frac{{{int(numerator) + 1}}}{{{denominator}}}"
    return str(int(answer) + rng.choice([-3, -1, 1, 2, 10]))


def make_rows(seed: int = SEED, problems: int = PROBLEMS) -> list[dict]:
    return make_rows_and_kinds(seed, problems)[0]


def make_rows_and_kinds(seed: int = SEED, problems: int = PROBLEMS) -> tuple[list[dict], list[list[str]]]:
    """The rows, and per row what each trace truly is (right, right_other_form, wrong, cut): the truth tests
    compare the pipeline's grades and counts with."""
    rng = random.Random(seed)
    rows, all_kinds = [], []
    for index in range(problems):
        problem, answer, other_form = make_problem(rng, index)
        count = rng.choice([1, 2, 2, 3, 4, 4])
        kinds = [rng.choices(["right", "right_other_form", "wrong", "cut"], weights=[5, 1, 3, 1])[0]
                 for _ in range(count)]
        generations = [make_trace(rng, problem, answer, other_form, kind) for kind in kinds]
        truth = [kind.startswith("right") for kind in kinds]
        # the published graders: right except where planted wrong (about 1 trace in 12 for each)
        all_kinds.append(kinds)
        reparsed = [t if rng.random() > 1 / 12 else not t for t in truth]
        llama = [t if rng.random() > 1 / 12 else not t for t in truth]
        rows.append({
            "problem": problem,
            "solution": f"Direct computation gives ${answer}$.",
            "answer": answer,
            "problem_type": PROBLEM_TYPES[index % len(PROBLEM_TYPES)],
            "question_type": "math-word-problem",
            "problem_is_valid": "No" if rng.random() < 0.05 else "Yes",
            "solution_is_valid": "Yes",
            "source": rng.choice(SOURCES),
            "synthetic": False,
            "generations": generations,
            "generations_count": count,
            "correctness": {"llama_verification": llama, "math_verify_answer": list(reparsed),
                            "math_verify_reparsed_answer": reparsed},
            "reparsed_answers": [answer if t else "" for t in reparsed],
            "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": generations[0]}],
        })
    return rows, all_kinds


def write(out_dir: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bools, strings = pa.list_(pa.bool_()), pa.list_(pa.string())
    schema = pa.schema([
        ("problem", pa.string()), ("solution", pa.string()), ("answer", pa.string()),
        ("problem_type", pa.string()), ("question_type", pa.string()), ("problem_is_valid", pa.string()),
        ("solution_is_valid", pa.string()), ("source", pa.string()), ("synthetic", pa.bool_()),
        ("generations", strings), ("generations_count", pa.int64()),
        ("correctness", pa.struct([("llama_verification", bools), ("math_verify_answer", bools),
                                   ("math_verify_reparsed_answer", bools)])),
        ("reparsed_answers", strings),
        ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ])
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out_dir / "data" / "train-00000-of-00001.parquet")
    traces = sum(row["generations_count"] for row in rows)
    (out_dir / "README.md").write_text(CARD.format(problems=len(rows), traces=traces))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    write(args.out_dir, make_rows(args.seed))


if __name__ == "__main__":
    main()

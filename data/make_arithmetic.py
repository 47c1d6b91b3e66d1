"""Generate the demo arithmetic problems: data/train/arith_train.jsonl and eval/data/arith_test.jsonl (package data).

Two-number problems "What is A op B?" with op in +, -, * and operands 2..30: small enough that
SmolLM2-135M solves some of them on CPU, so a quickstart can show distillation moving accuracy.
Every (A, op, B) triple is drawn at most once, so the train and test files share no problem.

    python data/make_arithmetic.py            # rewrites the two committed files
    python data/make_arithmetic.py --out-dir /tmp/x   # writes train/arith_train.jsonl and benchmarks/arith_test.jsonl under /tmp/x
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from pathlib import Path

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
OPERANDS = range(2, 31)
DATA_DIR = Path(__file__).resolve().parent


def all_triples() -> list[tuple[int, str, int]]:
    return [(a, op, b) for op in OPERATORS for a in OPERANDS for b in OPERANDS]


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Rows {"id", "problem", "answer"} for train and test, drawn without replacement from all triples."""
    triples = all_triples()
    if n_train + n_test > len(triples):
        raise ValueError(f"only {len(triples)} distinct problems exist; asked for {n_train} + {n_test}")
    random.Random(seed).shuffle(triples)

    def rows(split: str, chosen: list[tuple[int, str, int]]) -> list[dict]:
        return [{"id": f"arith-{split}-{i:04d}", "problem": f"What is {a} {op} {b}?",
                 "answer": str(OPERATORS[op](a, b))}
                for i, (a, op, b) in enumerate(chosen)]

    return rows("train", triples[n_test:n_test + n_train]), rows("test", triples[:n_test])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="number of training problems")
    parser.add_argument("--test", type=int, default=200, help="number of test problems")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder that gets train/ and benchmarks/ (default: the committed files)")
    args = parser.parse_args()
    train, test = make_splits(args.seed, args.train, args.test)
    train_path = (args.out_dir or DATA_DIR) / "train" / "arith_train.jsonl"
    # the test set ships inside the package (eval/data), so an installed `distill` finds it
    test_path = args.out_dir / "benchmarks" / "arith_test.jsonl" if args.out_dir else \
        DATA_DIR.parent / "eval" / "data" / "arith_test.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(test_path, test)
    print(f"wrote {len(train)} problems to {train_path} and {len(test)} to {test_path}")


if __name__ == "__main__":
    main()

"""How far verify's LLM judge (eval/judge.py) agrees with the grader dev set's labels (data/grader_devset.jsonl): the
rows our rule-based grader labels incorrect or no_answer (the only rows the judge is asked about) go to a judge
with prompt v1, and its verdicts are tabled against the dev set's expected label (correct or not).

    .venv/bin/python scripts/judge_devset.py --model builtin:smollm2-135m-instruct [--limit 50]
    .venv/bin/python scripts/judge_devset.py --base-url http://localhost:8000/v1 --model NAME

The dev set has no problem text, so the prompt says "(not given)". Prints a markdown table and the change the
judge would make: rows it flips to correct that the dev set calls correct (fixed) or not (broken). Replies are
cached in --cache (default: a temporary directory), as the verify step caches them.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from eval.judge import JUDGED_LABELS, JudgeSettings, ask, judge_prompt, parse_verdict

DEVSET_PATH = Path(__file__).resolve().parent.parent / "data" / "grader_devset.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="judge model reference (local) or served model name")
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible server's API root")
    parser.add_argument("--limit", type=int, default=None, help="judge only every k-th eligible row, about this many")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=None, help="judge reply cache file (jsonl)")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from eval.grading_pool import grade_many
    from pipeline.core.compute_dtype import choose
    from pipeline.core.models import resolve_model

    rows = [json.loads(line) for line in DEVSET_PATH.read_text().splitlines() if line.strip()]
    grades = grade_many([r["completion"] for r in rows], [r["gold"] for r in rows], workers=2, timeout_s=10,
                        finish_reasons=[r.get("finish_reason") for r in rows])
    eligible = [i for i, grade in enumerate(grades) if grade.label in JUDGED_LABELS]
    if args.limit and len(eligible) > args.limit:
        step = len(eligible) / args.limit  # spread over the dev set's kinds and endings, deterministically
        eligible = [eligible[int(k * step)] for k in range(args.limit)]
    settings = JudgeSettings(model=args.model, base_url=args.base_url, max_tokens=args.max_tokens)
    prompts = [judge_prompt("v1", problem=None, gold=rows[i]["gold"], extracted=grades[i].extracted,
                            completion=rows[i]["completion"]) for i in eligible]
    cache = args.cache or Path(tempfile.mkdtemp()) / "judge.jsonl"
    started = time.perf_counter()
    replies, asked = ask(settings, prompts, cache, model_dir=resolve_model(args.model) if settings.local else None,
                         dtype=choose("auto").dtype if settings.local else "auto")
    seconds = time.perf_counter() - started

    table = Counter()
    for i, reply in zip(eligible, replies):
        verdict = parse_verdict(reply)
        table[("YES" if verdict else "NO" if verdict is not None else "unparsed",
               "correct" if rows[i]["expected"] == "correct" else "not correct")] += 1
    print(f"judge {settings.identity()}, prompt v1: {len(eligible)} of {len(rows)} dev-set rows eligible "
          f"(our grader: {dict(Counter(grades[i].label for i in eligible))}), {asked} asked in {seconds:.0f} s\n")
    print("| judge says | dev set: correct | dev set: not correct |\n|---|---|---|")
    for verdict in ("YES", "NO", "unparsed"):
        print(f"| {verdict} | {table[(verdict, 'correct')]} | {table[(verdict, 'not correct')]} |")
    parsed = sum(n for (verdict, _), n in table.items() if verdict != "unparsed")
    agree = table[("YES", "correct")] + table[("NO", "not correct")]
    print(f"\nagreement where parsed: {agree}/{parsed}" + (f" ({100 * agree / parsed:.1f}%)" if parsed else ""))
    print(f"with the judge, verify would fix {table[('YES', 'correct')]} row(s) and break "
          f"{table[('YES', 'not correct')]} (flipped to correct against the dev set)")
    examples = [reply for reply in replies if parse_verdict(reply) is None][:3]
    if examples:
        print("unparsed replies, e.g.: " + " | ".join(repr(r[:80]) for r in examples))


if __name__ == "__main__":
    main()

"""The grader's labelled dev set: answer kinds x gold forms x how a response ends, each row with the label a careful
reader gives it and a one-line reason. Deterministic: data/grader_devset.jsonl is this script's output.

    .venv/bin/python scripts/grader_devset.py            # rewrites data/grader_devset.jsonl
    .venv/bin/python scripts/grader_devset.py --score    # agreement of plain math-verify and eval.answers.grade

Each row: id, ending (how the response ends), kind (of answer), completion, gold, finish_reason, expected
(correct / incorrect / no_answer / truncated) and rationale. A label follows from the rule the ending stands for
(the last \\boxed wins; only text after </think> counts; unfinished thinking and finish_reason "length" only count
a box; a reply that stops mid-derivation or ends by restating the question has no answer, one whose final statement
restates the computation instead of its result is incorrect) and from whether the answer written is the gold's
value; the rows were also read by hand.

Scoring compares two graders with the expected labels. Plain math-verify is `verify(parse(gold),
parse(completion))` with default configs, as a user would call it; it only says correct or not, so agreement is
counted on correct vs not correct for both, overall and per ending and kind, and every disagreement is listed.
Ours is `eval.answers.grade`; its agreement on the four labels is reported too. A third column, math-verify with
the gold wrapped in $...$ (as ours parses golds), separates how much of plain math-verify's loss is its gold
parsing (raw MATH-500 golds often do not parse) from its reading of the response.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DEVSET_PATH = Path(__file__).resolve().parent.parent / "data" / "grader_devset.jsonl"


class Value(NamedTuple):
    """An answer as LaTeX and, where it has one, as plain text."""

    latex: str
    plain: str | None = None

    @property
    def inline(self) -> str:
        """As a sentence writes it: the plain text when there is one, else inline LaTeX."""
        return self.plain if self.plain is not None else f"${self.latex}$"


@dataclass(frozen=True)
class Answer:
    """One answer kind: its gold forms (the first is the benchmark's own), the right value and a wrong one, and for
    integers an unevaluated expression of the value as (plain, LaTeX): the task restated."""

    kind: str
    golds: tuple[str, ...]
    right: Value
    wrong: Value
    restated: tuple[str, str] | None = None
    # other values the gold's form decides, each with its label and why (rows with the core endings)
    variants: tuple[tuple[Value, str, str], ...] = ()


ANSWERS = [
    Answer("integer", ("64",), Value("64", "64"), Value("46", "46"), ("8 * 8", "8 \\cdot 8")),
    Answer("negative", ("-14",), Value("-14", "-14"), Value("14", "14"), ("16 - 30", "16 - 30")),
    Answer("thousands", ("2,125", "2125"), Value("2125", "2,125"), Value("2215", "2,215"),
           ("17 * 125", "17 \\times 125")),
    Answer("dollars", ("18",), Value("\\$18", "$18"), Value("\\$81", "$81"), ("3 * 6", "3 \\cdot 6")),
    Answer("fraction", ("\\frac{7}{4}", "\\dfrac{7}{4}", "7/4"), Value("\\frac{7}{4}", "7/4"),
           Value("\\frac{4}{7}", "4/7")),
    Answer("decimal", ("0.75", "\\frac{3}{4}"), Value("0.75", "0.75"), Value("0.57", "0.57")),
    Answer("percent", ("25\\%", "25"), Value("25\\%", "25%"), Value("52\\%", "52%")),
    Answer("radical", ("2\\sqrt{5}", "\\sqrt{20}"), Value("2\\sqrt{5}"), Value("5\\sqrt{2}")),
    Answer("pi", ("\\frac{3\\pi}{4}",), Value("\\frac{3\\pi}{4}"), Value("\\frac{4\\pi}{3}")),
    Answer("tuple", ("(2, -1, 2)", "\\left( 2, -1, 2 \\right)"), Value("(2, -1, 2)", "(2, -1, 2)"),
           Value("(2, 1, -2)", "(2, 1, -2)")),
    Answer("polar", ("\\left( 3, \\frac{\\pi}{2} \\right)",), Value("\\left(3, \\frac{\\pi}{2}\\right)"),
           Value("(3, \\pi)")),
    Answer("interval", ("[2, 5)", "x \\in [2,5)"), Value("[2, 5)"), Value("(2, 5]")),
    Answer("ray", ("(-\\infty, 0]",), Value("(-\\infty, 0]"), Value("(-\\infty, 0)")),
    Answer("union", ("(-\\infty, 2) \\cup (3, \\infty)",), Value("(-\\infty, 2) \\cup (3, \\infty)"), Value("(2, 3)")),
    Answer("product", ("(a+5)(b+2)",), Value("(a + 5)(b + 2)"), Value("(a + 2)(b + 5)")),
    Answer("polynomial", ("x^3+3x-6",), Value("x^3 + 3x - 6"), Value("x^3 - 3x + 6")),
    Answer("equation", ("y = 2x + 3",), Value("y = 2x + 3"), Value("y = 3x + 2")),
    Answer("plus_minus", ("1 \\pm \\sqrt{19}",), Value("1 \\pm \\sqrt{19}"), Value("1 \\pm \\sqrt{17}")),
    Answer("vector", ("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}",), Value("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}"),
           Value("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}")),
    Answer("direction", ("\\text{east}", "east"), Value("\\text{east}", "east"), Value("\\text{west}", "west")),
    Answer("name", ("\\text{Evelyn}",), Value("\\text{Evelyn}", "Evelyn"), Value("\\text{Navin}", "Navin")),
    Answer("choice", ("\\text{(C)}", "(C)"), Value("\\text{(C)}", "(C)"), Value("\\text{(B)}", "(B)")),
    Answer("ordinal", ("12",), Value("12^{\\mathrm{th}} \\text{ grade}", "12th grade"),
           Value("11^{\\mathrm{th}} \\text{ grade}", "11th grade")),
    Answer("area_units", ("864 \\mbox{ inches}^2", "864"), Value("864 \\text{ square inches}", "864 square inches"),
           Value("846 \\text{ square inches}", "846 square inches")),
    Answer("degrees", ("\\frac{270}7\\text{ degrees}",), Value("\\frac{270}{7}^\\circ", "270/7 degrees"),
           Value("\\frac{270}{11}^\\circ", "270/11 degrees")),
    Answer("money_units", ("5.4 \\text{ cents}",), Value("5.4 \\text{ cents}", "5.4 cents"),
           Value("4.5 \\text{ cents}", "4.5 cents")),
    # issue 27: a numeral in a base (MATH-500 golds such as 52_8, 4210_{5}) is its digits and its base
    Answer("base", ("1021_3", "1021_{3}", "\\text{1021}_3"), Value("1021_3", "1021_3"), Value("1012_3", "1012_3"),
           variants=((Value("1021_{3}"), "correct", "the same digits and base"),
                     (Value("\\text{1021}_3"), "correct", "the same digits and base"),
                     (Value("1021", "1021"), "correct", "the digits, read in the base the problem asked for"),
                     (Value("1021_4", "1021_4"), "incorrect", "the same digits in another base"),
                     (Value("34_{10}", "34_{10}"), "incorrect", "the same value in base 10, not in the base asked for"))),
    # issue 27: "Ax + By + Cz + D = 0 with A > 0 and gcd 1" (the gold's form: integer coefficients, gcd 1)
    Answer("normal_form", ("2x - 3y + z - 5 = 0",), Value("2x - 3y + z - 5 = 0"), Value("2x - 3y + z + 5 = 0"),
           variants=((Value("2x - 3y + z = 5"), "correct", "the same equation, its constant moved"),
                     (Value("-4x + 6y - 2z + 10 = 0"), "incorrect", "a multiple: not the gcd-1, A > 0 form"),
                     (Value("-2x + 3y - z + 5 = 0"), "incorrect", "the negation: A > 0 is the asked form"),
                     (Value("4x - 6y + 2z - 10 = 0"), "incorrect", "a multiple: not the gcd-1 form"))),
]
NUMERIC = ("integer", "negative", "thousands", "fraction", "decimal", "radical", "pi", "base")  # kinds that are a value
# A long derivation before a final statement ("after a long derivation": many numbers and equations, none the answer)
DERIVATION = "\n".join(f"Step {i}: {i} * {i + 3} = {i * (i + 3)}, and adding {2 * i} gives ${i * (i + 3) + 2 * i}$."
                       for i in range(1, 16))

# Reasoning a response writes before its final statement: numbers, equations and re-checks that are not the answer.
REASONING = [
    "Let me work through this step by step.\nThe two conditions give $3a + 2 = 11$, so $a = 3$.",
    ("We set up the count: 4 groups of 9 make 4 * 9 = 36 items, and 36 - 7 = 29 are left over.\n"
    "Wait, let me double check that. Yes, 29 + 7 = 36."),
    ("Let me compute the pieces separately. The first term is $\\frac{1}{2} \\cdot 8 = 4$ and the second is $5^2 = 25$."
    "\nHmm, so the sum of the pieces is 29, but that is not what is asked."),
    ("First, if $x = 2$ then $x^2 + 1 = 5$, which matches the condition.\n"
    "Let me re-check the other case: \\(x = -2\\) also gives 5, so both work."),
]

REASONS = {"correct": "the answer given is the gold's value", "incorrect": "the answer given is not the gold's value"}


@dataclass(frozen=True)
class Ending:
    """How a response ends: a str.format template with {reasoning}, {given} (the Value the response gives: the right
    or the wrong one), {other} (the opposite one) and {answer} (the Answer). `label` is fixed for endings whose label
    does not depend on the value written; else correct for the right value and incorrect for the wrong one."""

    name: str
    template: str
    rationale: str
    label: str | None = None
    finish_reason: str = "stop"
    both_values: bool = False  # right and wrong rows; otherwise one, alternating between kinds
    kinds: tuple[str, ...] = ()  # only these answer kinds (a template that reads naturally only for them); () all

    def write(self, answer: Answer, reasoning: str, given: Value, other: Value) -> str | None:
        """The completion, or None when the answer has no plain form or restatement the template needs."""
        if "given.plain" in self.template and given.plain is None or (
                "answer.restated" in self.template and answer.restated is None) or (
                self.kinds and answer.kind not in self.kinds):
            return None
        return self.template.format(reasoning=reasoning, given=given, other=other, answer=answer,
                                    derivation=DERIVATION)


ENDINGS = [
    Ending("boxed", "{reasoning}\n\nTherefore, the answer is $\\boxed{{{given.latex}}}$.", "", both_values=True),
    Ending("boxed_then_check", "{reasoning}\n\nSo the answer is \\boxed{{{given.latex}}}.\n\nLet me verify once more: "
           "2 + 2 = 4 and 4 \\cdot 3 = 12, which is consistent.",
           "the last box is the answer; the check after it is not"),
    Ending("think_then_boxed", "<think>\n{reasoning}\nMaybe it is \\boxed{{{other.latex}}}? No, let me redo it."
           "\n</think>\n\nThe answer is \\boxed{{{given.latex}}}.", "only the box after </think> counts",
           both_values=True),
    Ending("think_then_prose", "<think>\n{reasoning}\nThe answer is probably {other.inline}.\n</think>\n\n"
           "So, the final answer is \\( {given.latex} \\).", "only the statement after </think> counts"),
    Ending("prose_number", "{reasoning}\n\nTherefore, the minimum value of the given expression is {given.plain}.",
           "no box: the final statement's value", both_values=True),
    Ending("prose_paren", "{reasoning}\n\nSo, the final answer is \\( {given.latex} \\).",
           "no box: the final statement's math", both_values=True),
    Ending("prose_indeed", "{reasoning}\n\nTherefore, the value of \\( b \\) is indeed \\( {given.latex} \\).",
           "no box: the final statement's last math"),
    Ending("dollar_period", "{reasoning}\n\nThe final answer is ${given.latex}.$",
           "the period inside the math ends the sentence", both_values=True),
    Ending("dollar_comma", "{reasoning}\n\nWe conclude that the answer is ${given.latex},$ as claimed.",
           "the comma inside the math ends the clause"),
    Ending("display", "{reasoning}\n\nHence the result is\n\\[\n{given.latex}\n\\]", "no box: the final display math"),
    Ending("minerva", "{reasoning}\n\nFinal Answer: The final answer is ${given.latex}$. I hope it is correct.",
           "Minerva format: the final answer statement"),
    Ending("markdown", "{reasoning}\n\n**Answer:** {given.inline}", "the answer line"),
    Ending("earlier_guess", "{reasoning}\nAt first I got {other.inline}, but that used the wrong sign.\n\n"
           "So the answer is \\( {given.latex} \\).", "the final statement, not the earlier guess"),
    Ending("final_answer_no_period", "{reasoning}\n\nso the final answer is {given.plain}",
           "plain final statement without a period", both_values=True),
    Ending("prose_no_cue", "{reasoning}\n\nSo after all the turns he ends up with {given.plain}.",
           "the final sentence states the value in plain words"),
    Ending("check_after_answer", "{reasoning}\n\nTherefore, the answer is {given.inline}.\n\nLet me verify: plugging "
           "it back in, 2 \\cdot 4 + 3 = 11, which matches.",
           "the answer statement, not the numbers of the check after it"),
    Ending("signoff_no_period", "{reasoning}\n\nSo the result is {given.inline}.\nLet me know if you have any other "
           "questions", "the last statement's value; the sign-off lacks only its period"),
    Ending("unfinished_think_boxed", "<think>\n{reasoning}\nSo the answer is \\boxed{{{given.latex}}}. Let me "
           "double-check the", "cut at the token limit, but a box counts", finish_reason="length"),
    Ending("length_cut_boxed", "{reasoning}\nA first attempt gives \\boxed{{{given.latex}}}. Wait, let me re-check the "
           "second case, where", "cut at the token limit, but a box counts", finish_reason="length"),
    Ending("unfinished_think", "<think>\n{reasoning}\nSo the answer should be {given.inline}.",
           "<think> never closed and no box: unfinished reasoning is not an answer", label="no_answer"),
    Ending("length_cut", "{reasoning}\nSo far this gives {given.inline}, and now I need to add the remaining",
           "cut at the token limit with no box", label="truncated", finish_reason="length"),
    Ending("mid_equation", "{reasoning}\nSo the value is {given.inline}.\nSubstituting this back into the second "
           "equation, we get $3y + 2 = ", "stops mid-equation after the value: no final statement",
           label="no_answer"),
    Ending("mid_equation_plain", "{reasoning}\nThis gives {given.inline}.\nThen the remaining part is 7 * 3 + ",
           "stops on an operator: no final statement", label="no_answer"),
    Ending("mid_sentence", "{reasoning}\nSo the value is {given.inline}.\nNow we need to check whether this also "
           "satisfies the second condition, which says that the",
           "stops mid-sentence after the value: no final statement", label="no_answer"),
    Ending("restated_plain", "{reasoning}\n\nSo the answer is {answer.restated[0]}.",
           "the final statement restates the computation, not its result", label="incorrect"),
    Ending("restated_question", "{reasoning}\n\nSo the question asks: what is {answer.restated[0]}?",
           "ends by restating the question: no answer given", label="no_answer"),
    Ending("restated_latex", "{reasoning}\n\nSo we need to compute ${answer.restated[1]}$.",
           "ends by restating the task: no result given", label="no_answer"),
    Ending("no_answer", "I am not sure how to solve this problem.", "no answer at all", label="no_answer"),
    # issue 27's kinds
    Ending("operands_after", "{reasoning}\n\nSo {given.inline} is the sum of the two cases, 29 and 35.",
           "the value the sentence states, not the operands named after it", both_values=True, kinds=NUMERIC),
    Ending("operands_after_comma", "{reasoning}\n\nThus the total is {given.inline}, which is the product of 8 and 8.",
           "the value the sentence states, not the operands named after it", both_values=True, kinds=NUMERIC),
    Ending("operands_then_result", "{reasoning}\n\nThe answer is the sum of 29 and 35, which is {given.inline}.",
           "the result after the operands the answer statement names first", both_values=True, kinds=NUMERIC),
    Ending("signoff_long", "{reasoning}\n{derivation}\n\nSo, the answer is {given.inline}. I think that's right.",
           "the answer statement after a long derivation, not the derivation's numbers", both_values=True),
    Ending("signoff_long_no_period", "{reasoning}\n{derivation}\n\nSo, the answer is {given.inline}. I think that's "
           "right", "the answer statement; the sign-off lacks only its period", both_values=True),
    Ending("display_final_result", "{reasoning}\n\nThe final result is:\n\\[ S = {given.latex} \\]",
           "the right-hand side of the last display equation", both_values=True, kinds=NUMERIC),
    Ending("display_bare_last", "{reasoning}\n$$S = {given.latex}$$",
           "a bare last display equation: its right-hand side", both_values=True, kinds=NUMERIC),
    Ending("cut_in_final_box", "{reasoning}\nSo x = \\boxed{{{given.latex}}} for the first part, and the final answer "
           "is \\boxed{{\\frac{{", "cut at the token limit inside the final box: the box before it was a step",
           label="truncated", finish_reason="length"),
    Ending("length_cut_after_box", "<think>\n{reasoning}\nSo the intermediate value is \\boxed{{{given.latex}}}. Let "
           "me re-check this.\nThen 12 * 7 = 84 and 84 - 3 = 81, so the", "cut at the token limit while computing on "
           "from an intermediate box", label="truncated", finish_reason="length"),
    Ending("expression_under_way", "{reasoning}\nNow we add the remaining part: 34 + {given.plain}",
           "stops while writing an expression: its last number is an operand, not a result", label="no_answer",
           kinds=("integer", "thousands", "fraction", "decimal")),
]
CORE_ENDINGS = ("boxed", "prose_paren", "dollar_period", "final_answer_no_period")  # for the other gold forms


def devset_rows() -> list[dict]:
    """Every row, in a fixed order: for each answer kind, all endings with its first gold form, and the core endings
    with each other gold form (with the right value)."""
    rows = []
    for kind_index, answer in enumerate(ANSWERS):
        for gold_index, gold in enumerate(answer.golds):
            for ending_index, ending in enumerate(ENDINGS):
                if gold_index and ending.name not in CORE_ENDINGS:
                    continue
                if gold_index or ending.label:
                    values = ["right"]
                elif ending.both_values:
                    values = ["right", "wrong"]
                else:
                    values = [("right", "wrong")[(kind_index + ending_index) % 2]]
                for value in values:
                    given, other = (answer.right, answer.wrong) if value == "right" else (answer.wrong, answer.right)
                    reasoning = REASONING[(kind_index + ending_index + gold_index) % len(REASONING)]
                    completion = ending.write(answer, reasoning, given, other)
                    if completion is None:
                        continue
                    label = ending.label or ("correct" if value == "right" else "incorrect")
                    rationale = ending.rationale if ending.label else "; ".join(
                        filter(None, [ending.rationale, REASONS[label]]))
                    rows.append({"id": f"{answer.kind}-g{gold_index}-{ending.name}-{value}", "ending": ending.name,
                                 "kind": answer.kind, "completion": completion, "gold": gold,
                                 "finish_reason": ending.finish_reason, "expected": label, "rationale": rationale})
        for variant_index, (given, label, reason) in enumerate(answer.variants):
            for ending in (e for e in ENDINGS if e.name in CORE_ENDINGS):
                completion = ending.write(answer, REASONING[variant_index % len(REASONING)], given, answer.right)
                if completion is not None:
                    rows.append({"id": f"{answer.kind}-g0-{ending.name}-variant{variant_index}", "ending": ending.name,
                                 "kind": answer.kind, "completion": completion, "gold": answer.golds[0],
                                 "finish_reason": ending.finish_reason, "expected": label,
                                 "rationale": f"{ending.rationale}; {reason}".lstrip("; ")})
    return rows


def devset_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def score(rows: list[dict]) -> list[dict]:
    """Each row's verdicts: plain math-verify's (correct or not, with the gold raw and in $...$) and ours' label."""
    from math_verify import parse, verify

    from eval.answers import grade

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verdicts = []
    for row in rows:
        prediction = parse(row["completion"])
        ours = grade(row["completion"], row["gold"], finish_reason=row["finish_reason"])
        verdicts.append({"plain": bool(verify(parse(row["gold"]), prediction)),
                         "plain_wrapped": bool(verify(parse(f"${row['gold']}$"), prediction)),
                         "ours": ours.label, "ours_extracted": ours.extracted})
    return verdicts


def agreement(rows: list[dict], verdicts: list[dict]) -> dict[str, float]:
    """Fractions of rows where each grader agrees with the expected label: correct vs not for all three, and ours on
    the four labels."""
    expected = [row["expected"] == "correct" for row in rows]
    return {
        "plain": _fraction(e == v["plain"] for e, v in zip(expected, verdicts)),
        "plain_wrapped": _fraction(e == v["plain_wrapped"] for e, v in zip(expected, verdicts)),
        "ours": _fraction(e == (v["ours"] == "correct") for e, v in zip(expected, verdicts)),
        "ours_labels": _fraction(row["expected"] == v["ours"] for row, v in zip(rows, verdicts)),
    }


def _fraction(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits)


def report(rows: list[dict], verdicts: list[dict]) -> None:
    """Agreement overall, per ending and per kind (markdown tables), then every row either grader gets wrong."""
    columns = ("plain", "plain_wrapped", "ours", "ours_labels")
    print(f"{len(rows)} rows; agreement with the expected label (correct vs not; ours_labels: all four labels)\n")
    for field in ("all", "ending", "kind"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups["all" if field == "all" else row[field]].append(i)
        print(f"| {field} | rows | " + " | ".join(columns) + " |")
        print("|---|---:|" + "---:|" * len(columns))
        for name, indices in groups.items():
            shares = agreement([rows[i] for i in indices], [verdicts[i] for i in indices])
            print(f"| {name} | {len(indices)} | " + " | ".join(f"{shares[c]:.3f}" for c in columns) + " |")
        print()
    for grader in ("ours", "plain"):
        wrong = [(row, v) for row, v in zip(rows, verdicts)
                 if (row["expected"] == "correct") != (v["ours"] == "correct" if grader == "ours" else v["plain"])]
        print(f"{grader} disagrees (correct vs not) on {len(wrong)} rows:")
        for row, v in wrong:
            got = v["ours"] + f" ({v['ours_extracted']!r})" if grader == "ours" else v["plain"]
            print(f"  {row['id']}: expected {row['expected']}, got {got}")
        print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score", action="store_true", help="grade the set and report agreement (writes nothing)")
    parser.add_argument("--out", type=Path, default=DEVSET_PATH, help="where to write the set")
    args = parser.parse_args(argv)
    rows = devset_rows()
    if args.score:
        report(rows, score(rows))
    else:
        args.out.write_text(devset_jsonl(rows))
        print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()

"""Preloaded by the grading pool's fork server (eval.grading_pool): importing it grades a fixed set of answer shapes
once.

A fresh process pays ~0.5 s the first time it grades: sympy imports whole packages on first use (physics.units,
tensor), and its caches and the LaTeX parser's decision tables start cold. Every worker forked from a server that
has done this starts warm, so two workers do not each pay it, and a replacement for a killed worker is ready at once.
The answers are generic shapes (not benchmark data): each is graded against itself and against a different one.
"""

from __future__ import annotations

import gc

ANSWER_SHAPES = [
    "42", "-7", "0", "2,125", "3.14", "0.5", "12\\%", "\\$5.00", "10^\\circ", "1.5 \\times 10^{3}",
    "\\frac{1}{2}", "-\\frac{3}{4}", "\\dfrac{5}{9}", "\\tfrac{7}{2}", "\\frac{\\sqrt{3}}{2}", "2\\sqrt{5}",
    "\\sqrt[3]{2}", "\\pi", "\\frac{3\\pi}{4}", "4 - 2\\sqrt{2}", "e^{2}", "\\log_2 8", "\\ln 3", "\\sin 30^\\circ",
    "\\cos^2 x", "\\tan \\frac{\\pi}{8}", "5!", "\\binom{6}{2}", "1011_2", "3 + 4i", "|x - 1|",
    "x^2 + 2x + 1", "(x+1)(x-2)", "\\frac{x+1}{x-1}", "y = 2x + 3", "x \\geq 2", "-2 < x < 3",
    "(1, 2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "[0, 1)", "(-\\infty, 3]", "(-\\infty, -1) \\cup (2, \\infty)",
    "\\{1, 2, 3\\}", "1, 2, 3", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
    "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
    "\\text{(A)}", "\\textbf{(C)}", "\\text{Monday}", "\\infty",
]


def _warm_up() -> None:
    import logging

    from eval.answers import grade

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning
    for k, answer in enumerate(ANSWER_SHAPES):
        other = ANSWER_SHAPES[(k + 1) % len(ANSWER_SHAPES)]
        for gold in (answer, other):
            try:
                grade(f"So the answer is \\boxed{{{answer}}}.", gold)
            except Exception:  # a warm-up that fails only leaves the workers cold; grading itself reports errors
                pass
        grade(f"The total is {k} + 1 = {k + 1}.\nSo the answer is {k + 1}.", str(k + 1))


_warm_up()
# what the server holds now lives as long as it does: moved out of the collector's reach, so that collections in
# the forked workers do not write to (and so copy) the pages they share with it
gc.freeze()

"""Labels without gold: the majority answer of a problem's samples, for `verify` with `label: majority`
(NeMo-Skills' majority labelling: the most common answer, accepted above a minimum number and share of votes).

Per problem (its samples share an `id`):
1. Each sample's answer is read by the grader's own extraction (eval.answers: the last box, else the answer
   statement, ...), in the grading pool under its time limit (`read_answers`). A sample with no answer (no_answer,
   truncated) or whose reading ran out of time or raised casts no vote.
2. The answers are grouped by math-verify equivalence (eval.answers.answer_groups, in the grading pool: a grouping
   over its time limit falls back to exact text), so `1/2`, `0.5` and `\\frac{1}{2}` are one vote.
3. `vote` picks the group with the most votes. It is accepted when it has at least `min_votes` votes and at least
   `min_share` of the problem's votes (samples with an answer), and no other group has as many: a tie for the
   most votes is no majority (maj@k in eval.metrics must pick one to score; a label must not be a coin toss).
   The accepted answer is the group's most common text (its first, among equals); the runner-up is the next
   group by votes.
The caller then grades every sample against the accepted answer as if it were the gold (so `correct` means "agrees
with the majority"), and labels the samples of a refused problem `no_majority` (ungraded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from eval.answers import Grade

# The gold `read_answers` grades against: it always parses and costs nothing, and `grade` reads the completion's
# answer (Grade.extracted) whatever the gold; the label only says whether it found one.
PLACEHOLDER_GOLD = "0"
VOTING_LABELS = ("correct", "incorrect")  # against the placeholder: the labels of a sample with an answer
REFUSALS = ("no_answers", "tie", "too_few_votes", "low_share")  # why a problem has no majority


@dataclass(frozen=True)
class Vote:
    """One problem's vote. `answer` is None when refused (`refused` says why, one of REFUSALS; "" when accepted);
    the shares are of the problem's samples with an answer (`voters`), None when it has none."""

    answer: str | None
    share: float | None
    votes: int
    voters: int
    runner_up: str | None
    runner_up_share: float | None
    refused: str
    candidate: str | None  # the top group's answer, accepted or not (for the manifest's list of refusals)


def read_answers(completions: Sequence[str | None], finish_reasons: Sequence[str | None] | None, *, workers: int,
                 timeout_s: float, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[int, Grade]]:
    """Yield (index, Grade) with each completion's answer in `extracted` ("" when it has none), read in the grading
    pool under `timeout_s`; a Grade whose label is in VOTING_LABELS has an answer."""
    from eval.grading_pool import iter_grades

    return iter_grades(completions, _Repeated(PLACEHOLDER_GOLD, len(completions)), workers=workers,
                       timeout_s=timeout_s, finish_reasons=finish_reasons, skip=skip)


def vote_all(answers: Sequence[Sequence[str]], *, min_votes: int, min_share: float, workers: int,
             timeout_s: float) -> list[Vote]:
    """The vote of each problem, `answers[p]` being problem p's samples' answers ("" for none)."""
    from eval.grading_pool import iter_answer_groups
    from eval.metrics import text_groups

    groups: list[list[int] | None] = [None] * len(answers)
    for index, problem_groups in iter_answer_groups(answers, workers=workers, timeout_s=timeout_s):
        groups[index] = problem_groups
    return [vote(problem_answers, problem_groups or text_groups(problem_answers), min_votes=min_votes,
                 min_share=min_share)
            for problem_answers, problem_groups in zip(answers, groups)]


def vote(answers: Sequence[str], groups: Sequence[int], *, min_votes: int, min_share: float) -> Vote:
    """One problem's vote from its answers and their groups (-1: no answer, no vote); see the module docstring."""
    votes = Counter(g for g in groups if g >= 0)
    voters = sum(votes.values())
    if not voters:
        return Vote(None, None, 0, 0, None, None, "no_answers", None)
    # most votes first; among equals the group seen first (group numbers follow first appearance)
    ranked = sorted(votes, key=lambda g: (-votes[g], g))
    top = ranked[0]
    candidate, share = _answer_of(answers, groups, top), votes[top] / voters
    runner_up = ranked[1] if len(ranked) > 1 else None
    runner_up_answer = _answer_of(answers, groups, runner_up) if runner_up is not None else None
    runner_up_share = votes[runner_up] / voters if runner_up is not None else None
    if runner_up is not None and votes[runner_up] == votes[top]:
        refused = "tie"
    elif votes[top] < min_votes:
        refused = "too_few_votes"
    elif share < min_share:
        refused = "low_share"
    else:
        refused = ""
    return Vote(None if refused else candidate, share, votes[top], voters, runner_up_answer, runner_up_share,
                refused, candidate)


def majority_columns(votes: Sequence[Vote], codes) -> dict:
    """The dataset columns of each row's problem's vote, name -> (Arrow array, datasets feature): majority_answer
    (null when refused), majority_share, runner_up_answer, runner_up_share (the shares as measured, refused or not;
    null without answers). `codes`: each row's problem number."""
    import pyarrow as pa
    from datasets import Value

    columns = {}
    for name, value, kind in (("majority_answer", lambda v: v.answer, "string"),
                              ("majority_share", lambda v: v.share, "float64"),
                              ("runner_up_answer", lambda v: v.runner_up, "string"),
                              ("runner_up_share", lambda v: v.runner_up_share, "float64")):
        per_problem = [value(v) for v in votes]
        # typed: a column of nothing but nulls must still read as its type
        columns[name] = (pa.array([per_problem[code] for code in codes], type=pa.type_for_alias(kind)), Value(kind))
    return columns


def majority_stats(votes: Sequence[Vote], problem_ids: Sequence[str]) -> dict:
    """The manifest's counts: problems accepted, refused by reason, and every refused problem with why."""
    refused = [(problem_ids[p], v) for p, v in enumerate(votes) if v.refused]
    return {"majority_accepted": len(votes) - len(refused),
            **{f"majority_refused_{reason}": sum(v.refused == reason for _, v in refused) for reason in REFUSALS},
            # with its top answer and votes: a person decides whether to relax the thresholds
            "no_majority_ids": [{"id": pid, "why": v.refused, "top_answer": v.candidate, "votes": v.votes,
                                 "voters": v.voters} for pid, v in refused]}


def _answer_of(answers: Sequence[str], groups: Sequence[int], group: int) -> str:
    """A group's most common answer text (the first written, among equals)."""
    texts = Counter(a for a, g in zip(answers, groups) if g == group)
    return max(texts, key=lambda text: texts[text])  # max keeps the first of equal counts; Counter keeps order


class _Repeated(Sequence):
    """`value`, `length` times, without a list of it."""

    def __init__(self, value, length: int):
        self._value, self._length = value, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._value] * len(range(*index.indices(self._length)))
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._value

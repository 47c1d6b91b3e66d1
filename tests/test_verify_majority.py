"""verify's `label: majority` (labels without gold) on hand-made rows: equivalent answers vote together, ties and the
min_votes / min_share thresholds refuse a problem (ungraded, no_majority, listed), the runner-up is kept, and the
`answer` column is not needed; and the published_correct confusion table."""

import pytest
from pydantic import ValidationError

from eval.majority import vote
from pipeline.core.keys import keyed_config
from pipeline.steps import verify
from tests.step_runner import run_on_rows


def rows_of(problems: dict[str, list[str]], **extra) -> list[dict]:
    return [{"id": pid, "sample_idx": k, "completion": completion, **extra}
            for pid, completions in problems.items() for k, completion in enumerate(completions)]


PROBLEMS = {
    # 1/2 in three forms votes as one group of 3 out of 4: accepted; 2 is the runner-up
    "half": ["\\boxed{\\frac{1}{2}}", "The answer is 1/2.", "\\boxed{0.5}", "\\boxed{2}"],
    "tie": ["\\boxed{3}", "\\boxed{4}", "\\boxed{3}", "\\boxed{4}"],  # 2 against 2: no majority
    "spread": ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{5}"],  # 2 of 5 < 0.5
    "alone": ["\\boxed{7}", "I do not know."],  # 1 vote < min_votes 2 (no_answer casts no vote)
    "silent": ["no idea", "none"],  # nothing to vote with
}


def test_majority_labels_shares_runner_up_and_refusals(tmp_path):
    artifact, graded = run_on_rows(verify, tmp_path, rows_of(PROBLEMS), uses="verify", label="majority",
                                   timeout_s=30)
    by_id = {}
    for row in graded:
        by_id.setdefault(row["id"], []).append(row)
    half = by_id["half"]
    assert [r["label"] for r in half] == ["correct", "correct", "correct", "incorrect"]
    assert [r["correct"] for r in half] == [True, True, True, False]
    assert {r["majority_answer"] for r in half} == {"\\frac{1}{2}"}
    assert half[0]["majority_share"] == pytest.approx(0.75) and half[0]["pass_rate"] == pytest.approx(0.75)
    assert (half[0]["runner_up_answer"], half[0]["runner_up_share"]) == ("2", pytest.approx(0.25))
    for pid in ("tie", "spread", "alone", "silent"):  # refused: ungraded, no pass rate, no accepted answer
        assert {r["label"] for r in by_id[pid]} == {"no_majority"}, pid
        assert all(r["pass_rate"] is None and r["majority_answer"] is None and not r["correct"] for r in by_id[pid])
    assert by_id["tie"][0]["majority_share"] == 0.5 and by_id["tie"][0]["runner_up_answer"] == "4"
    assert by_id["spread"][0]["majority_share"] == pytest.approx(0.4)
    assert by_id["silent"][0]["majority_share"] is None
    assert by_id["tie"][0]["extracted"] == "3"  # a refused row still shows the answer it voted with
    stats = artifact.stats
    assert (stats["majority_accepted"], stats["problems_graded"], stats["problems_ungraded_no_majority"]) == (1, 1, 4)
    assert [stats[f"majority_refused_{why}"] for why in ("no_answers", "tie", "too_few_votes", "low_share")] == [
        1, 1, 1, 1]
    assert {e["id"]: e["why"] for e in stats["no_majority_ids"]} == {
        "tie": "tie", "spread": "low_share", "alone": "too_few_votes", "silent": "no_answers"}
    assert stats["label_no_majority"] == 13


def test_thresholds_move_the_decision_and_the_gold_column_is_ignored(tmp_path):
    # a wrong gold in the answer column changes nothing: majority mode reads the samples only
    rows = rows_of({"spread": PROBLEMS["spread"]}, answer="999")
    _, strict = run_on_rows(verify, tmp_path / "a", rows, uses="verify", label="majority", timeout_s=30)
    assert set(strict["label"]) == {"no_majority"}
    _, lenient = run_on_rows(verify, tmp_path / "b", rows, uses="verify", label="majority", min_share=0.4,
                             timeout_s=30)
    assert lenient["label"] == ["correct", "correct", "incorrect", "incorrect", "incorrect"]
    assert lenient["majority_answer"][0] == "1" and lenient["runner_up_share"][0] == pytest.approx(0.2)
    _, few = run_on_rows(verify, tmp_path / "c", rows, uses="verify", label="majority", min_share=0.4,
                         min_votes=3, timeout_s=30)
    assert set(few["label"]) == {"no_majority"}


def test_vote_rules():
    # group numbers as eval.answers.answer_groups gives them; -1 casts no vote
    accepted = vote(["1/2", "\\frac{1}{2}", "\\frac{1}{2}", "3", ""], [0, 0, 0, 1, -1], min_votes=2, min_share=0.5)
    assert (accepted.answer, accepted.share, accepted.votes, accepted.voters) == ("\\frac{1}{2}", 0.75, 3, 4)
    assert (accepted.runner_up, accepted.runner_up_share, accepted.refused) == ("3", 0.25, "")
    assert vote(["5"], [0], min_votes=1, min_share=1.0).answer == "5"
    three_way = vote(["1", "1", "2", "2", "3"], [0, 0, 1, 1, 2], min_votes=1, min_share=0.1)
    assert (three_way.refused, three_way.candidate, three_way.runner_up) == ("tie", "1", "2")


def test_new_settings_leave_existing_keys_and_refuse_misuse():
    assert set(keyed_config(verify.Config(uses="verify", input="s"))) == {
        "uses", "input", "seed", "workers", "timeout_s", "gold_is_latex", "think_prefix", "audit"}
    assert keyed_config(verify.Config(uses="verify", input="s", label="majority"))["label"] == "majority"
    with pytest.raises(ValidationError, match="settings of label: majority"):
        verify.Config(uses="verify", input="s", min_votes=3)
    with pytest.raises(ValidationError, match="gold_is_latex"):
        verify.Config(uses="verify", input="s", label="majority", gold_is_latex=True)


def test_published_correct_confusion_table(tmp_path):
    rows = [{"id": "p", "answer": "12", "completion": c, "published_correct": flag} for c, flag in [
        ("\\boxed{12}", True), ("\\boxed{12}", False), ("\\boxed{13}", False), ("\\boxed{13}", True),
        ("\\boxed{13}", False), ("\\boxed{13}", None)]]
    rows.append({"id": "q", "answer": "", "completion": "\\boxed{1}", "published_correct": True})  # bad_gold
    artifact, _ = run_on_rows(verify, tmp_path, rows, uses="verify", timeout_s=30)
    table = artifact.stats["published_agreement"]
    assert table["correct"] == {"true": 1, "false": 1, "null": 0}
    assert table["incorrect"] == {"true": 1, "false": 2, "null": 1}
    assert table["ungraded"] == {"true": 1, "false": 0, "null": 0}
    assert (table["compared"], table["agreement"]) == (5, pytest.approx(3 / 5))

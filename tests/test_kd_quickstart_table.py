"""scripts/kd_quickstart_table.py on hand-made results.json files of three seeds: the per-seed differences with
their intervals (computed from per-problem counts, or as a run recorded them), and the pooled paired difference."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT, KD, TAID = "step:sft_merged", "step:kd_merged", "step:taid_merged"


def _script():
    spec = importlib.util.spec_from_file_location("kd_quickstart_table", REPO / "scripts" / "kd_quickstart_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_seed(workdir: Path, seed: int, counts: dict, comparisons: dict | None = None) -> None:
    """An evaluate step's results.json and manifest in workdir/report: per model, per problem (correct, graded)."""
    models = {}
    for model, per_problem in counts.items():
        rates = [c / g for c, g in per_problem]
        models[model] = {"b": {"pass@1": sum(rates) / len(rates),
                               "per_problem": {f"p{i}": list(c) for i, c in enumerate(per_problem)}}}
    step = workdir / "report"
    step.mkdir(parents=True)
    document = {"models": models, "meta": {"seed": seed, "baseline": "builtin:base"}}
    if comparisons:
        document["comparisons"] = {"b": comparisons}
    (step / "results.json").write_text(json.dumps(document))
    (step / "manifest.json").write_text(json.dumps({"step": "report"}))


def test_table_over_three_seeds_by_hand(tmp_path, capsys):
    # two problems x 4 samples. Seeds 0 and 1: every problem moves by the same amount, so each bootstrap interval
    # is that one value. Seed 2 recorded its comparisons against the SFT student: they are taken as written.
    _write_seed(tmp_path / "s0", 0, {"builtin:base": [(0, 4), (0, 4)], SFT: [(2, 4), (1, 4)],
                                     KD: [(4, 4), (3, 4)], TAID: [(1, 4), (0, 4)]})
    _write_seed(tmp_path / "s1", 1, {"builtin:base": [(0, 4), (1, 4)], SFT: [(1, 4), (1, 4)],
                                     KD: [(2, 4), (2, 4)], TAID: [(0, 4), (0, 4)]})
    recorded = {KD: {"baseline": SFT, "difference": 0.0, "ci95": [-0.125, 0.125], "detectable": False},
                TAID: {"baseline": SFT, "difference": -0.25, "ci95": [-0.25, -0.25], "detectable": True}}
    _write_seed(tmp_path / "s2", 2, {"builtin:base": [(1, 4), (0, 4)], SFT: [(2, 4), (2, 4)],
                                     KD: [(2, 4), (2, 4)], TAID: [(1, 4), (1, 4)]}, recorded)
    assert _script().main([str(tmp_path / f"s{seed}") for seed in range(3)]) == 0
    table = capsys.readouterr().out
    # pass@1: SFT .375 / .25 / .5, mean 37.5, sd 12.5; pooled per problem 5/12, 4/12 -> 37.5 ± 4.2
    assert "| student: LoRA SFT on the teacher's correct traces | 37.5 / 25.0 / 50.0 | 37.5 ± 12.5 | 37.5 ± 4.2 |" \
        in table
    # KD - SFT: +.5, +.25, 0 (recorded, with its interval); pooled per problem 8/12 - 5/12 and 7/12 - 4/12 = +.25
    assert ("| KD − SFT | +50.0 [+50.0, +50.0] / +25.0 [+25.0, +25.0] / +0.0 [−12.5, +12.5] | +25.0 ± 25.0 | 2/3, 2/3 "
            "| +25.0 ± 0.0 [+25.0, +25.0], above 0 |") in table
    # TAID - SFT: -.25 in every seed; pooled 2/12 - 5/12 and 1/12 - 4/12 = -.25: said plainly
    assert ("| TAID − SFT | −25.0 [−25.0, −25.0] / −25.0 [−25.0, −25.0] / −25.0 [−25.0, −25.0] | −25.0 ± 0.0 | 0/3, 3/3 "
            "| −25.0 ± 0.0 [−25.0, −25.0], below 0 |") in table
    assert "base − SFT" in table and "Runs: seed 0" in table


def test_an_interval_across_zero_is_no_detectable_difference():
    script = _script()
    assert script.verdict([-0.01, 0.02]) == "no detectable difference"
    assert script.verdict([0.01, 0.02]) == "above 0" and script.verdict([-0.02, -0.01]) == "below 0"


def test_missing_workdir_or_evaluation_is_bad_input(tmp_path, capsys):
    script = _script()
    assert script.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    _write_seed(tmp_path / "s0", 0, {SFT: [(1, 2)], KD: [(2, 2)]})
    assert script.main([str(tmp_path / "s0"), "--evaluation", "other"]) == 2
    assert "no evaluation 'other'" in capsys.readouterr().err

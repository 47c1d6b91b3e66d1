"""The teacher-hacking monitor (pipeline.training.monitor): the alarm and the power-law diagnostic on constructed
histories, the held-out split, and a tiny kd run (builtin:tiny-random) that logs the checks, keeps the held-out rows
out of training and shows them on the run page."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset, Features, Value

from pipeline.commands.run_report.curves import training_curves
from pipeline.commands.run_report.step_views import StepView
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.keys import keyed_config
from pipeline.steps import kd
from pipeline.text import teacher_logprobs as stored
from pipeline.training.monitor import MonitorSettings, alarm_text, power_law_departure, split_holdout, teacher_hacking
from tests.test_kd import K, student_identity


def history(train, passed):
    return [{"step": 10 * (i + 1), "train_divergence": d, "pass_rate": p} for i, (d, p) in enumerate(zip(train, passed))]


def test_the_alarm_fires_at_the_mth_consecutive_falling_check():
    checks = history([1.0, 0.9, 0.8, 0.7, 0.6], [0.5, 0.6, 0.5, 0.4, 0.3])
    alarm = teacher_hacking(checks, consecutive=3)
    # falls at checks 3, 4, 5 (check 2's pass rate rose): the 3rd falling check is the 5th, step 50
    assert alarm == {"suspected": True, "step": 50, "from_step": 20, "train_divergence": [0.9, 0.6],
                     "pass_rate": [0.6, 0.3], "consecutive": 3}
    assert teacher_hacking(checks[:4], consecutive=3) is None  # only two falling checks yet
    assert teacher_hacking(checks, consecutive=2)["step"] == 40
    assert "teacher hacking suspected at step 50" in alarm_text(alarm)


def test_no_alarm_when_the_pass_rate_recovers_or_the_divergence_rises():
    recovers = history([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], [0.6, 0.5, 0.4, 0.45, 0.4, 0.35])
    assert teacher_hacking(recovers, consecutive=3) is None
    rises = history([1.0, 0.9, 0.8, 0.85, 0.8, 0.7], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert teacher_hacking(rises, consecutive=3) is None
    flat = history([1.0, 0.9, 0.8, 0.7], [0.5, 0.5, 0.5, 0.5])  # a steady pass rate is not a fall
    assert teacher_hacking(flat, consecutive=3) is None
    missing = history([1.0, 0.9, None, 0.7, 0.6], [0.6, 0.5, 0.4, 0.3, 0.2])
    assert teacher_hacking(missing, consecutive=3) is None


def test_an_exact_power_law_never_departs():
    steps = [10, 20, 40, 80, 160, 320, 640]
    proxy = [3.0 * s ** -0.5 for s in steps]
    fit = power_law_departure(steps, proxy, warmup=4, tolerance=0.05)
    assert fit["departed"] is False
    assert fit["a"] == pytest.approx(np.log(3.0), abs=1e-6) and fit["b"] == pytest.approx(-0.5, abs=1e-6)


def test_a_bending_curve_departs_at_the_first_check_off_the_fit():
    steps = [10, 20, 40, 80, 160, 320, 640]
    # the power law for four checks, then a bend: 160 is 3% below the law (within tolerance), 320 22% above it
    proxy = [3.0 * s ** -0.5 for s in steps[:4]] + [3.0 * 160 ** -0.5 * 0.97, 3.0 * 320 ** -0.5 * 1.22,
                                                      3.0 * 640 ** -0.5 * 1.45]
    fit = power_law_departure(steps, proxy, warmup=4, tolerance=0.1)
    assert fit["departed"] is True and fit["step"] == 320
    assert fit["relative"] == pytest.approx(0.22, abs=1e-3)
    assert fit["b"] == pytest.approx(-0.5, abs=1e-6)
    assert power_law_departure(steps[:3], proxy[:3], warmup=4, tolerance=0.1) is None  # too few checks to fit


def test_the_holdout_is_whole_problems_and_needs_ids_and_answers():
    rows = Dataset.from_list([{"id": f"p{i // 3}", "answer": str(i // 3), "x": i} for i in range(15)])
    train, heldout = split_holdout(rows, MonitorSettings(holdout=2), seed=0, step="kd", source="scored")
    assert len(heldout) == 6 and len(train) == 9
    assert not set(train["id"]) & set(heldout["id"]) and len(set(heldout["id"])) == 2
    again = split_holdout(rows, MonitorSettings(holdout=2), seed=0, step="kd", source="scored")[1]
    assert again["id"] == heldout["id"]  # seeded
    with pytest.raises(UserError, match=r"monitor needs column\(s\) answer in dataset 'scored'"):
        split_holdout(rows.remove_columns("answer"), MonitorSettings(holdout=2), seed=0, step="kd", source="scored")
    with pytest.raises(UserError, match="monitor.holdout is 5 but dataset 'scored' has 5 problems"):
        split_holdout(rows, MonitorSettings(holdout=5), seed=0, step="kd", source="scored")


def monitored_rows(identity, problems=6, per_problem=2):
    """Two scored completions per problem, a teacher sure of each next token (as tests/test_kd.py's)."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(problems * per_problem):
        prompt = rng.integers(100, 5000, size=6).tolist()
        completion = [1000 + index, 2000, 3000 + index, 4000, 2]
        ids = [[token] + rng.integers(5000, 9000, size=K - 1).tolist() for token in completion]
        logprobs = [[np.log(0.9)] + [np.log(0.02)] * (K - 1) for _ in completion]
        rows.append({"id": f"p{index // per_problem}", "answer": str(index // per_problem),
                     **stored.row_values(prompt, completion, ids, logprobs, [np.log(0.9)] * len(completion),
                                         identity)})
    return rows


def test_a_kd_run_logs_the_monitor_and_trains_without_the_held_out_rows(tmp_path):
    features = Features({"id": Value("string"), "answer": Value("string"), **stored.features("float16")})
    Dataset.from_list(monitored_rows(student_identity()), features=features).save_to_disk(
        str(tmp_path / "scored" / "data"))
    inputs = {"scored": Artifact("scored", "dataset", tmp_path / "scored")}
    cfg = kd.Config(uses="kd", input="scored", model="builtin:tiny-random", lora=None, max_steps=3, batch_size=4,
                    learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_steps=1000,
                    max_length=64, monitor={"holdout": 2, "every": 2, "max_tokens": 8})
    out = Output(name="kd", kind="model", dir=tmp_path / "kd", scratch=tmp_path / "kd_scratch", seed=0)
    stats = kd.run(cfg, inputs, out).stats

    assert stats["monitor_holdout_rows"] == 4 and stats["rows"] == 8  # 2 of 6 problems, 2 rows each
    history_entries = json.loads((out.dir / "log_history.json").read_text())
    checks = [entry for entry in history_entries if "monitor/pass_rate" in entry]
    assert [entry["step"] for entry in checks] == [2, 3]  # every 2 steps, and after the last
    assert all(0.0 <= entry["monitor/pass_rate"] <= 1.0 and entry["monitor/heldout_divergence"] > 0
               and entry["monitor/train_divergence"] > 0 for entry in checks)
    # the training divergence: the mean of the steps' own kd/loss_per_token since the check before
    losses = {entry["step"]: entry["kd/loss_per_token"] for entry in history_entries if "loss" in entry}
    assert len(losses) == 3  # the checks' log entries leave the steps' own logging as it was
    assert [entry["monitor/train_divergence"] for entry in checks] == pytest.approx(
        [(losses[1] + losses[2]) / 2, losses[3]], abs=1e-5)
    monitor = stats["monitor"]
    assert [check["step"] for check in monitor["checks"]] == [2, 3]
    assert monitor["checks"][-1]["heldout_divergence"] == pytest.approx(checks[-1]["monitor/heldout_divergence"])
    assert monitor["teacher_hacking"] is None and monitor["power_law"] is None  # 2 checks < a warmup of 4

    # measured on the model in training: the tokens every completion shares are learnt, so the held-out rows' loss
    # falls too (a copy of the model at the start would give one number twice)
    assert checks[1]["monitor/heldout_divergence"] < checks[0]["monitor/heldout_divergence"]

    # the run page: one monitor chart with the three curves, and the alarm when the manifest has one
    alarm = {"suspected": True, "step": 3, "from_step": 1, "train_divergence": [2.0, 1.0],
             "pass_rate": [0.5, 0.0], "consecutive": 2}
    manifest = {"stats": {**stats, "monitor": {**monitor, "teacher_hacking": alarm}}, "config": {}}
    view = StepView(name="kd", uses="kd", state="complete", rows=None, seconds=None, key=None, parents=[],
                    path=out.dir, manifest=manifest)
    page = training_curves(view)
    assert page.count('data-metric="monitor"') == 1 and 'data-metric="monitor/pass_rate"' not in page
    assert all(f'data-curve="{name}"' in page for name in ("pass_rate", "train_divergence", "heldout_divergence"))
    assert 'data-metric="kd/loss_per_token"' in page  # the other charts stay
    assert "teacher hacking suspected at step 3" in page
    assert "teacher hacking" not in training_curves(StepView(**{**vars(view), "manifest": {"stats": stats}}))


def test_monitor_is_refused_without_answers_and_keeps_old_keys(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in monitored_rows(student_identity(), 3, 1)]
    features = Features({"id": Value("string"), **stored.features("float16")})
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "scored" / "data"))
    inputs = {"scored": Artifact("scored", "dataset", tmp_path / "scored")}
    settings = {"uses": "kd", "input": "scored", "model": "builtin:tiny-random", "lora": None, "max_steps": 1}
    out = Output(name="kd", kind="model", dir=tmp_path / "kd", scratch=tmp_path / "kd_scratch", seed=0)
    with pytest.raises(UserError, match=r"kd: monitor needs column\(s\) answer in dataset 'scored'"):
        kd.run(kd.Config(**settings, monitor={"holdout": 1}), inputs, out)
    assert "monitor" not in keyed_config(kd.Config(**settings))
    assert keyed_config(kd.Config(**settings, monitor={"holdout": 1}))["monitor"]["holdout"] == 1


@pytest.mark.slow  # rollouts, teacher and checks of tiny-random: 25 s on a quiet 2-core machine
def test_an_onpolicy_run_logs_the_pass_rate_and_its_loss_as_the_training_divergence(tmp_path):
    from pipeline.steps import onpolicy

    rows = [{"id": f"p{i}", "problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(6)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "problems" / "data"))
    inputs = {"problems": Artifact("problems", "dataset", tmp_path / "problems")}
    cfg = onpolicy.Config(uses="onpolicy", input="problems", model="builtin:tiny-random",
                          teacher="builtin:tiny-random", lora={"r": 8}, batch_size=4, learning_rate=5e-3,
                          logging_steps=1, max_length=128, max_tokens=4, save_steps=1000, max_steps=2,
                          monitor={"holdout": 2, "every": 1, "max_tokens": 4})
    out = Output(name="onpolicy", kind="model", dir=tmp_path / "onpolicy", scratch=tmp_path / "scratch", seed=0)
    stats = onpolicy.run(cfg, inputs, out).stats
    assert stats["rows"] == 4 and stats["monitor_holdout_rows"] == 2
    history_entries = json.loads((out.dir / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history_entries if "loss" in entry]
    checks = stats["monitor"]["checks"]
    assert [check["step"] for check in checks] == [1, 2] and all(c["heldout_divergence"] is None for c in checks)
    assert [check["train_divergence"] for check in checks] == pytest.approx(losses, abs=1e-4)
    assert all(0.0 <= entry["monitor/pass_rate"] <= 1.0 and "monitor/heldout_divergence" not in entry
               for entry in history_entries if "monitor/pass_rate" in entry)


def test_the_monitor_warns_once_and_a_resumed_run_goes_on_from_its_logged_checks(monkeypatch, capsys):
    """Monitor.check's bookkeeping on a stand-in trainer (no model run): pass rates falling with the training
    divergence raise one warning at the M-th falling check, counted across a resume from the logged checks."""
    from types import SimpleNamespace

    import torch

    from pipeline.training import monitor as monitor_module

    rates = iter([0.4, 0.3, 0.2, 0.1])
    monkeypatch.setattr(monitor_module, "pass_rate", lambda *args, **kwargs: next(rates))
    model = torch.nn.Linear(2, 2)
    history = [{"monitor/pass_rate": 0.6, "monitor/train_divergence": 3.0, "step": 10},
               {"monitor/pass_rate": 0.5, "monitor/train_divergence": 2.5, "step": 20}]  # before the checkpoint
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m), _metrics={"train": {}},
        args=SimpleNamespace(per_device_train_batch_size=2, include_num_input_tokens_seen="no"),
        state=SimpleNamespace(epoch=None, log_history=list(history)), control=SimpleNamespace(should_log=True),
        callback_handler=SimpleNamespace(on_log=lambda args, state, control, logs: control),
        is_world_process_zero=lambda: True)
    monitor = monitor_module.Monitor(trainer, MonitorSettings(consecutive=3), tokenizer=None, prompts=[[1]],
                                     answers=["1"], seed=0, step="kd",
                                     train_losses=monitor_module.metric_losses("kd/loss_per_token"))
    monitor.restore(trainer.state.log_history)
    for step, losses in zip((30, 40, 50, 60), ([2.2, 1.8], [1.5], [1.2, 1.0], [0.9])):
        trainer._metrics["train"] = {"kd/loss_per_token": losses}  # as TRL gathers them between two logging steps
        trainer.state.global_step = step
        monitor.check(step)
    assert model.training and trainer.control.should_log  # put back as they were
    checks = monitor.summary()["checks"]
    assert [c["step"] for c in checks] == [10, 20, 30, 40, 50, 60]
    assert [c["train_divergence"] for c in checks[2:]] == pytest.approx([2.0, 1.5, 1.1, 0.9])
    assert trainer.state.log_history[2] == {"monitor/pass_rate": 0.4, "monitor/train_divergence": 2.0, "step": 30}
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps the line
    assert printed.count("teacher hacking suspected") == 1  # at step 40 (falls at 20, 30, 40), not again
    assert "teacher hacking suspected at step 40: training divergence 3 -> 1.5 while held-out pass rate 0.6 -> 0.3" \
        in printed
    assert monitor.summary()["teacher_hacking"]["step"] == 40

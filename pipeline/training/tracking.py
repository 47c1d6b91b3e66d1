"""Experiment tracking (`report_to`: TensorBoard, Trackio, W&B; `tracking_run` names the run), the trainer's log
file, and `progress_callback`, which shows training on the step's progress row (`pipeline.core.console`).

Importing this module imports no torch, transformers, TRL or peft: the functions import what they need.
"""

from __future__ import annotations

import functools
import os

from pipeline.core.env import RUN_NAME_ENV
from pipeline.core.errors import UserError

# The trainer's log (loss and metrics per logging step), beside model/ in the step dir; `distill report` plots it.
LOG_HISTORY = "log_history.json"
TRACKERS = ("tensorboard", "trackio", "wandb")  # what `report_to` takes, besides none
TENSORBOARD_DIR = "runs"  # TensorBoard's event files, in the step's dir


# ---- experiment tracking and the progress row -------------------------------------------------------------------


def check_report_to(report_to: str | list[str]) -> str | list[str]:
    """`report_to` as given, if it names known trackers (a recipe error otherwise)."""
    names = [report_to] if isinstance(report_to, str) else report_to
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(map(repr, unknown))}; report_to takes "
                         f"{', '.join(TRACKERS)}, a list of them, or none")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to lists none with trackers: {names}")
    return report_to


def trackers(report_to: str | list[str]) -> list[str]:
    return [name for name in ([report_to] if isinstance(report_to, str) else report_to) if name != "none"]


def check_trackers_installed(report_to: str | list[str], step: str) -> None:
    import importlib.util

    for name in trackers(report_to):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"{step}: report_to {name} needs the {name} package, which is not installed "
                            f"(pip install {name}, or remove it from report_to)")


def tracking_run(out) -> tuple[str, str]:
    """The project and the name of a step's run in experiment trackers: the recipe and <recipe>/<step> under `distill
    run` (RUN_NAME_ENV); elsewhere distillery and the step's name."""
    run_name = os.environ.get(RUN_NAME_ENV) or out.name
    return (run_name.split("/")[0] if "/" in run_name else "distillery"), run_name


@functools.cache
def progress_callback():
    """The TrainerCallback class below; built on first use, so importing this module never imports transformers."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Optimizer steps done of max_steps, and the last logged loss, on a progress row (`pipeline.core.console`)."""

        def __init__(self, bar):
            self.bar = bar

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # resumed: global_step is the checkpoint's
                self.bar.update(total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.update(completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.bar.update(note=f"loss {logs['loss']:.4g}")

    return ProgressCallback

"""The run page's training section: per training step, every scalar its trainer logged per optimizer step (loss,
learning rate, redi/margin, ...) as a small inline SVG line chart, from the log_history.json beside its model/."""

from __future__ import annotations

import html
import json

from pipeline.commands.run_report.step_views import StepView
from pipeline.training.tracking import LOG_HISTORY

# Logged scalars that only count up (tokens, time) say nothing a curve shows better than the manifest's total.
COUNTERS = {"step", "epoch", "num_input_tokens_seen", "num_tokens", "train_runtime"}
CHART_WIDTH, CHART_HEIGHT, PAD = 300, 150, 46  # every chart on the page (evaluations.py draws the same size)


def logged_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Scalar name -> (step, value) for every per-step entry of a trainer's log (not its end-of-training summary,
    the entry with `train_loss`)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if "train_loss" in entry or "step" not in entry:
            continue
        for name, value in entry.items():
            if name not in COUNTERS and isinstance(value, (int, float)) and value == value:  # NaN never plots
                curves.setdefault(name, []).append((entry["step"], float(value)))
    return curves


def is_trainer(step: StepView) -> bool:
    return step.complete and "train_seconds" in step.stats  # what pipeline.training.build.train_and_save records


def training_curves(step: StepView) -> str:
    stats = step.stats
    summary = (f"{stats.get('steps', '?')} optimizer steps, {stats.get('rows', '?')} rows, "
               f"{stats['train_seconds']} s training, {stats.get('tokens_per_second', '?')} tokens/s")
    history_file = step.path / LOG_HISTORY
    if not history_file.is_file():
        body = f"<p class=note>No {LOG_HISTORY}: trained before distill kept the trainer's log.</p>"
    else:
        charts = "".join(line_chart(name, points)
                         for name, points in logged_curves(json.loads(history_file.read_text())).items())
        body = (f"<div class=charts>{charts}</div>" if charts else
                f"<p class=note>Nothing was logged per step: logging_steps "
                f"{step.manifest.get('config', {}).get('logging_steps')} is more than the steps trained.</p>")
    return (f'<section class=trainer data-step="{html.escape(step.name)}">'
            f"<h3>{html.escape(step.name)} <span class=uses>{html.escape(step.uses)}</span></h3>"
            f"<p>{html.escape(summary)}</p>{body}</section>")


def line_chart(name: str, points: list[tuple[int, float]]) -> str:
    """A small inline SVG of one logged scalar against the optimizer step, its range written on the axes."""
    steps, values = [s for s, _ in points], [v for _, v in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)

    def x(s: float) -> float:
        return PAD + (CHART_WIDTH - PAD - 8) * ((s - first) / (last - first) if last > first else 0.5)

    def y(v: float) -> float:
        return CHART_HEIGHT - 20 - (CHART_HEIGHT - 32) * ((v - low) / (high - low) if high > low else 0.5)

    # enough digits that the top and bottom of a narrow range read differently
    digits = next((d for d in range(3, 8) if f"{high:.{d}g}" != f"{low:.{d}g}"), 3)
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2"><title>step {s}: {v:.4g}</title></circle>'
                   for s, v in points)
    return (f'<figure class=chart data-metric="{html.escape(name)}" data-points="{len(points)}">'
            f'<svg viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}">'
            f'<line class=axis x1="{PAD}" y1="{CHART_HEIGHT - 20}" x2="{CHART_WIDTH - 8}" y2="{CHART_HEIGHT - 20}"/>'
            f'<line class=axis x1="{PAD}" y1="8" x2="{PAD}" y2="{CHART_HEIGHT - 20}"/>'
            f'<text x="{PAD - 3}" y="{y(high) + 4:.1f}" class=tick text-anchor=end>{high:.{digits}g}</text>'
            f'<text x="{PAD - 3}" y="{y(low) + 4:.1f}" class=tick text-anchor=end>{low:.{digits}g}</text>'
            f'<text x="{PAD}" y="{CHART_HEIGHT - 6}" class=tick>{first}</text>'
            f'<text x="{CHART_WIDTH - 8}" y="{CHART_HEIGHT - 6}" class=tick text-anchor=end>step {last}</text>'
            f'<polyline points="{line}"/>{dots}</svg><figcaption>{html.escape(name)}</figcaption></figure>')

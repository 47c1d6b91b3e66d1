"""The run page's training section: per training step, every scalar its trainer logged per optimizer step (loss,
learning rate, redi/margin, ...) as a small inline SVG line chart, from the log_history.json beside its model/; a
step that ran the teacher-hacking monitor (`monitor/*` entries, pipeline.training.monitor) gets one chart of its three
curves instead of three, and the alarm's sentence when its manifest says teacher hacking was suspected."""

from __future__ import annotations

import html
import json

from pipeline.commands.run_report.step_views import StepView
from pipeline.training.monitor import HELDOUT_DIVERGENCE, PASS_RATE, PREFIX, TRAIN_DIVERGENCE, alarm_text
from pipeline.training.tracking import LOG_HISTORY

# Logged scalars that only count up (tokens, time) say nothing a curve shows better than the manifest's total.
COUNTERS = {"step", "epoch", "num_input_tokens_seen", "num_tokens", "train_runtime"}
CHART_WIDTH, CHART_HEIGHT, PAD = 300, 150, 46  # every chart on the page (evaluations.py draws the same size)
# The monitor chart's curves: name, colour, and the axis it is read on (the two divergences share the right one).
MONITOR_CURVES = ((PASS_RATE, "#2e7d32", "left"), (TRAIN_DIVERGENCE, "#4a90d9", "right"),
                  (HELDOUT_DIVERGENCE, "#d9822b", "right"))


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
        curves = logged_curves(json.loads(history_file.read_text()))
        monitored = {name.removeprefix(PREFIX): curves.pop(name) for name in list(curves) if name.startswith(PREFIX)}
        charts = (monitor_chart(monitored) if monitored else "") + "".join(
            line_chart(name, points) for name, points in curves.items())
        body = (f"<div class=charts>{charts}</div>" if charts else
                f"<p class=note>Nothing was logged per step: logging_steps "
                f"{step.manifest.get('config', {}).get('logging_steps')} is more than the steps trained.</p>")
    alarm = (stats.get("monitor") or {}).get("teacher_hacking")
    if alarm:
        body = f'<p class=alarm style="color:#b3261e"><b>{html.escape(alarm_text(alarm))}</b></p>' + body
    return (f'<section class=trainer data-step="{html.escape(step.name)}">'
            f"<h3>{html.escape(step.name)} <span class=uses>{html.escape(step.uses)}</span></h3>"
            f"<p>{html.escape(summary)}</p>{body}</section>")


def monitor_chart(curves: dict[str, list[tuple[int, float]]]) -> str:
    """The teacher-hacking monitor's curves in one chart: the held-out pass rate on the left axis (0 to 1), the
    training and held-out divergences on a shared right axis (one unit, so their gap reads true)."""
    width = CHART_WIDTH + 60  # room for the right axis and the legend
    right = width - PAD
    steps = [s for points in curves.values() for s, _ in points]
    first, last = min(steps), max(steps)
    divergences = [v for name, _, axis in MONITOR_CURVES if axis == "right" for _, v in curves.get(name, [])]
    low, high = (min(divergences), max(divergences)) if divergences else (0.0, 1.0)
    ranges = {"left": (0.0, 1.0), "right": (low, high)}

    def x(s: float) -> float:
        return PAD + (right - PAD) * ((s - first) / (last - first) if last > first else 0.5)

    def y(v: float, axis: str) -> float:
        bottom, top = ranges[axis]
        return CHART_HEIGHT - 20 - (CHART_HEIGHT - 32) * ((v - bottom) / (top - bottom) if top > bottom else 0.5)

    lines, legend = [], []
    for name, colour, axis in MONITOR_CURVES:
        points = curves.get(name)
        if not points:
            continue
        path = " ".join(f"{x(s):.1f},{y(v, axis):.1f}" for s, v in points)
        dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v, axis):.1f}" r="2" style="fill:{colour}"><title>{name} '
                       f"step {s}: {v:.4g}</title></circle>" for s, v in points)
        lines.append(f'<polyline data-curve="{name}" points="{path}" style="stroke:{colour}"/>{dots}')
        legend.append(f'<span style="color:{colour}">{name.replace("_", " ")} ({axis})</span>')
    return (f'<figure class=chart data-metric="monitor" data-points="{len(set(steps))}">'
            f'<svg viewBox="0 0 {width} {CHART_HEIGHT}" width="{width}" height="{CHART_HEIGHT}">'
            f'<line class=axis x1="{PAD}" y1="{CHART_HEIGHT - 20}" x2="{right}" y2="{CHART_HEIGHT - 20}"/>'
            f'<line class=axis x1="{PAD}" y1="8" x2="{PAD}" y2="{CHART_HEIGHT - 20}"/>'
            f'<line class=axis x1="{right}" y1="8" x2="{right}" y2="{CHART_HEIGHT - 20}"/>'
            f'<text x="{PAD - 3}" y="{y(1.0, "left") + 4:.1f}" class=tick text-anchor=end>1</text>'
            f'<text x="{PAD - 3}" y="{y(0.0, "left") + 4:.1f}" class=tick text-anchor=end>0</text>'
            f'<text x="{right + 3}" y="{y(high, "right") + 4:.1f}" class=tick>{high:.3g}</text>'
            f'<text x="{right + 3}" y="{y(low, "right") + 4:.1f}" class=tick>{low:.3g}</text>'
            f'<text x="{PAD}" y="{CHART_HEIGHT - 6}" class=tick>{first}</text>'
            f'<text x="{right}" y="{CHART_HEIGHT - 6}" class=tick text-anchor=end>step {last}</text>'
            f'{"".join(lines)}</svg><figcaption>monitor: {", ".join(legend)}; right axis: per token</figcaption>'
            "</figure>")


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

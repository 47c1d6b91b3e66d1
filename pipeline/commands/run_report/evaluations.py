"""The run page's evaluations: each evaluate step's report.md under the page's headings, its plots copied beside the
page, and with a recipe's `rounds`, pass@1 by round (inline SVG charts with 95% bars, and a table)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from pipeline.commands.run_report.curves import CHART_HEIGHT, CHART_WIDTH, PAD
from pipeline.commands.run_report.step_views import StepView


def evaluation_section(step: StepView, report_dir: Path) -> str:
    """The evaluate step's report.md as eval/report.py wrote it, its headings under this page's, its plots copied."""
    from markdown_it import MarkdownIt

    from eval.report import REPORT_MD

    heading = f"<h3>{html.escape(step.name)}</h3>"
    if not (step.path / REPORT_MD).is_file():
        return f"<section class=evaluation>{heading}<p class=note>No {REPORT_MD} in {step.path}.</p></section>"
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")  # model names stay text, never markup
    tokens = markdown.parse((step.path / REPORT_MD).read_text())
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 3)}"
        for child in token.children or []:
            if child.type == "image" and (step.path / str(child.attrs["src"])).is_file():
                copied = f"{step.name}-{child.attrs['src']}"
                shutil.copyfile(step.path / str(child.attrs["src"]), report_dir / copied)
                child.attrs["src"] = copied
    body = markdown.renderer.render(tokens, markdown.options, {})
    return f'<section class=evaluation data-step="{html.escape(step.name)}">{heading}{body}</section>'


def rounds_section(step: StepView, models_by_round: list[str | None] | None) -> str:
    """pass@1 by round in this evaluation (`pipeline.commands.compare.by_round`), per benchmark: a chart and a table;
    empty unless the recipe has rounds and the evaluation holds two or more rounds' models."""
    from pipeline.commands.compare import by_round

    if not models_by_round:
        return ""
    results = step.path / "results.json"
    rows = by_round(models_by_round, results, json.loads(results.read_text()))
    parts = []
    for benchmark in dict.fromkeys(row["benchmark"] for row in rows):
        of_benchmark = [row for row in rows if row["benchmark"] == benchmark]
        table = "".join(
            f"<tr><td>{row['round']}</td><td>{html.escape(row['model'])}</td><td>{_percent(row['pass@1'])}"
            f"{'' if row['stderr'] is None else ' ± ' + _percent(row['stderr'])}</td>"
            f"<td>{_paired(row['minus_round_before'])}</td></tr>" for row in of_benchmark)
        # each round's pass@1 with its own 95% interval; each round minus the one before with the paired one
        accuracy = [(row["round"], 100 * row["pass@1"], 100 * row["pass@1"] - 196 * (row["stderr"] or 0.0),
                     100 * row["pass@1"] + 196 * (row["stderr"] or 0.0)) for row in of_benchmark]
        gains = [(row["round"], 100 * paired["difference"], 100 * paired["ci95"][0], 100 * paired["ci95"][1])
                 for row in of_benchmark if (paired := row["minus_round_before"]) is not None]
        gains_caption = f"{benchmark}: minus the round before (points), paired 95%"
        parts.append(f"{round_chart(accuracy, f'{benchmark}: pass@1 (%) by round, 95% intervals')}"
                     f"{round_chart(gains, gains_caption, differences=True)}"
                     f"<table class=rounds><tr><th>round</th><th>model</th>"
                     f"<th>pass@1 (%) ± stderr</th><th>minus the round before [95%], paired</th></tr>{table}</table>")
    if not parts:
        return ""
    return (f'<section class=rounds data-step="{html.escape(step.name)}"><h3>{html.escape(step.name)}: pass@1 by '
            f'round</h3><div class=charts>{"".join(parts)}</div></section>')


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _paired(paired: dict | None) -> str:
    if paired is None:
        return "–"
    text = f"{100 * paired['difference']:+.1f} [{100 * paired['ci95'][0]:+.1f}, {100 * paired['ci95'][1]:+.1f}]"
    return text + ("" if paired["detectable"] else ", not detectable")


def round_chart(points: list[tuple[int, float, float, float]], caption: str, *, differences: bool = False) -> str:
    """Values (%) against the round, each with its interval: (round, value, low, high) per point, as a small inline
    SVG; `differences` are written with their sign, over a dashed line at 0 when the range spans it."""
    low, high = min(p[2] for p in points), max(p[3] for p in points)
    first, last = points[0][0], points[-1][0]

    def x(number: float) -> float:
        return PAD + (CHART_WIDTH - PAD - 16) * ((number - first) / (last - first) if last > first else 0.5)

    def y(value: float) -> float:
        return CHART_HEIGHT - 20 - (CHART_HEIGHT - 32) * ((value - low) / (high - low) if high > low else 0.5)

    zero = (f'<line class=zero x1="{PAD}" y1="{y(0):.1f}" x2="{CHART_WIDTH - 8}" y2="{y(0):.1f}"/>'
            if low < 0 < high else "")
    line = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v, _, _ in points)
    number = "+.1f" if differences else ".1f"
    marks = "".join(
        f'<line class=bar x1="{x(n):.1f}" y1="{y(lo):.1f}" x2="{x(n):.1f}" y2="{y(hi):.1f}"/>'
        f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="2.5"><title>round {n}: {v:{number}} [{lo:{number}}, {hi:{number}}]'
        f'</title></circle><text x="{x(n):.1f}" y="{CHART_HEIGHT - 6}" class=tick text-anchor=middle>{n}</text>'
        for n, v, lo, hi in points)
    return (f'<figure class=chart data-points="{len(points)}">'
            f'<svg viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}">'
            f'<line class=axis x1="{PAD}" y1="{CHART_HEIGHT - 20}" x2="{CHART_WIDTH - 8}" y2="{CHART_HEIGHT - 20}"/>'
            f'<line class=axis x1="{PAD}" y1="8" x2="{PAD}" y2="{CHART_HEIGHT - 20}"/>{zero}'
            f'<text x="{PAD - 3}" y="{y(high) + 4:.1f}" class=tick text-anchor=end>{high:.1f}</text>'
            f'<text x="{PAD - 3}" y="{y(low) + 4:.1f}" class=tick text-anchor=end>{low:.1f}</text>'
            f'<polyline points="{line}"/>{marks}</svg><figcaption>{html.escape(caption)}</figcaption></figure>')

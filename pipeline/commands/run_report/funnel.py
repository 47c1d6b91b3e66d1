"""The run page's data funnel: a row per complete step that made a dataset or trained on one, what its rows are and
why rows were left out. What a step's stats mean is its module's `funnel_stage` hook (pipeline.core.funnel)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from pipeline.commands.run_report.step_views import StepView
from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage, trained_stage
from pipeline.core.step import step_module


@dataclass
class FunnelRow:
    """One row of the funnel table: a step, the dataset it read, and what it turned it into."""

    step: str
    uses: str
    what: str  # what its rows are
    rows: int
    problems: int | None
    source: str | None  # the step whose dataset it read
    breakdown: list[Count] = field(default_factory=list)  # how its rows divide (labels, finish reasons)
    dropped: list[Count] = field(default_factory=list)  # what it left out, and why (counts above 0)


def funnel(steps: list[StepView]) -> list[FunnelRow]:
    """A row per complete step that made a dataset or trained on one, in run order."""
    rows = []
    for step in steps:
        if not step.complete or "rows" not in step.stats:
            continue
        stage = step_stage(step)
        rows.append(FunnelRow(step.name, step.uses, stage.what, step.stats["rows"], stage.problems,
                              step.manifest.get("config", {}).get("input"), stage.breakdown,
                              [count for count in stage.dropped if count.count]))
    return rows


def step_stage(step: StepView) -> FunnelStage:
    """What the step's module says it made of its input (its `funnel_stage`); for a step without that hook, or whose
    module no longer imports, the rows a model was trained on, or plain rows."""
    try:
        describe = getattr(step_module(step.uses), "funnel_stage", None)
    except UserError:
        describe = None
    if describe is not None:
        return describe(step.stats)
    return trained_stage(step.stats) if step.produces == "model" else FunnelStage("rows", None)


def funnel_table(funnel_rows: list[FunnelRow]) -> str:
    """The funnel as an HTML table, each row's bar as wide as its share of the widest row."""
    if not funnel_rows:
        return "<p class=note>No dataset step has finished.</p>"
    widest = max(row.rows for row in funnel_rows) or 1

    def items(counts: list[Count], css: str) -> str:
        return "".join(f'<li class={css} data-stat="{html.escape(c.stat)}" data-count="{c.count}">'
                       f"{html.escape(c.label)} <b>{c.count:,}</b></li>" for c in counts)

    table_rows = []
    for row in funnel_rows:
        source = f"<div class=from>from {html.escape(row.source)}</div>" if row.source else ""
        problems = "" if row.problems is None else row.problems
        table_rows.append(
            f'<tr class=funnel-stage data-step="{html.escape(row.step)}" data-rows="{row.rows}" '
            f'data-problems="{problems}">'
            f"<th>{html.escape(row.step)}<div class=uses>{html.escape(row.uses)}</div>{source}</th>"
            f"<td>{html.escape(row.what)}</td>"
            f'<td class=rows>{row.rows:,}<div class=bar style="width:{100 * row.rows / widest:.1f}%"></div></td>'
            f"<td class=problems>{problems}</td>"
            f"<td><ul>{items(row.breakdown, 'breakdown')}</ul></td>"
            f"<td><ul>{items(row.dropped, 'dropped')}</ul></td></tr>")
    return ("<table class=funnel><thead><tr><th>step</th><th>rows are</th><th>rows</th><th>problems</th>"
            "<th>of which</th><th>left out, and why</th></tr></thead><tbody>" + "".join(table_rows)
            + "</tbody></table>")

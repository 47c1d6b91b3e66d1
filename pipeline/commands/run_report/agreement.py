"""The run page's agreement tables: for each verify step that graded a dataset with a published correctness column
(`published_correct`, e.g. OpenR1-Math-Raw's math-verify flag), our grades against the published ones."""

from __future__ import annotations

import html

from pipeline.commands.run_report.step_views import StepView

OURS = ("correct", "incorrect", "ungraded")
PUBLISHED = ("true", "false", "null")


def agreement_tables(steps: list[StepView]) -> str:
    """One table per complete step whose manifest has `published_agreement`; "" when none has."""
    return "\n".join(_table(step.name, step.stats["published_agreement"]) for step in steps
                     if step.complete and "published_agreement" in step.stats)


def _table(step_name: str, table: dict) -> str:
    head = "".join(f"<th>published {value}</th>" for value in PUBLISHED)
    body = "".join(
        f"<tr><th>ours: {ours}</th>" + "".join(
            f'<td data-ours="{ours}" data-published="{published}">{table[ours][published]:,}</td>'
            for published in PUBLISHED) + "</tr>"
        for ours in OURS)
    rate = table.get("agreement")
    summary = (f"agree on {rate:.1%} of {table['compared']:,} rows graded both ways" if rate is not None
               else "no row graded both ways")
    return (f"<table class=agreement data-step=\"{html.escape(step_name)}\"><caption>{html.escape(step_name)}: our "
            f"grades against the published correctness column ({summary})</caption>"
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>")

"""The recipe as the run page draws it: an inline SVG box per step (name, type, state, rows, seconds, key), columns
by how far down the chain a step is, arrows from the steps it reads."""

from __future__ import annotations

import html

from pipeline.commands.run_report.step_views import StepView

BOX_WIDTH, BOX_HEIGHT, GAP_X, GAP_Y, MARGIN = 168, 78, 40, 22, 10


def graph_layout(steps: list[StepView]) -> dict[str, tuple[int, int]]:
    """(column, row) per step: a step's column is one past its furthest parent's; rows in run order."""
    columns: dict[str, int] = {}
    for step in steps:
        columns[step.name] = 1 + max((columns[p] for p in step.parents if p in columns), default=-1)
    filled: dict[int, int] = {}
    places = {}
    for step in steps:
        column = columns[step.name]
        places[step.name] = (column, filled.get(column, 0))
        filled[column] = filled.get(column, 0) + 1
    return places


def steps_graph(steps: list[StepView]) -> str:
    """Inline SVG: one box per step (name, type, state, rows, seconds, key), arrows from the steps it reads."""
    places = graph_layout(steps)
    width = MARGIN * 2 + max(c for c, _ in places.values()) * (BOX_WIDTH + GAP_X) + BOX_WIDTH
    height = MARGIN * 2 + max(r for _, r in places.values()) * (BOX_HEIGHT + GAP_Y) + BOX_HEIGHT

    def corner(name: str) -> tuple[int, int]:
        column, row = places[name]
        return MARGIN + column * (BOX_WIDTH + GAP_X), MARGIN + row * (BOX_HEIGHT + GAP_Y)

    arrows, boxes = [], []
    for step in steps:
        x, y = corner(step.name)
        for parent in step.parents:
            if parent not in places:
                continue
            px, py = corner(parent)
            start, end = (px + BOX_WIDTH, py + BOX_HEIGHT / 2), (x, y + BOX_HEIGHT / 2)
            bend = (end[0] - start[0]) / 2
            arrows.append(f'<path class=arrow d="M{start[0]},{start[1]} C{start[0] + bend},{start[1]} '
                          f'{end[0] - bend},{end[1]} {end[0] - 2},{end[1]}" marker-end="url(#arrowhead)"/>')
        rows = "" if step.rows is None else f"{step.rows:,} rows"
        seconds = "" if step.seconds is None else f"{step.seconds:.1f} s"
        lines = [(step.name, "name"), (f"{step.uses} · {step.state}", "state"),
                 (" · ".join(part for part in (rows, seconds) if part) or "–", "numbers"),
                 (f"key {step.key}" if step.key else "no output", "key")]
        text = "".join(f'<text x="{x + 10}" y="{y + 19 + 18 * i}" class="{css}">{html.escape(_clip(line, 22))}</text>'
                       for i, (line, css) in enumerate(lines))
        tooltip = html.escape(f"{step.name} ({step.uses}): {step.state}; reads {', '.join(step.parents) or 'nothing'}")
        boxes.append(f'<g class="step state-{step.state}" data-step="{html.escape(step.name)}" '
                     f'data-state="{step.state}"><title>{tooltip}</title>'
                     f'<rect x="{x}" y="{y}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" rx="6"/>{text}</g>')
    return (f'<svg class=graph viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            'aria-label="the recipe\'s steps"><defs><marker id="arrowhead" viewBox="0 0 10 10" refX="9" refY="5" '
            'markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
            + "".join(arrows) + "".join(boxes) + "</svg>")


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 1] + "…"


"""`distill report WORKDIR`: one page that shows a run, written to <workdir>/run-report/index.html.

The page opens from disk in any browser and fetches nothing: its CSS and script are inlined, the evaluation plots are
copied beside it, and it shows

    the recipe       the steps as a graph (arrows from what each step reads), with state, rows, seconds and key, as
                     `distill status WORKDIR` reads them (recipe.json and each step's manifest.json)
    the data funnel  problems -> samples -> graded (by label) -> selected / pairs -> trained rows, and why rows were
                     dropped, from the manifests' stats (steps found by their `uses` type)
    training curves  every scalar a trainer logged (loss, learning rate, redi/margin, ...) per step, from the
                     log_history.json each training step writes beside model/
    evaluations      each evaluate step's report.md (pass@1, paired comparisons, ...) as eval/report.py wrote it;
                     with a `rounds` block, first pass@1 by round (a chart with 95% bars, and each round minus the
                     one before, paired over problems) for each evaluation holding two or more rounds' models
    a sample browser every dataset step with completions (sample, verify) and every evaluate step's benchmarks: filter
                     by label, model and problem, read the prompt, the completion with its <think> span folded, the
                     extracted answer, the gold answer and the label

The browser's rows go in chunk files under run-report/data/, loaded by <script> tags when a page of results needs
them (a page opened from file:// may not fetch()), so a dataset of any size costs the page only what is shown. The
page reads its starting filter from the URL hash: `index.html#browser=graded&label=correct&model=M&problem=ID&page=2`.

`run-report` is not a name a step can write (the runner refuses a step dir it did not make), and the report replaces
only a run-report dir it made (`pipeline.core.outputs`; --overwrite replaces another), so it never replaces a step's
output or anything else. It is written while it holds the workdir's lock, so never while a run changes the steps it
reads: `distill report` during a run is refused (exit 2), and the run writes the page when it ends.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.artifacts import COMPLETE, read_manifest
from pipeline.core.errors import UserError
from pipeline.core.models import STEP_PREFIX
from pipeline.core.outputs import REPORT, claim_dir, mark, never_written
from pipeline.core.runner import RUN_FILE, status, workdir_lock
from pipeline.training.tracking import LOG_HISTORY

REPORT_DIR = "run-report"
PAGE = "index.html"
DATA_DIR = "data"
ROWS_PER_CHUNK = 200
ASSETS = Path(__file__).with_name("run_report_assets")


def write_run_report(workdir: Path, *, rows_per_chunk: int = ROWS_PER_CHUNK, overwrite: bool = False) -> Path:
    """Write the report of the run in `workdir` (replacing an earlier one) and return the page's path. `overwrite`:
    replace a run-report dir `distill report` did not write."""
    workdir = Path(workdir)
    if not (workdir / RUN_FILE).is_file():
        read_steps(workdir)  # refuses what is not a run's workdir, saying what it is, before any lock file is made
    (final_dir,) = claim_dir(workdir, [REPORT_DIR], REPORT, overwrite=overwrite, never=never_written(workdir))
    with workdir_lock(workdir):  # a run replaces the step dirs the page reads: read them while none runs
        return _write_locked(workdir, final_dir, rows_per_chunk)


def _write_locked(workdir: Path, final_dir: Path, rows_per_chunk: int) -> Path:
    steps = read_steps(workdir)
    if REPORT_DIR in {step.name for step in steps}:
        raise UserError(f"{workdir}: the recipe has a step named {REPORT_DIR!r}, the directory `distill report` "
                        "writes; rename that step")
    # Written beside, then swapped in: an interrupted report never leaves a half-written page.
    tmp_dir = workdir / f".{REPORT_DIR}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / DATA_DIR).mkdir(parents=True)
    mark(tmp_dir, REPORT)
    sources = write_browser_data(workdir, steps, tmp_dir / DATA_DIR, rows_per_chunk)
    run = json.loads((workdir / RUN_FILE).read_text())
    evaluations = [rounds_section(step, run.get("models_by_round")) + evaluation_section(step, tmp_dir)
                   for step in steps if step.uses == "evaluate" and step.complete]
    page = PAGE_TEMPLATE.format(
        title=html.escape(f"{run['document'].get('name', workdir.name)}: distill report"),
        workdir=html.escape(str(workdir.resolve())),
        recipe=html.escape(str(run["recipe"])),
        style=(ASSETS / "report.css").read_text(),
        graph=steps_graph(steps),
        funnel=funnel_table(funnel(steps)),
        curves="\n".join(training_curves(step) for step in steps if is_trainer(step))
        or "<p class=note>No training step has finished.</p>",
        evaluations="\n".join(evaluations) or "<p class=note>No evaluate step has finished.</p>",
        browser_sources=_script_json({"sources": sources, "rowsPerChunk": rows_per_chunk}),
        script=(ASSETS / "report.js").read_text(),
    )
    (tmp_dir / PAGE).write_text(page)
    if final_dir.exists():
        old = workdir / f".{REPORT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir / PAGE


# ---- the steps ----------------------------------------------------------------------------------------------------


@dataclass
class StepView:
    """One step of the last run, as the report shows it."""

    name: str
    uses: str
    state: str  # complete | failed | incomplete | pending (pipeline.core.runner.status)
    rows: int | None
    seconds: float | None
    key: str | None
    parents: list[str]  # the earlier steps it reads (datasets and step: models)
    path: Path
    manifest: dict = field(default_factory=dict)  # empty unless complete

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {})

    @property
    def produces(self) -> str | None:
        return self.manifest.get("produces")


def read_steps(workdir: Path) -> list[StepView]:
    """The steps of the last run in `workdir`, in run order, with their manifests where complete."""
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such directory (give the workdir of a `distill run`)")
    seed_runs = sorted(workdir.glob(f"seed-*/{RUN_FILE}"))
    if not (workdir / RUN_FILE).is_file() and seed_runs:
        raise UserError(f"{workdir}: a `distill run --seeds` workdir; report one seed's run, e.g. "
                        f"`distill report {seed_runs[0].parent}`")
    rows = status(workdir)  # raises the UserError for a dir that is not a workdir
    document_steps = json.loads((workdir / RUN_FILE).read_text())["document"].get("steps", {})
    steps = []
    for row in rows:
        name = row["step"]
        manifest = read_manifest(workdir / name) if row["state"] == COMPLETE else {}
        parents = list(manifest["parents"]) if manifest else _parents_in_recipe(document_steps.get(name, {}))
        steps.append(StepView(name, row["uses"], row["state"], row["rows"], row["seconds"], row["key"],
                              parents, workdir / name, manifest))
    return steps


def _parents_in_recipe(spec: dict) -> list[str]:
    """What a step that has not run reads, from its recipe entry: its `input` and every `step:NAME` it names (the
    runner's `Recipe.dependencies`, without validating a config whose files may not be readable from here)."""
    names = [spec["input"]] if isinstance(spec.get("input"), str) else []

    def step_refs(value):
        if isinstance(value, str) and value.startswith(STEP_PREFIX):
            yield value.removeprefix(STEP_PREFIX)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from step_refs(item)

    for value in spec.values():
        names += step_refs(value)
    return list(dict.fromkeys(names))


# ---- the recipe as a graph ----------------------------------------------------------------------------------------

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


# ---- the data funnel ----------------------------------------------------------------------------------------------


@dataclass
class Count:
    """One number of a funnel stage: the manifest stat it comes from (or how it is derived), and what it counts."""

    stat: str
    label: str
    count: int


@dataclass
class FunnelStage:
    """What a dataset-making or training step turned its input into."""

    step: str
    uses: str
    what: str  # what its rows are
    rows: int
    problems: int | None
    source: str | None  # the step whose dataset it read
    breakdown: list[Count] = field(default_factory=list)  # how its rows divide (labels, finish reasons)
    dropped: list[Count] = field(default_factory=list)  # what it left out, and why


def funnel(steps: list[StepView]) -> list[FunnelStage]:
    """A stage per complete step that made a dataset or trained on one, in run order."""
    stages = []
    for step in steps:
        if not step.complete or "rows" not in step.stats:
            continue
        stats = step.stats
        if step.produces == "model":
            what, problems, breakdown, dropped = _trained(stats)
        elif step.uses in STAGES:
            what, problems, breakdown, dropped = STAGES[step.uses](stats)
        else:
            what, problems, breakdown, dropped = "rows", None, [], []
        stages.append(FunnelStage(step.name, step.uses, what, stats["rows"], problems,
                                  step.manifest.get("config", {}).get("input"), breakdown,
                                  [count for count in dropped if count.count]))
    return stages


def _loaded(stats: dict):
    return "problems", stats["rows"], [], []


def _sampled(stats: dict):
    finished = [Count(key, f"finish: {key.removeprefix('finish_')}", value)
                for key, value in stats.items() if key.startswith("finish_")]
    return "samples", stats.get("problems"), finished, []


def _graded(stats: dict):
    from eval.answers import GRADED, LABELS

    # every graded label, even at 0 (no correct sample is news); an ungraded one only where it happened
    labels = [Count(f"label_{label}", label, stats.get(f"label_{label}", 0)) for label in LABELS
              if label in GRADED or stats.get(f"label_{label}")]
    solved = Count("problems_solved", "problems with a correct sample", stats.get("problems_solved", 0))
    return "graded samples", stats.get("problems"), [*labels, solved], []


def _selected(stats: dict):
    dropped = [Count("problems_in - problems_kept", "problems without an eligible correct sample",
                     stats["problems_in"] - stats["problems_kept"]),
               Count("dropped_too_long", "correct samples over max_tokens", stats.get("dropped_too_long", 0))]
    return "selected traces", stats["problems_kept"], [], dropped


def _paired(stats: dict):
    dropped = [Count("problems_without_correct", "problems without a correct sample",
                     stats["problems_without_correct"]),
               Count("problems_without_rejected", "problems without a rejected sample",
                     stats["problems_without_rejected"]),
               Count("samples_too_long", "samples over the length limits (before pairing)", stats["samples_too_long"])]
    return "preference pairs", stats["problems_paired"], [], dropped


def _filtered(stats: dict):
    dropped = [Count(key, f"{key.removeprefix('removed_').replace('_', ' ')} (problems; rows for truncated)", value)
               for key, value in stats.items() if key.startswith("removed_")]
    return "rows kept", stats["problems_kept"], [], dropped


def _trained(stats: dict):
    dropped = [Count("dropped_truncated", "rows longer than max_length", stats.get("dropped_truncated", 0)),
               Count("problems_without_context", "problems without a verified trace (opsd)",
                     stats.get("problems_without_context", 0))]
    return "rows trained on", None, [], dropped


STAGES = {"load": _loaded, "sample": _sampled, "verify": _graded, "select": _selected, "pairs": _paired,
          "filter": _filtered}


def funnel_table(stages: list[FunnelStage]) -> str:
    if not stages:
        return "<p class=note>No dataset step has finished.</p>"
    widest = max(stage.rows for stage in stages) or 1

    def items(counts: list[Count], css: str) -> str:
        return "".join(f'<li class={css} data-stat="{html.escape(c.stat)}" data-count="{c.count}">'
                       f"{html.escape(c.label)} <b>{c.count:,}</b></li>" for c in counts)

    rows = []
    for stage in stages:
        source = f"<div class=from>from {html.escape(stage.source)}</div>" if stage.source else ""
        problems = "" if stage.problems is None else stage.problems
        rows.append(
            f'<tr class=funnel-stage data-step="{html.escape(stage.step)}" data-rows="{stage.rows}" '
            f'data-problems="{problems}">'
            f"<th>{html.escape(stage.step)}<div class=uses>{html.escape(stage.uses)}</div>{source}</th>"
            f"<td>{html.escape(stage.what)}</td>"
            f'<td class=rows>{stage.rows:,}<div class=bar style="width:{100 * stage.rows / widest:.1f}%"></div></td>'
            f"<td class=problems>{problems}</td>"
            f"<td><ul>{items(stage.breakdown, 'breakdown')}</ul></td>"
            f"<td><ul>{items(stage.dropped, 'dropped')}</ul></td></tr>")
    return ("<table class=funnel><thead><tr><th>step</th><th>rows are</th><th>rows</th><th>problems</th>"
            "<th>of which</th><th>left out, and why</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


# ---- training curves ----------------------------------------------------------------------------------------------

# Logged scalars that only count up (tokens, time) say nothing a curve shows better than the manifest's total.
COUNTERS = {"step", "epoch", "num_input_tokens_seen", "num_tokens", "train_runtime"}
CHART_WIDTH, CHART_HEIGHT, PAD = 300, 150, 46


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


# ---- evaluations --------------------------------------------------------------------------------------------------


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
    """pass@1 by round in this evaluation (`pipeline.commands.compare.by_round`), per benchmark: a chart and a table; empty
    unless the recipe has rounds and the evaluation holds two or more rounds' models."""
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


# ---- the sample browser's data ------------------------------------------------------------------------------------


def write_browser_data(workdir: Path, steps: list[StepView], data_dir: Path, rows_per_chunk: int) -> list[dict]:
    """Chunk files of every browsable dataset (a step's rows with completions, an evaluation's samples of one
    benchmark) and a small index per dataset (problem, model, label of every row) that filters run on; returns what
    the page needs to know of each: its name, title, row count and where its files are."""
    import datasets

    sources = []
    for step in steps:
        if not step.complete:
            continue
        if step.produces == "dataset" and "completion" in _columns(step.path / "data"):
            rows = _step_rows(datasets.load_from_disk(str(step.path / "data")), rows_per_chunk)
            sources.append(_write_source(len(sources), step.name, f"{step.name} ({step.uses})", rows, data_dir))
        elif step.uses == "evaluate" and (step.path / "samples").is_dir():
            samples = datasets.load_from_disk(str(step.path / "samples"))
            meta = json.loads((step.path / "results.json").read_text())["meta"]
            benchmark_of_row = samples["benchmark"]
            for benchmark in meta["n"]:
                of_benchmark = samples.select([row for row, name in enumerate(benchmark_of_row) if name == benchmark])
                rows = _evaluation_rows(of_benchmark, meta, benchmark, rows_per_chunk)
                sources.append(_write_source(len(sources), f"{step.name}/{benchmark}",
                                             f"{step.name}: {benchmark} (evaluate)", rows, data_dir))
    return sources


def _columns(data_dir: Path) -> list[str]:
    """A saved dataset's column names, read from its metadata without loading it."""
    try:
        return list(json.loads((data_dir / "dataset_info.json").read_text())["features"])
    except (OSError, ValueError, KeyError):
        return []


def _step_rows(dataset, rows_per_chunk: int):
    """A sample or verify dataset's rows as the browser shows them, a chunk at a time."""
    for batch in dataset.iter(batch_size=rows_per_chunk):
        count = len(batch["completion"])

        def column(name, default=None):
            return batch.get(name) or [default] * count

        prompts = column("prompt") if "prompt" in batch else [[{"role": "user", "content": p}]
                                                              for p in column("problem", "")]
        yield [{"id": str(problem_id), "model": model or "", "sample": sample, "label": label,
                "prompt": prompt, "completion": (prefix or "") + (completion or ""), "extracted": extracted,
                "answer": answer, "finish": finish}
               for problem_id, model, sample, label, prompt, prefix, completion, extracted, answer, finish in zip(
                   column("id"), column("model"), column("sample_idx"), column("label"), prompts,
                   column("think_prefix", ""), batch["completion"], column("extracted"), column("answer"),
                   column("finish_reason"))]


def _evaluation_rows(samples, meta: dict, benchmark: str, rows_per_chunk: int):
    """An evaluation's samples of one benchmark, with the prompt each was sampled from: its samples keep no prompt,
    so it is rendered again from the benchmark file, if that file is still the one evaluated."""
    prompts = _benchmark_prompts(meta, benchmark)
    for batch in samples.iter(batch_size=rows_per_chunk):
        yield [{"id": str(problem_id), "model": model, "sample": sample, "label": label,
                "prompt": prompts.get(problem_id, [{"role": "note", "content": "(the benchmark file changed or is "
                                                                               "gone: prompt not shown)"}]),
                "completion": meta["models"][model]["completion_prefix"] + completion, "extracted": extracted,
                "answer": answer, "finish": finish}
               for problem_id, model, sample, label, completion, extracted, answer, finish in zip(
                   batch["id"], batch["model"], batch["sample_idx"], batch["label"], batch["completion"],
                   batch["extracted"], batch["answer"], batch["finish_reason"])]


def _benchmark_prompts(meta: dict, benchmark: str) -> dict[str, list[dict]]:
    from eval.benchmarks import load_benchmark
    from pipeline.steps.evaluate import _sha256_files
    from pipeline.text.prompts import render_prompt

    try:
        source, problems = load_benchmark(benchmark)
    except UserError:
        return {}
    if _sha256_files([source.path]) != meta["benchmarks"][benchmark]["sha256"]:
        return {}
    return {row["id"]: [{"role": "user", "content": render_prompt(meta["prompt_template"], row)}]
            for row in problems}


def _write_source(number: int, name: str, title: str, chunks, data_dir: Path) -> dict:
    """Write one dataset's chunk files and index file; what the page knows of it. The files are named by its number
    and its name, made safe for a file name."""
    stem = f"{number:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
    problems, models, labels, index_rows = {}, {}, {}, []
    for chunk, rows in enumerate(chunks):
        (data_dir / f"{stem}-{chunk:04d}.js").write_text(
            f"distillReport.chunkLoaded({json.dumps(name)}, {chunk}, {_json(rows)});\n", encoding="utf-8")
        index_rows += [[problems.setdefault(row["id"], len(problems)), models.setdefault(row["model"], len(models)),
                        -1 if row["label"] is None else labels.setdefault(row["label"], len(labels))] for row in rows]
    index = {"problems": list(problems), "models": list(models), "labels": list(labels), "rows": index_rows}
    (data_dir / f"{stem}-index.js").write_text(f"distillReport.indexLoaded({json.dumps(name)}, {_json(index)});\n",
                                               encoding="utf-8")
    return {"name": name, "title": title, "rows": len(index_rows), "files": f"{DATA_DIR}/{stem}"}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _script_json(value) -> str:
    """JSON to inline in a <script> element: `</` would end the element early."""
    return _json(value).replace("</", "<\\/")


PAGE_TEMPLATE = """<!doctype html>
<html lang=en>
<head>
<meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<meta name=generator content="distill report">
<title>{title}</title>
<style>
{style}
</style>
</head>
<body>
<header><h1>{title}</h1><p>workdir <code>{workdir}</code>, recipe <code>{recipe}</code></p>
<nav><a href="#recipe">recipe</a> <a href="#funnel">data funnel</a> <a href="#training">training</a>
<a href="#evaluations">evaluations</a> <a href="#samples">samples</a></nav></header>
<main>
<section id=recipe><h2>Recipe</h2>
<p class=note>Each step with its type, state, rows, seconds and key, as <code>distill status</code> shows them; arrows
run from the steps it reads.</p>
<div class=graph-box>{graph}</div></section>
<section id=funnel><h2>Data funnel</h2>
<p class=note>Rows per step, from each step's manifest, and what it left out.</p>
{funnel}</section>
<section id=training><h2>Training</h2>{curves}</section>
<section id=evaluations><h2>Evaluations</h2>{evaluations}</section>
<section id=samples><h2>Samples</h2>
<form id=browser-controls onsubmit="return false">
<label>dataset <select id=browser-source></select></label>
<label>label <select id=browser-label></select></label>
<label>model <select id=browser-model></select></label>
<label>problem id contains <input id=browser-problem size=16></label>
<button type=button id=browser-previous>previous</button> <button type=button id=browser-next>next</button>
</form>
<p id=browser-status class=note></p>
<div id=browser-samples></div>
</section>
</main>
<script id=browser-sources type="application/json">{browser_sources}</script>
<script>
{script}
</script>
</body>
</html>
"""

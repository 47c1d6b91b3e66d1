"""Writes the run page: reads the workdir's steps, assembles the sections (pipeline/commands/run_report/*) into the
page's template with its inlined assets, and swaps the finished run-report/ dir in (the package docstring says what
the page shows)."""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

from pipeline.commands.run_report.agreement import agreement_tables
from pipeline.commands.run_report.browser_data import DATA_DIR, compact_json, write_browser_data
from pipeline.commands.run_report.curves import is_trainer, training_curves
from pipeline.commands.run_report.evaluations import evaluation_section, rounds_section
from pipeline.commands.run_report.funnel import funnel, funnel_table
from pipeline.commands.run_report.graph import steps_graph
from pipeline.commands.run_report.step_views import read_steps
from pipeline.core.errors import UserError
from pipeline.core.outputs import REPORT, RUN_FILE, claim_dir, mark, never_written
from pipeline.core.workdir import old_dir_of, tmp_dir_of, workdir_lock

REPORT_DIR = "run-report"
PAGE = "index.html"
ROWS_PER_CHUNK = 200
ASSETS = Path(__file__).with_name("assets")


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
    tmp_dir = tmp_dir_of(workdir, REPORT_DIR)
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
        funnel=funnel_table(funnel(steps)) + agreement_tables(steps),
        curves="\n".join(training_curves(step) for step in steps if is_trainer(step))
        or "<p class=note>No training step has finished.</p>",
        evaluations="\n".join(evaluations) or "<p class=note>No evaluate step has finished.</p>",
        browser_sources=_script_json({"sources": sources, "rowsPerChunk": rows_per_chunk}),
        script=(ASSETS / "report.js").read_text(),
    )
    (tmp_dir / PAGE).write_text(page)
    if final_dir.exists():
        old = old_dir_of(workdir, REPORT_DIR)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir / PAGE


def _script_json(value) -> str:
    """JSON to inline in a <script> element: `</` would end the element early."""
    return compact_json(value).replace("</", "<\\/")


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

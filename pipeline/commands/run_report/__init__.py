"""`distill report WORKDIR`: one page that shows a run, written to <workdir>/run-report/index.html.

The page opens from disk in any browser and fetches nothing: its CSS and script (assets/) are inlined, the evaluation
plots are copied beside it, and it shows

    the recipe       the steps as a graph (arrows from what each step reads), with state, rows, seconds and key, as
                     `distill status WORKDIR` reads them (recipe.json and each step's manifest.json)
    the data funnel  problems -> samples -> graded (by label) -> selected / pairs -> trained rows, and why rows were
                     dropped, from the manifests' stats (each step module's `funnel_stage` hook says what its stats
                     mean: pipeline.core.funnel)
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

    page.py          writes the page: reads the steps, assembles the sections into its template, swaps it in
    step_views.py    the run's steps as the page shows them (state, rows, parents, manifest)
    graph.py         the recipe as an inline SVG graph
    funnel.py        the data funnel table
    curves.py        the training curves (inline SVG line charts)
    evaluations.py   the evaluate steps' reports, and pass@1 by round
    browser_data.py  the sample browser's chunk and index files
    assets/          the page's CSS and script, inlined into it (package data in setup.cfg)
"""

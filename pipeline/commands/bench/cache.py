"""`distill bench cache`: wall seconds of re-running a finished recipe, in a fresh process as a user would.

The recipe runs once into a temporary workdir (every step runs), then again with the same command: every step
must be skipped, and that second run's wall time (Python start-up, imports, recipe validation, hashing, reading
manifests, printing) is the number.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time


def run_recipe(recipe: str, workdir: str) -> tuple[float, str]:
    command = [sys.executable, "-m", "pipeline.commands.cli", "run", recipe, "-o", f"workdir={workdir}"]
    started = time.perf_counter()
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"bench cache: `{' '.join(command)}` failed (exit code {process.returncode}):\n"
                           + process.stdout[-3000:])
    return seconds, process.stdout


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as workdir:
        first, _ = run_recipe(opts.recipe, workdir)
        rerun, output = run_recipe(opts.recipe, workdir)
    if " 0 step(s) ran" not in output:
        raise RuntimeError(f"bench cache: the re-run of {opts.recipe} ran steps again:\n{output[-2000:]}")
    table = Table(title=f"distill bench cache — {opts.recipe}")
    table.add_column("run")
    table.add_column("wall seconds", justify="right")
    table.add_row("first (every step runs)", f"{first:.1f}")
    table.add_row("re-run (every step cached)", f"{rerun:.2f}")
    console.print(table)
    return {"recipe": opts.recipe, "first_run_s": round(first, 2), "rerun_s": round(rerun, 2)}, \
        {"cached_rerun_s": round(rerun, 2)}

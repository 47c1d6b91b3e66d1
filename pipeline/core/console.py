"""What `distill run` shows while a step runs, and where everything else written meanwhile goes.

On the terminal a step is one progress row while it runs (what it counts, how far, the rate, the time left, and a note:
the phase, the last loss), then the runner's one summary line. Everything else written while it runs -- by the step, by
vLLM, transformers, datasets, TRL and accelerate, by Python warnings and logging, and by child processes (the vLLM
engine, `accelerate launch`) -- goes to the step's log file: `step_console` points file descriptors 1 and 2 at it, so
nothing escapes it, whichever process or library writes and however.

Read top to bottom:

- `step_console`: the runner runs each step inside it: the log file, library progress bars off, the step's row;
- `progress`: how a step counts its work on that row (`bar.advance()`, `bar.update(...)`, `bar.phase(...)`);
- `user_console`: where a step prints what the user should see (evaluate's table) while its output is captured;
- `Display`: the row: live (rich) on a terminal; otherwise a plain line at each phase, at each tenth of the work and
  every PLAIN_LINE_SECONDS while it advances, without control characters (CI logs, nohup);
- `environment`, `_output_to`, `_quiet_libraries`: the pieces `step_console` is made of.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

# Without a terminal, the longest wait between two progress lines while the work advances.
PLAIN_LINE_SECONDS = 10.0

_step_display: Display | None = None  # the row of the step running now, while `step_console` runs it


@contextmanager
def step_console(title: str, log_path: Path | None) -> Iterator[None]:
    """Run a step inside this: its progress row titled `title`, and everything written to stdout and stderr while it
    runs appended to `log_path` (None: shown as it comes, for `distill run --verbose`). The row is live only on a
    terminal whose output is captured: output written across a live row would tear it."""
    global _step_display
    with ExitStack() as stack:
        if log_path is None:
            terminal, live = sys.stdout, False
        else:
            terminal = stack.enter_context(_output_to(log_path))
            stack.enter_context(_quiet_libraries())
            live = terminal.isatty()
        _step_display = stack.enter_context(Display(title, terminal, live=live))
        try:
            yield
        finally:
            _step_display = None


@contextmanager
def progress(label: str = "", *, total: int | None = None, unit: str = "", completed: int = 0) -> Iterator[Display]:
    """Count a step's work on its progress row: `total` `unit` (None: not known yet), `completed` of them done already
    (by an interrupted run). `label` says what is counted when the step counts several things in turn. Outside a step
    (tests, `distill eval`), a row of its own, printing plain lines on stdout."""
    if _step_display is None:
        with Display(label, sys.stdout, live=False) as display:
            display.count("", total=total, unit=unit, completed=completed)
            yield display
        return
    _step_display.count(label, total=total, unit=unit, completed=completed)
    try:
        yield _step_display
    finally:
        _step_display.count("")  # back to the step's spinner


def user_console() -> Console:
    """A console on the user's terminal, also while a step's output is captured; above the step's row while it runs."""
    return _step_display.console if _step_display is not None else Console()


class Display:
    """A progress row: its title (the step), what it counts (label, total, unit), how far, and a note."""

    def __init__(self, title: str, file: TextIO, *, live: bool):
        self.title, self.file, self.live = title, file, live
        # rich asks fds 0-2 for the terminal's width, and 1 and 2 are the log while a step runs (0: a pty of no size)
        width = (os.get_terminal_size(file.fileno()).columns or None) if live else None
        self._rich = Progress(
            # the description and the note share what the numbers leave of the line, cut with … when it is short
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=20), _CountColumn(), _RateColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            expand=True,
            console=Console(file=file, width=width), transient=True, disable=not live,
            # fds 1 and 2 are the log while the step runs: Python's prints must go there, not above the row
            redirect_stdout=False, redirect_stderr=False,
            # the rate over the whole count, not over rich's default 30 s: chunks can be minutes apart
            speed_estimate_period=3600)
        self._task = self._rich.add_task(title, total=None, unit="", note="")
        self._line_at = time.monotonic()  # when the last plain line was printed
        self._line_tenth = -1  # the tenth of the total that line showed

    @property
    def console(self) -> Console:
        return self._rich.console

    def __enter__(self) -> Display:
        self._rich.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._rich.stop()

    def count(self, label: str, *, total: int | None = None, unit: str = "", completed: int = 0) -> None:
        """Start counting something else: a fresh count, its rate and time left measured from now."""
        self._rich.remove_task(self._task)
        self._task = self._rich.add_task(f"{self.title} {label}".strip(), total=total, completed=completed, unit=unit,
                                         note="")
        self._line_at, self._line_tenth = time.monotonic(), self._tenth()

    def advance(self, amount: int = 1) -> None:
        self._rich.advance(self._task, amount)
        self._plain_line()

    def update(self, *, completed: int | None = None, total: int | None = None, note: str | None = None) -> None:
        """Set how far the count is, its total (once known) or the note (the last loss, say); None leaves it."""
        self._rich.update(self._task, completed=completed, total=total, **({"note": note} if note is not None else {}))
        self._plain_line()

    def phase(self, text: str) -> None:
        """What the step is doing now ("loading model", "generating"): the note, and without a terminal a line."""
        self._rich.update(self._task, note=text)
        self._plain_line(now=True)

    def _tenth(self) -> int:
        task = self._current()
        return int(10 * task.completed / task.total) if task.total else -1

    def _current(self) -> Task:
        return self._rich.tasks[0]  # the row's one task

    def _plain_line(self, now: bool = False) -> None:
        if self.live:
            return
        tenth = self._tenth()
        if now or tenth > self._line_tenth or time.monotonic() - self._line_at >= PLAIN_LINE_SECONDS:
            self.file.write(_plain(self._current()) + "\n")
            self.file.flush()
            self._line_at, self._line_tenth = time.monotonic(), tenth


def _plain(task: Task) -> str:
    """The row as a line: `[2/5] samples: 12/40 chunks, 0.31 chunks/s, ETA 1m30s, generating`."""
    unit, parts = task.fields["unit"], []
    if task.total is not None:
        parts.append(f"{int(task.completed)}/{int(task.total)} {unit}".rstrip())
        if not task.finished and task.speed:
            parts += [_rate(task), f"ETA {_duration(task.time_remaining)}"]
    if task.fields["note"]:
        parts.append(task.fields["note"])
    return f"{task.description or 'progress'}: {', '.join(parts)}"


def _rate(task: Task) -> str:
    speed = f"{task.speed:,.0f}" if task.speed >= 100 else f"{task.speed:.3g}"  # 0.0312, 3.12, 31.2, 3,120
    return f"{speed} {task.fields['unit']}/s" if task.fields["unit"] else f"{speed}/s"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)} {task.fields['unit']}", style="progress.download")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if not task.speed or task.finished:
            return Text("")
        return Text(_rate(task), style="progress.data.speed")


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """These environment variables while the block runs (child processes started in it inherit them); then the
    environment as it was."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _output_to(log_path: Path) -> Iterator[TextIO]:
    """File descriptors 1 and 2 appending to `log_path` while the block runs, so what this process writes, by any
    means, and what its child processes write (they inherit the descriptors) lands there; yields a file on the stdout
    they pointed at before, for the progress row."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # C code (torch, tokenizers) buffers its stdio when it writes to a file: flushed now, it lands in the log
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Library progress bars off while a captured step runs: in a log file each refresh is another line. The
    environment reaches child processes (the vLLM engine, `accelerate launch`) and libraries not imported yet; the
    calls reach those this process has imported (they stay off: every captured step wants them off)."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars

    datasets.disable_progress_bars()
    disable_progress_bars()  # transformers takes its own switch from this one when it is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
    with environment(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1"):
        yield

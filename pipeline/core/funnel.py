"""What a step made of its input, as the data funnel of `distill report`'s page shows it.

A step module says it with a module-level hook, read from the stats of its manifest:

    def funnel_stage(stats: dict) -> FunnelStage

what its rows are, how many problems they cover, how they divide (labels, finish reasons) and what it left out, and
why. The page (pipeline/commands/run_report/funnel.py) asks the step registry for the hook; a step without one shows
`trained_stage` when it made a model, else plain rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Count:
    """One number of a funnel stage: the manifest stat it comes from (or how it is derived), and what it counts."""

    stat: str
    label: str
    count: int


@dataclass
class FunnelStage:
    """What a dataset-making or training step turned its input into."""

    what: str  # what its rows are
    problems: int | None
    breakdown: list[Count] = field(default_factory=list)  # how its rows divide (labels, finish reasons)
    dropped: list[Count] = field(default_factory=list)  # what it left out, and why (the page lists the counts above 0)


def trained_stage(stats: dict, *dropped: Count) -> FunnelStage:
    """A training step's stage: the rows it trained on, the rows it dropped as longer than max_length (the
    `dropped_truncated` every training step records), then what else it says it `dropped`."""
    return FunnelStage("rows trained on", None, dropped=[
        Count("dropped_truncated", "rows longer than max_length", stats.get("dropped_truncated", 0)), *dropped])

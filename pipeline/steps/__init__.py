"""The steps a recipe's `uses:` names: one module per step, each with one pydantic `Config` (its fields carry the help
text `distill steps` prints) and one `run(cfg, inputs, out)`. A step whose rows the run page's data funnel should
describe (what they are, what it left out and why) adds a module-level `funnel_stage(stats) -> FunnelStage`
(`pipeline.core.funnel`), read from its manifest's stats.

A step reads what lower layers give it (`pipeline.core`, `pipeline.text`, `pipeline.engines`, `pipeline.training`,
`eval`) and never imports another step. The base class and the registry are in `pipeline.core.step`; a user's own
step module subclasses `pipeline.core.step.StepConfig` (also importable from here) and is named in `uses:` by its
dotted path.
"""

from pipeline.core.step import StepConfig

__all__ = ["StepConfig"]

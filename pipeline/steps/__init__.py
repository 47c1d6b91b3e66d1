"""The steps a recipe's `uses:` names: one module per step, each with one pydantic `Config` (its fields carry the help
text `distill steps` prints) and one `run(cfg, inputs, out)`.

A step reads what lower layers give it (`pipeline.core`, `pipeline.text`, `pipeline.engines`, `pipeline.training`,
`eval`) and never imports another step. The base class and the registry are in `pipeline.core.step`; a user's own
step module subclasses `pipeline.core.step.StepConfig` (also importable from here) and is named in `uses:` by its
dotted path.
"""

from pipeline.core.step import StepConfig

__all__ = ["StepConfig"]

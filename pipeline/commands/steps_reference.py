"""`distill steps`: the step reference, generated from the code, so it never drifts from it.

For every registered step type (`pipeline.core.step.STEP_MODULES`), or the types named on the command line (a
user's step module by its dotted path too): the first paragraph of its module docstring, what it writes, whether it
draws random numbers, the libraries whose versions are part of its key, and a table of its `Config` fields (name as
a recipe writes it, type with its bounds, default, and the pydantic `Field` description). A field holding nested
settings (`lora`) gets a row for each of them as well (`lora.r`). `--markdown` prints the same as Markdown:
docs/steps.md is that output, and tests/test_docs.py fails when it differs.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.core.step import STEP_MODULES, StepConfig, step_module

PRODUCES = {
    "dataset": "a dataset: `data/` (`datasets.load_from_disk`)",
    "model": "a model: `model/` (a Hugging Face model or peft adapter dir)",
    "report": "a report: files in the step dir (`results.json`, `report.md`, plots)",
}
# how annotated_types' bounds read in the type column
BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
DOC_HEADER = """# Step reference

Every step type a recipe's `uses:` names, with its settings: the fields of its `Config` class, their types,
defaults and help text. Unknown keys are refused. Written by `distill steps --markdown > docs/steps.md` from the
code (`tests/test_docs.py` fails when this file is out of date); how steps chain, and what the keys are, is in
[recipes.md](recipes.md).
"""


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="STEP",
                        help="step types to show (default: every registered one); a dotted path names your own module")
    parser.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/steps.md)")
    parser.set_defaults(func=cmd_steps)


def cmd_steps(args) -> int:
    names = args.names or list(STEP_MODULES)
    modules = {name: step_module(name) for name in names}  # an unknown name is a UserError before anything prints
    text = markdown(modules) if args.markdown else plain_text(modules)
    sys.stdout.write(text)
    return 0


def summary(module) -> str:
    """The first paragraph of a step module's docstring, on one line."""
    paragraph = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def facts(config: type[StepConfig]) -> list[tuple[str, str]]:
    """What a step writes and what its key covers besides its settings, as (label, text)."""
    seed = ("yes: keyed with its seed (its own `seed:`, else the recipe's)" if config.uses_seed else
            "no: keyed without a seed, so `distill run --seeds` runs it once for all seeds with the same inputs")
    libraries = ", ".join(f"`{name}`" for name in config.libraries) or "none"
    return [("Writes", PRODUCES[config.produces]), ("Draws random numbers", seed),
            ("Library versions in its key", libraries)]


def field_rows(config: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) per field: StepConfig's own first, then those the step's `Config` declares,
    then the ones it inherits from shared settings; nested settings follow their field as `field.sub`."""
    fields = config.model_fields
    declared = [name for name in vars(config).get("__annotations__", {}) if name in fields]
    order = ([name for name in StepConfig.model_fields if name in fields] if issubclass(config, StepConfig) else [])
    order += [name for name in declared if name not in order]
    order += [name for name in fields if name not in order]
    rows = []
    for name in order:
        info = fields[name]
        key = prefix + (info.alias or name)
        rows.append((key, type_text(info), default_text(info), " ".join((info.description or "").split())))
        for nested in _nested_models(info.annotation):
            rows += field_rows(nested, prefix=f"{key}.")
    return rows


def type_text(info: FieldInfo) -> str:
    """`int | None`, `'local' | 'ray'`, `list[str]`, with the field's bounds (`int, ≥ 1`)."""
    text = _annotation_text(info.annotation)
    bounds = [f"{BOUNDS[attr]} {getattr(item, attr)}" for item in info.metadata for attr in BOUNDS
              if getattr(item, attr, None) is not None]
    return ", ".join([text, *bounds])


def default_text(info: FieldInfo) -> str:
    """The default as a recipe would write it (YAML, which reads JSON): `null`, `true`, `"text"`; "required"."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    return json.dumps(_plain(value), ensure_ascii=False)


def markdown(modules: dict[str, Any]) -> str:
    lines = [DOC_HEADER, "| step | writes | what it does |", "|---|---|---|"]
    for name, module in modules.items():
        anchor = name.replace(".", "")  # GitHub's heading anchor of a dotted module path
        what = _prose(_first_sentence(summary(module)))
        lines.append(f"| [`{name}`](#{anchor}) | {module.Config.produces} | {what} |")
    for name, module in modules.items():
        lines += ["", f"## {name}", "", _prose(summary(module)), ""]
        lines += [f"- {label}: {text}" for label, text in facts(module.Config)]
        lines += ["", "| field | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {_prose(kind)} | {_default_cell(default)} | {_prose(description)} |"
                  for key, kind, default, description in field_rows(module.Config)]
    return "\n".join(lines) + "\n"


def plain_text(modules: dict[str, Any]) -> str:
    lines = []
    for name, module in modules.items():
        lines += [f"{name}: {summary(module)}"]
        lines += [f"  {label}: {text.replace('`', '')}" for label, text in facts(module.Config)]
        for key, kind, default, description in field_rows(module.Config):
            lines += [f"  {key} ({kind}; default {default})", f"      {description}"]
        lines.append("")
    return "\n".join(lines)


def _annotation_text(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _annotation_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_annotation_text(arg) for arg in args)
    if origin is Literal:
        return " | ".join(json.dumps(arg) if isinstance(arg, str) else repr(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_annotation_text(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "settings (below)"
    return getattr(annotation, "__name__", str(annotation))


def _nested_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field holds directly (`LoraSettings | None`), whose fields get rows of their own."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return [model for arg in typing.get_args(annotation) for model in _nested_models(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _plain(value):
    """A default as JSON can write it: nested settings as their fields, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True)
    if isinstance(value, tuple):
        return list(value)
    return value


def _first_sentence(text: str) -> str:
    """A summary's first sentence without its leading "`name`: " (the index table's one line)."""
    head = text.split(": ", 1)[1] if text.startswith("`") and ": " in text else text
    return head.split(". ")[0].rstrip(".")


def _default_cell(default: str) -> str:
    return default if default == "required" else f"`{_cell(default)}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped (GFM honours `\\|` inside code spans too)."""
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Help text as Markdown: table-safe, and `<` outside code spans written `&lt;`, so that `<think>` or
    `<recipe>/<step>` shows instead of being read as an HTML tag."""
    parts = text.split("`")
    return _cell("`".join(part if index % 2 else part.replace("<", "&lt;") for index, part in enumerate(parts)))

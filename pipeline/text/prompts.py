"""Prompt templates: the default one every sampling step starts from, and filling a template's `{column}`
placeholders from a data row (sample, evaluate, opsd, onpolicy and the run page render prompts the same way)."""

from __future__ import annotations

import re

DEFAULT_PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
# {name} placeholders; braces holding anything else ("\boxed{}", "\frac{a}{b}") stay as written.
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render_prompt(template: str, row: dict) -> str:
    """The template with each {column} placeholder filled from `row`."""
    return _PLACEHOLDER.sub(lambda m: str(row[m.group(1)]) if m.group(1) in row else m.group(0), template)

"""The recipe document between its YAML and its validation: a copy in which nothing is shared (`unshared`), the
`-o key.path=value` overrides applied (`apply_override`), `models:` entries pinned as {id, revision} written as
references (`pin_models`), and `${dotted.path}` references resolved against the document itself
(`resolve_references`). What comes out is what `Recipe.document` records.

References are followed along their chain, so one that leads back to itself is refused as a cycle, and what they add
to the document is bounded (MAX_REFERENCE_SIZE, MAX_REFERENCE_DEPTH).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from pipeline.core import strict_yaml
from pipeline.core.errors import UserError

REFERENCE = re.compile(r"\$\{([^}]*)\}")
MAX_REFERENCE_SIZE = 200_000  # values (and 64-character pieces of strings) that `${...}` references may add
MAX_REFERENCE_DEPTH = 128  # levels of nesting plus links of reference chains while resolving (bounds the recursion)


def unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice (YAML aliases share them), so that an override or a resolved
    reference changes one place only. The YAML reader bounds the size of the copy."""
    if isinstance(value, dict):
        return {k: unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unshared(v) for v in value]
    return value


def apply_override(doc: dict, override: str) -> None:
    """`steps.samples.n=8`: the value is read as YAML (8 -> int, true -> bool, [a, b] -> list)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. steps.sample.n=8")
    try:
        value = strict_yaml.parse(raw)[0] if raw.strip() else ""
    except strict_yaml.Refused as e:  # a duplicate key, a recursive alias: refused as in the file
        raise UserError(f"override {override!r}: {strict_yaml.describe(e)}") from None
    except yaml.YAMLError:
        value = raw
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {override!r}: {'.'.join(parts[:i + 1])} is a {type(child).__name__}, "
                            "not a mapping")
        node = child
    node[parts[-1]] = value


def _lookup(doc: Any, dotted: str) -> tuple[Any, tuple]:
    """The value at a dotted key path, and that path as the document spells it (list indices as ints)."""
    node, path = doc, ()
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node, path = node[part], path + (part,)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node, path = node[int(part)], path + (int(part),)
        else:
            raise KeyError(dotted)
    return node, path


class _TooLarge(Exception):
    pass


def resolve_references(doc: dict) -> tuple[dict, list[tuple[tuple, str]]]:
    """Replace `${a.b}` by the value at a.b. A whole-string reference keeps the value's type.

    A reference is followed along its chain: one that leads back to a reference being resolved is a cycle, reported
    where it is written. Each target is resolved once; what its copies add to the document is bounded by
    MAX_REFERENCE_SIZE, so a few references that each copy the one before cannot blow the document up. On a cycle or
    a missing key the reference resolves to None; past a bound `doc` itself is returned, unresolved."""
    problems: list[tuple[tuple, str]] = []
    resolved: dict[str, tuple[Any, int]] = {}  # reference -> (its value resolved, that value's size)
    added = 0  # the size of what references added so far

    def add(size: int, path: tuple) -> None:
        nonlocal added
        added += size
        if added > MAX_REFERENCE_SIZE:
            raise _TooLarge(path, f"references expand the recipe past {MAX_REFERENCE_SIZE} values (each ${{...}} "
                                  "copies what it names, with the references in it)")

    def resolve(value, path: tuple, chain: tuple[tuple[str, tuple], ...], depth: int = 0) -> tuple[Any, int]:
        """(value with its references replaced, its size: one per value, and one per 64 characters of a string).
        `chain`: the references being resolved, outermost first, each with the key path it is written at."""
        if depth > MAX_REFERENCE_DEPTH:
            raise _TooLarge(path, f"references nest the recipe more than {MAX_REFERENCE_DEPTH} levels deep")
        if isinstance(value, dict):
            items = {k: resolve(v, path + (k,), chain, depth + 1) for k, v in value.items()}
            return {k: v for k, (v, _) in items.items()}, 1 + sum(size for _, size in items.values())
        if isinstance(value, list):
            items = [resolve(v, path + (i,), chain, depth + 1) for i, v in enumerate(value)]
            return [v for v, _ in items], 1 + sum(size for _, size in items)
        if not isinstance(value, str) or "${" not in value:
            return value, 1 + (len(value) // 64 if isinstance(value, str) else 0)

        def target(ref: str) -> tuple[Any, int]:
            name = ref.strip()
            names = [link for link, _ in chain]
            if name in names:
                loop = chain[names.index(name):] + ((name, path),)
                cycle = (f"${{{name}}} is (or holds) the value this reference is written in" if len(loop) == 2 else
                         " -> ".join(f"${{{link}}}" for link, _ in loop))
                # reported where each reference of the loop is written: each resolves to None
                problems.extend((at, f"reference cycle ({cycle})") for _, at in loop)
                return None, 1
            if name not in resolved:
                try:
                    written, at = _lookup(doc, name)
                except KeyError:
                    problems.append((path, f"${{{ref}}} refers to a key that does not exist"))
                    return None, 1
                resolved[name] = resolve(written, at, chain + ((name, path),), depth + 1)
            value, size = resolved[name]
            add(size, path)
            return copy.deepcopy(value), size

        whole = REFERENCE.fullmatch(value)
        if whole:
            return target(whole.group(1))
        text = REFERENCE.sub(lambda m: str(target(m.group(1))[0]), value)
        add(len(text) // 64, path)
        return text, 1 + len(text) // 64

    try:
        return resolve(doc, (), ())[0], list(dict.fromkeys(problems))
    except _TooLarge as too_large:
        return doc, [too_large.args]


def pin_models(models: Any) -> list[tuple[tuple, str]]:
    """`models: {base: {id: org/name, revision: COMMIT}}` -> `base: org/name@COMMIT`, in place, before references
    resolve (so `${models.base}` is the pinned reference)."""
    problems: list[tuple[tuple, str]] = []
    for name, ref in (models.items() if isinstance(models, dict) else []):
        if not isinstance(ref, dict):
            continue
        unknown = set(ref) - {"id", "revision"}
        if unknown or not isinstance(ref.get("id"), str) or not isinstance(ref.get("revision", ""), (str, int)):
            problems.append((("models", name), "a model is a reference string or a mapping {id: org/name, revision: "
                                               f"COMMIT}}, got {ref!r}"))
            continue
        models[name] = f"{ref['id']}@{ref['revision']}" if ref.get("revision") else ref["id"]
    return problems

"""YAML read strictly: every recipe (and any other YAML a user hands us) goes through `parse` or `load_file`.

On top of PyYAML's safe loader (plain data only: no Python objects), a document is refused, with the line, when:

- a mapping holds one key twice (`workdir:` twice, two steps of one name): plain YAML keeps the last silently;
  a key a merge (`<<: *defaults`) brings in may still be overridden, that is what merges are for;
- an alias points into the collection that holds it (`a: &x [*x]`), a structure no walk of it ever ends;
- aliases expand it past MAX_NODES values or MAX_DEPTH levels (`a: &a [x, x]`, `b: &b [*a, *a]`, ... doubles at
  each line: "billion laughs"), which every later walk of the document (references, validation, the record in
  recipe.json) would pay for in time and memory;
- a scalar cannot be read as what its tag or form says (`2001-02-30` is a date, `!!int x`, an integer of more
  than 4300 digits), which PyYAML raises as a bare ValueError;
- the file is larger than MAX_BYTES or is not UTF-8 text (a named pipe no process writes to reads as empty, it is
  not waited on).
A duplicate key is named with the key path of its mapping (`duplicate key 'a' in 'steps'`).
Every refusal is a `yaml.YAMLError` from `parse` (a `Refused` one has a problem and a mark, like PyYAML's own) and a
`UserError` naming the file and line from `load_file`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import CollectionNode, MappingNode, ScalarNode, SequenceNode

from pipeline.core.errors import UserError

MAX_BYTES = 4 << 20  # a recipe is a few KiB; this bounds what reading one can cost
MAX_NODES = 100_000  # values in the document once every alias is expanded
MAX_DEPTH = 64  # nesting levels, aliases expanded
MERGE_TAG = "tag:yaml.org,2002:merge"


class Refused(yaml.YAMLError):
    """A document the strict loader refuses; `problem` and `problem_mark` as in PyYAML's MarkedYAMLError."""

    def __init__(self, problem: str, mark=None):
        self.problem, self.problem_mark = problem, mark
        super().__init__(problem)

    def __str__(self) -> str:
        return describe(self)


def describe(error: yaml.YAMLError, what: str = "") -> str:
    """`line L, column C: {what}problem` for any YAMLError (the line and column where PyYAML gives them)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or (Exception.__str__(error) if isinstance(error, Refused) else
                                                  str(error))
    return where + what + problem


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, recursive aliases and values it cannot construct (see the module)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._path: list = []  # the key (or index) of each node being composed, outermost first

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            # a collection is registered under its anchor before its items are composed and gets its end mark
            # after: an alias to one without an end mark is inside it
            if isinstance(target, CollectionNode) and target.end_mark is None:
                raise Refused(f"alias *{event.anchor} refers to the collection that contains it (&{event.anchor} at "
                              f"line {target.start_mark.line + 1}): a recursive structure", event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        self._path.append(index.value if isinstance(index, ScalarNode) else index)
        try:
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._path.pop()

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # a merge is meant to be overridden; a collection key is refused as unhashable later
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue
            if first is not key_node:
                read_as = f" (read as {key!r})" if str(key) != key_node.value else ""
                # a sequence item's index is None here (PyYAML passes none): shown as []
                inside = ".".join("[]" if part is None else str(part) for part in self._path[1:])
                raise Refused(f"duplicate key {_shown(str(key_node.value))}{read_as}"
                              + (f" in {_shown(inside)}" if inside else "") + f" (first at line "
                              f"{first.start_mark.line + 1}): YAML would keep only the last one",
                              key_node.start_mark)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as error:  # PyYAML's own errors are YAMLError, not these
            what = _shown(node.value) if isinstance(node, ScalarNode) else "this value"
            tag = node.tag.rsplit(":", 1)[-1]
            raise Refused(f"cannot read {what} as {tag}: {error}", node.start_mark) from None


def _measure(root) -> None:
    """Refuse a node graph that, aliases expanded, holds more than MAX_NODES values or nests deeper than MAX_DEPTH.
    Each node is measured once (aliases share nodes), so this costs the size of the file, not of the expansion."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded

    def measure(node, depth: int) -> tuple[int, int]:
        if id(node) not in measured:
            if depth > MAX_DEPTH:
                raise Refused(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded", node.start_mark)
            children = ([item for pair in node.value for item in pair] if isinstance(node, MappingNode) else
                        node.value if isinstance(node, SequenceNode) else [])
            sizes = [measure(child, depth + 1) for child in children]
            measured[id(node)] = (1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
            if measured[id(node)][0] > MAX_NODES:
                raise Refused(f"aliases expand this to more than {MAX_NODES} values", node.start_mark)
        size, height = measured[id(node)]
        if depth + height > MAX_DEPTH + 1:
            raise Refused(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded", node.start_mark)
        return size, height

    measure(root, 1)


def parse(text: str) -> tuple[Any, dict[tuple, int]]:
    """The data in `text`, and {key path: line} for every key and item (to point errors into the file).
    Raises yaml.YAMLError (`Refused` for what the strict loader refuses)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _measure(node)
        data = loader.construct_document(node)
    except RecursionError:  # not reached with MAX_DEPTH as it is; a refusal all the same
        raise Refused(f"nested too deeply to read (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}

    def walk(n, path):
        if isinstance(n, MappingNode):
            for k, v in n.value:
                key_path = path + (k.value,)
                lines.setdefault(key_path, k.start_mark.line + 1)
                walk(v, key_path)
        elif isinstance(n, SequenceNode):
            for i, v in enumerate(n.value):
                lines.setdefault(path + (i,), v.start_mark.line + 1)
                walk(v, path + (i,))

    walk(node, ())
    return data, lines


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a file of at most `max_bytes`, else a UserError naming the file. A named pipe no process
    writes to reads as empty rather than waiting for a writer (it is opened non-blocking, then read blocking: a pipe
    that has a writer, such as `<(cat recipe.yaml)`, is read whole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read {what}: {error.strerror or error}") from None
    if len(raw) > max_bytes:
        raise UserError(f"{path}: {what} is larger than {max_bytes >> 20} MiB")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UserError(f"{path}: {what} is not UTF-8 text (line {line}, byte {error.start})") from None


def load_file(path: str | Path, what: str = "YAML file") -> Any:
    """The data in a YAML file, read strictly; a UserError naming the file (and line) for anything refused."""
    text = read_text(path, what)
    try:
        return parse(text)[0]
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {describe(error, 'invalid YAML: ')}") from None

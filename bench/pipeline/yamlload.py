"""The one YAML loader for experiment files and cluster profiles.

A ``yaml.SafeLoader`` that also refuses
- a key given twice in one mapping (PyYAML keeps the last one silently): the message names the key by its
  path (``defaults.batch_size``, ``grid.methods[0].r``) and both lines;
- a document whose aliases expand to more than ``MAX_VALUES`` values, or refer to themselves (a
  "billion laughs" alias bomb loads instantly as shared objects, then exhausts memory in whatever walks
  it): refused after composing, before anything is constructed.
Text is read through ``bench.pipeline.textio`` (undecodable bytes: one line naming the file).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from bench.pipeline.schema import FileError
from bench.pipeline.textio import TextError, read_text

MAX_VALUES = 100_000  # nodes after alias expansion; real experiment files have a few hundred
MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int, mapping: yaml.MappingNode) -> None:
        self.key, self.first, self.second, self.mapping = key, first, second, mapping
        super().__init__(f"duplicate key {key!r} (line {first} and line {second})")


class TooLarge(yaml.YAMLError):
    pass


class Loader(yaml.SafeLoader):
    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        expanded_size(node)
        self.root = node  # where a duplicate key's mapping is looked up (its path)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = lines.get(key)
                except TypeError:  # unhashable: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise DuplicateKey(key, first, key_node.start_mark.line + 1, node)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-4 as a string: a float needs a dot there. YAML 1.2 and every other reader take it as
# a number, and so does a user writing lr: 1e-4; the plain exponent forms are floats here too.
Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                             re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def node_path(root: yaml.Node, target: yaml.Node) -> str:
    """The path of ``target`` in the document ``root`` as messages write keys (``grid.methods[0]``; "" for the
    root itself or a node not found)."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:  # an alias: its anchor's node, walked once
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, f"{path}[{index}]") for index, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            stack += [(value, f"{path}.{key.value}" if path else str(key.value)) for key, value in node.value
                      if isinstance(key, yaml.ScalarNode)]
    return ""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_VALUES) -> int:
    """The number of values ``root`` stands for with every alias expanded (shared nodes counted once per
    use, computed once each); ``TooLarge`` above ``limit`` or for an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        ident = id(node)
        if finished:
            entered.discard(ident)
            sizes[ident] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[ident] > limit:
                raise TooLarge(f"aliases expand to more than {limit} values (line {node.start_mark.line + 1}); "
                               "refused (an alias bomb?)")
            continue
        if ident in sizes:
            continue
        if ident in entered:
            raise TooLarge(f"an alias refers to its own anchor (line {node.start_mark.line + 1}); refused")
        entered.add(ident)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in entered:
                raise TooLarge(f"an alias refers to its own anchor (line {child.start_mark.line + 1}); refused")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml(path: str | os.PathLike, error: type[FileError] = FileError) -> Any:
    """The YAML document in ``path``; any problem raises ``error(path, key, problem)`` (one line)."""
    try:
        text = read_text(path)
    except TextError as problem:
        raise error(path, "", "file not found" if problem.missing else problem.problem) from None
    loader = None
    try:
        loader = Loader(text)  # its reader checks the characters: inside the try
        return loader.get_single_data()
    except DuplicateKey as problem:
        where = node_path(loader.root, problem.mapping)
        raise error(path, f"{where}.{problem.key}" if where else str(problem.key), f"duplicate key (line "
                    f"{problem.first} and line {problem.second}); each key may appear once") from None
    except TooLarge as problem:
        raise error(path, "", f"YAML {problem}") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(problem, "problem", None) or str(problem).splitlines()[0]
        start, context = getattr(problem, "context_mark", None), getattr(problem, "context", None)
        if start and context and mark and start.line != mark.line:  # an unclosed bracket: where it opened
            what += f"; {context} from line {start.line + 1}, column {start.column + 1}"
        raise error(path, "", f"malformed YAML ({where}{what})") from None
    finally:
        if loader is not None:
            loader.dispose()

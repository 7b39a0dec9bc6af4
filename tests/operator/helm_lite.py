"""Render the chart's templates without `helm`: the subset of Go templates the chart uses.

Supported: `{{ .Values.x }}`, `$.Release.Name`, `.`, string/int literals, pipelines with `include`,
`toYaml`, `nindent`, `quote`, `default`; `if/else/end`, `range/end`, `define/end`; `{{-`/`-}}` trimming.
Anything else raises, so a template using more fails loudly instead of rendering wrong.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(ValueError):
    """A construct outside the supported subset, or a reference to a missing value."""


@dataclass
class _Node:
    kind: str  # text, expr, if, range, define
    value: str = ""
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out += [("text", text), ("action", m.group(2))]
        pos, trim_next = m.end(), bool(m.group(3))
    tail = src[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            if value:
                nodes.append(_Node("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if value.startswith("/*"):
            continue
        if word in stop:
            return nodes, i, word
        if word in ("if", "range", "define"):
            node = _Node(word, value.split(None, 1)[1])
            node.body, i, ended = _parse(tokens, i, ("else", "end"))
            if ended == "else":
                node.orelse, i, _ = _parse(tokens, i, ("end",))
            nodes.append(node)
        elif word in ("else", "end"):
            raise TemplateError(f"unexpected {{{{ {value} }}}}")
        else:
            nodes.append(_Node("expr", value))
    return nodes, i, ""


@dataclass
class Chart:
    """A chart directory plus the values and release it is rendered with."""

    path: Path
    values: dict[str, Any]
    release: dict[str, Any]

    def __post_init__(self) -> None:
        meta = yaml.safe_load((self.path / "Chart.yaml").read_text())
        self.root = {"Values": self.values, "Release": self.release,
                     "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]}}
        self.defines: dict[str, list[_Node]] = {}
        for tpl in sorted((self.path / "templates").glob("_*.tpl")):
            self._render(_parse(_tokens(tpl.read_text()))[0], self.root)

    def render(self) -> dict[str, list[dict[str, Any]]]:
        """Template file name -> the YAML documents it renders to (empty documents dropped)."""
        out = {}
        for tpl in sorted((self.path / "templates").glob("*.yaml")):
            text = self._render(_parse(_tokens(tpl.read_text()))[0], self.root)
            out[tpl.name] = [d for d in yaml.safe_load_all(text) if d]
        return out

    def _render(self, nodes: list[_Node], dot: Any) -> str:
        parts = []
        for node in nodes:
            if node.kind == "text":
                parts.append(node.value)
            elif node.kind == "expr":
                parts.append(_str(self._pipeline(node.value, dot)))
            elif node.kind == "define":
                self.defines[shlex.split(node.value)[0]] = node.body
            elif node.kind == "if":
                parts.append(self._render(node.body if _truthy(self._pipeline(node.value, dot)) else node.orelse, dot))
            elif node.kind == "range":
                items = self._pipeline(node.value, dot) or []
                parts += [self._render(node.body, item) for item in items] or [self._render(node.orelse, dot)]
        return "".join(parts)

    def _pipeline(self, expr: str, dot: Any) -> Any:
        value: Any = None
        for n, stage in enumerate(s.strip() for s in expr.split("|")):
            args = re.findall(r'"[^"]*"|\S+', stage)
            fn, rest = args[0], [self._arg(a, dot) for a in args[1:]]
            if n:
                rest.append(value)
            if fn == "include":
                value = self._render(self.defines[rest[0]], rest[1])
            elif fn == "toYaml":
                empty = {"[]": [], "{}": {}}
                value = next((k for k, v in empty.items() if rest[0] == v and type(rest[0]) is type(v)), None) \
                    or yaml.safe_dump(rest[0], sort_keys=False).rstrip()
            elif fn == "nindent":
                value = "\n" + "\n".join(" " * int(rest[0]) + line for line in _str(rest[1]).splitlines())
            elif fn == "quote":
                value = '"' + _str(rest[0]) + '"'
            elif fn == "default":
                value = rest[1] if _truthy(rest[1]) else rest[0]
            elif not rest:
                value = self._arg(fn, dot)
            else:
                raise TemplateError(f"unsupported function {fn!r} in {expr!r}")
        return value

    def _arg(self, token: str, dot: Any) -> Any:
        if token.isdigit():
            return int(token)
        if token in (".", "$"):
            return dot if token == "." else self.root
        if token.startswith(("$.", ".")):
            value = self.root if token.startswith("$.") else dot
            for key in token.lstrip("$.").split("."):
                if not isinstance(value, dict) or key not in value:
                    raise TemplateError(f"{token}: no value {key!r}")
                value = value[key]
            return value
        if token.startswith('"') and token.endswith('"'):
            return token[1:-1]
        raise TemplateError(f"unsupported token {token!r}")


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

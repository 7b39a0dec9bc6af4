"""Pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema.

Kubernetes accepts only *structural* schemas for CRDs: every node has a `type`, no `$ref`, no
`anyOf` that introduces types, `additionalProperties` never beside `properties`. Pydantic emits
JSON Schema 2020-12, so this module rewrites it:

- `$ref` into `$defs` is inlined (the spec tree has no cycles; a cycle is reported, not looped on);
- `anyOf: [X, {type: null}]` (an `Optional`) becomes X with `nullable: true`;
- `const` (a one-value `Literal`) becomes a one-value `enum`;
- the 2020-12 numeric `exclusiveMinimum: n` becomes OpenAPI 3.0's `minimum: n, exclusiveMinimum: true`;
- `additionalProperties: false` (pydantic's `extra="forbid"`) is dropped: the API server prunes or,
  with kubectl's strict field validation, rejects unknown fields on its own; a dict keeps its
  value schema as `additionalProperties`;
- `title` is dropped (pydantic invents it from the field name; it adds nothing to `kubectl explain`),
  a `default: null` is dropped (absence already means null).

Anything else that cannot be expressed (a union of two real types, say) raises
`UnsupportedSchemaError` naming the JSON path, so a new API field cannot silently weaken the CRD.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# Keywords copied through unchanged: all valid in a structural schema.
_PASSTHROUGH = (
    "description", "type", "format", "enum", "default", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "pattern", "multipleOf", "uniqueItems", "minProperties", "maxProperties",
)
_DROPPED = ("title", "$defs", "examples")


class UnsupportedSchemaError(ValueError):
    """A pydantic schema construct has no structural OpenAPI v3 equivalent."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or '<root>'}: {reason}; change the API type or extend crd/schema.py")


def structural_schema(model: type[BaseModel], *, mode: str = "validation") -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode=mode)
    return _Converter(raw.get("$defs", {})).convert(raw, path="", seen=())


class _Converter:
    def __init__(self, defs: dict[str, Any]) -> None:
        self._defs = defs

    def convert(self, node: dict[str, Any], *, path: str, seen: tuple[str, ...]) -> dict[str, Any]:
        node = self._resolve(node, path=path, seen=seen)
        seen = seen + tuple(node.pop("__refs__", ()))
        if "anyOf" in node:
            return self._optional(node, path=path, seen=seen)
        unknown = set(node) - set(_PASSTHROUGH) - set(_DROPPED) - {
            "properties", "required", "items", "additionalProperties", "const", "exclusiveMinimum",
            "exclusiveMaximum",
        }
        if unknown:
            raise UnsupportedSchemaError(path, f"keywords {sorted(unknown)} are not supported")

        out: dict[str, Any] = {k: node[k] for k in _PASSTHROUGH if k in node}
        if "const" in node:
            out["enum"] = [node["const"]]
            out.setdefault("type", _json_type(node["const"], path))
        for bound, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if bound in node and not isinstance(node[bound], bool):
                out[base] = node[bound]
                out[bound] = True
        if out.get("default", 0) is None:
            del out["default"]

        if "properties" in node:
            out["type"] = "object"
            out["properties"] = {
                name: self.convert(sub, path=f"{path}.{name}", seen=seen) for name, sub in node["properties"].items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            out["type"] = "object"
            out["additionalProperties"] = self.convert(node["additionalProperties"], path=f"{path}.*", seen=seen)
        if "items" in node:
            out["items"] = self.convert(node["items"], path=f"{path}[]", seen=seen)
        if "type" not in out:
            raise UnsupportedSchemaError(path, "no type (free-form values need x-kubernetes-preserve-unknown-fields)")
        if out["type"] == "object" and "properties" not in out and "additionalProperties" not in out:
            # A bare dict[str, Any]: the one place where unknown fields cannot be avoided.
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out

    def _resolve(self, node: dict[str, Any], *, path: str, seen: tuple[str, ...]) -> dict[str, Any]:
        """Inline `$ref` (and pydantic's one-element `allOf` wrapper), keeping sibling keywords."""
        node = dict(node)
        refs: list[str] = []
        if "allOf" in node:
            parts = node.pop("allOf")
            if len(parts) != 1:
                raise UnsupportedSchemaError(path, "allOf with several members")
            node = {**parts[0], **node}
        while "$ref" in node:
            ref = node.pop("$ref")
            name = ref.rsplit("/", 1)[-1]
            if name in seen or name in refs:
                raise UnsupportedSchemaError(path, f"recursive type {name}")
            if name not in self._defs:
                raise UnsupportedSchemaError(path, f"dangling reference {ref}")
            refs.append(name)
            node = {**self._defs[name], **node}
        node["__refs__"] = refs
        return node

    def _optional(self, node: dict[str, Any], *, path: str, seen: tuple[str, ...]) -> dict[str, Any]:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1 or len(options) == len(node["anyOf"]):
            raise UnsupportedSchemaError(path, "a union of several types (only Optional[X] is supported)")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        merged = self.convert({**options[0], **rest}, path=path, seen=seen)
        merged["nullable"] = True
        return merged


def _json_type(value: Any, path: str) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, py):
            return name
    raise UnsupportedSchemaError(path, f"constant {value!r} of no JSON scalar type")

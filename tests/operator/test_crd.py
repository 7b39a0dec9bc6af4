"""The generated CRD: structural, faithful to the pydantic bounds, and identical to the checked-in files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml
from disagg_operator.crd import CRD_PATHS, UnsupportedSchemaError, check_crds, crd_manifest, structural_schema
from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key in ("properties",):
            for name, sub in node.get(key, {}).items():
                yield from _walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}.*")


def _schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crds_match_the_api_types():
    drift = check_crds(REPO)
    assert drift == [], f"run `make crds`: {drift}"
    for rel in CRD_PATHS:
        assert yaml.safe_load((REPO / rel).read_text()) == crd_manifest()


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "oneOf", "const", "title"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


def test_bounds_enums_nullable_and_maps_survive():
    spec = _schema()["properties"]["spec"]["properties"]
    ttft = spec["slo"]["properties"]["ttftMs"]
    assert ttft == {"type": "number", "maximum": 3_600_000, "minimum": 0, "exclusiveMinimum": True}
    gpu_type = spec["cluster"]["properties"]["gpuType"]
    assert gpu_type["enum"] == ["A100-80GB", "H100-80GB", "H200-141GB", "CPU"] and gpu_type["nullable"] is True
    assert spec["scheduling"]["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert spec["model"]["properties"]["custom"]["required"][:2] == ["name", "architecture"]
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(_schema())


def test_status_subresource_printer_columns_and_names():
    crd = crd_manifest()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Prefill"] == ".status.prefillShape"
    assert columns["Decode"] == ".status.decodeShape" and columns["Goodput"] == ".status.goodputRps"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert crd["spec"]["names"]["shortNames"] == ["dsv"] and crd["metadata"]["name"] == "disaggservings.disagg.io"


def _validator() -> jsonschema.Draft4Validator:
    """The CRD schema as JSON Schema draft 4 (OpenAPI 3.0's base): `nullable` becomes a null type."""
    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items() if k != "nullable"}
            if node.get("nullable"):
                out["type"] = [node["type"], "null"]
            return out
        return [convert(v) for v in node] if isinstance(node, list) else node
    return jsonschema.Draft4Validator(convert(_schema()))


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(path):
    for manifest in filter(None, yaml.safe_load_all(path.read_text())):
        assert manifest["kind"] == "DisaggServing", "examples/k8s holds DisaggServings only; validate others here"
        errors = list(_validator().iter_errors(manifest))
        assert errors == []


@pytest.mark.parametrize(("patch", "where"), [
    ({"slo": {"ttftMs": -1, "tpotMs": 100}}, "ttftMs"),
    ({"slo": {"ttftMs": 0, "tpotMs": 100}}, "ttftMs"),  # exclusive bound
    ({"cluster": {"nodes": 2, "gpusPerNode": "eight"}}, "gpusPerNode"),
    ({"cluster": {"nodes": 2, "gpusPerNode": 8, "gpuType": "TPU"}}, "gpuType"),
    ({"runtime": {"kvChannel": "carrier-pigeon"}}, "kvChannel"),
    ({"cluster": {"nodes": 2, "gpusPerNode": 8, "interNodeBandwidth": "25G"}}, "interNodeBandwidth"),
    ({"cluster": {"nodes": 2, "gpusPerNode": 8, "interNodeBandwidth": 25}}, "interNodeBandwidth"),
])
def test_schema_rejects_what_the_api_server_should(patch, where):
    manifest = yaml.safe_load((REPO / "examples" / "k8s" / "disaggserving-chatbot.yaml").read_text())
    manifest["spec"].update(patch)
    errors = list(_validator().iter_errors(manifest))
    assert errors and any(where in "/".join(map(str, e.absolute_path)) for e in errors), errors


class _Union(BaseModel):
    value: int | str


class _Free(BaseModel):
    blob: dict[str, Any] = Field(default_factory=dict)
    kind: Literal["only"] = "only"


def test_unsupported_unions_are_reported_not_weakened():
    with pytest.raises(UnsupportedSchemaError, match=r"\.value: a union of several types"):
        structural_schema(_Union)


def test_free_form_dicts_preserve_unknown_fields_and_literals_become_enums():
    schema = structural_schema(_Free)
    assert schema["properties"]["blob"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert schema["properties"]["kind"] == {"type": "string", "enum": ["only"], "default": "only"}

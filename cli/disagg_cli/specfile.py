"""Reading a spec for the CLI: a bare DisaggServingSpec file or a full DisaggServing manifest, YAML or JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from disagg_planner.api import DisaggServingSpec
from pydantic import ValidationError

API_VERSION = "disagg.io/v1alpha1"
KIND = "DisaggServing"


class SpecFileError(Exception):
    """The file cannot be read or is not a valid spec; the message names the file and each bad field."""


def load_spec(path: str | Path) -> DisaggServingSpec:
    """The spec in `path`; a manifest's `spec` is taken, other YAML documents in the file are skipped."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{path}: not valid YAML/JSON: {exc}") from None
    body = _spec_body(path, documents)
    try:
        spec = DisaggServingSpec.model_validate(body)
    except ValidationError as exc:
        raise SpecFileError(f"{path}: invalid spec\n" + format_validation_error(exc)) from None
    for note in spec.deprecations():
        print(f"warning: {path}: {note}", file=sys.stderr)
    return spec


def _spec_body(path: Path, documents: list[object]) -> dict:
    if not documents:
        raise SpecFileError(f"{path}: the file is empty")
    manifests = [d for d in documents if isinstance(d, dict) and "kind" in d]
    if manifests:
        ours = [d for d in manifests if d.get("kind") == KIND]
        if not ours:
            kinds = ", ".join(sorted({str(d.get("kind")) for d in manifests}))
            raise SpecFileError(f"{path}: no {KIND} manifest in the file (found kind: {kinds})")
        manifest = ours[0]
        if manifest.get("apiVersion") != API_VERSION:
            raise SpecFileError(
                f"{path}: apiVersion is {manifest.get('apiVersion')!r}; this CLI reads {API_VERSION}"
            )
        body = manifest.get("spec")
        if not isinstance(body, dict):
            raise SpecFileError(f"{path}: the {KIND} manifest has no spec mapping")
        return body
    if len(documents) > 1 or not isinstance(documents[0], dict):
        raise SpecFileError(f"{path}: expected one mapping (a spec) or a {KIND} manifest")
    return documents[0]


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, `spec.<camelCase path>: <reason>`, the form users search their file for."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ("spec", *err["loc"]))
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)

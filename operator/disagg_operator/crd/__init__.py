"""The DisaggServing CRD: identity (group, version, names) and its generation from the API types."""

from .definition import (
    API_VERSION,
    CRD_PATHS,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    VERSION,
    CrdDrift,
    check_crds,
    crd_manifest,
    render_crd_yaml,
    write_crds,
)
from .schema import UnsupportedSchemaError, structural_schema

__all__ = [
    "API_VERSION", "CRD_PATHS", "CrdDrift", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "UnsupportedSchemaError",
    "VERSION", "check_crds", "crd_manifest", "render_crd_yaml", "structural_schema", "write_crds",
]

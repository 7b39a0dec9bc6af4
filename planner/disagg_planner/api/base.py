"""Common configuration for every API type: camelCase on the wire (Kubernetes style), strict fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of the spec tree: unknown fields are errors; snake_case or camelCase both accepted."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    def to_wire(self) -> dict:
        """The JSON-ready, camelCase form that the CRD and the status use."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

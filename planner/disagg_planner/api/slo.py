"""Service-level objectives and the search bounds."""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel


class SLOSpec(ApiModel):
    """A request attains the SLO when TTFT <= ttft_ms and mean TPOT <= tpot_ms."""

    ttft_ms: float = Field(gt=0, le=3_600_000)
    tpot_ms: float = Field(gt=0, le=60_000)
    attainment: float = Field(default=0.9, gt=0, le=1.0, description="Share of requests that must attain.")


class SearchBounds(ApiModel):
    """Limits on the placement search."""

    max_tp: int = Field(default=8, ge=1, le=64, description="Largest tensor-parallel degree searched; every "
                        "degree up to it that divides the model's heads is tried.")
    max_pp: int = Field(default=8, ge=1, le=64)
    gpu_budget: int | None = Field(default=None, ge=1, le=1 << 16, description="Default: the whole cluster.")

"""Service-level objectives and the search bounds."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import ApiModel


class SLOSpec(ApiModel):
    """A request attains the SLO when TTFT <= ttft_ms and mean TPOT <= tpot_ms."""

    ttft_ms: float = Field(gt=0, le=3_600_000)
    tpot_ms: float = Field(gt=0, le=60_000)
    attainment: float = Field(default=0.9, gt=0, le=1.0, description="Share of requests that must attain.")


def _power_of_two(value: int, field: str) -> int:
    if value & (value - 1):
        raise ValueError(f"{field} must be a power of two, got {value}")
    return value


class SearchBounds(ApiModel):
    """Limits on the placement search."""

    max_tp: int = Field(default=8, ge=1, le=64)
    max_pp: int = Field(default=8, ge=1, le=64)
    gpu_budget: int | None = Field(default=None, ge=1, le=1 << 16, description="Default: the whole cluster.")

    @field_validator("max_tp")
    @classmethod
    def _tp_pow2(cls, v: int) -> int:
        return _power_of_two(v, "max_tp")

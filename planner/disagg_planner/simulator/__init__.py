"""Discrete-event simulation of disaggregated and colocated serving (seeded traces, deterministic)."""

from .colocated import simulate_colocated
from .disaggregated import simulate_disaggregated
from .types import (
    ColocatedConfig,
    DisaggConfig,
    KVPolicy,
    ModelDoesNotFitError,
    PhaseShape,
    RequestResult,
    RequestTooLargeError,
    SimResult,
    SimulationError,
)

__all__ = [
    "ColocatedConfig", "DisaggConfig", "KVPolicy", "ModelDoesNotFitError", "PhaseShape", "RequestResult",
    "RequestTooLargeError", "SimResult", "SimulationError", "simulate_colocated", "simulate_disaggregated",
]

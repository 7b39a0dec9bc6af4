"""Discrete-event simulation of disaggregated and colocated serving (seeded traces, deterministic)."""

from .colocated import simulate_colocated
from .colocated_chunked import ChunkedColocatedConfig, simulate_colocated_chunked
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
    "ChunkedColocatedConfig", "ColocatedConfig", "DisaggConfig", "KVPolicy", "ModelDoesNotFitError", "PhaseShape",
    "RequestResult", "RequestTooLargeError", "SimResult", "SimulationError", "simulate_colocated",
    "simulate_colocated_chunked", "simulate_disaggregated",
]

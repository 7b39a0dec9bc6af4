"""Telemetry errors: each names the Prometheus, the query or the setting to look at."""

from __future__ import annotations

from ..errors import OperatorError


class TelemetryError(OperatorError):
    """Reading the workload from Prometheus failed; re-planning waits for the next interval."""


class TelemetryConfigError(TelemetryError):
    """Re-planning is enabled but cannot run as configured (e.g. no Prometheus URL anywhere)."""


class PrometheusUnavailable(TelemetryError):
    """Prometheus did not answer (network, DNS, TLS, timeout, or a 5xx)."""


class TelemetryQueryError(TelemetryError):
    """Prometheus answered, but not with what the query needs (a rejected query or an odd result)."""

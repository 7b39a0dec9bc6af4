"""Latency model: per-stage prefill and decode step times, KV capacity and KV transfer time."""

from .fit import LinearFit, ProfileError, fit_linear
from .model import LatencyModel, kv_transfer_time
from .shape import ShapeError

__all__ = ["LatencyModel", "LinearFit", "ProfileError", "ShapeError", "fit_linear", "kv_transfer_time"]

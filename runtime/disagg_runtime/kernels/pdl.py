"""Programmatic dependent launch (PDL) for the step's Triton kernels.

Between two kernels of a step the GPU drains the first, then launches the second: a few microseconds a
boundary, ~10 boundaries a layer. Launched with PDL (Hopper and later), the second kernel's launch is
prepared while the first drains. Each kernel launched so calls `gdc_wait` before touching memory, so it
still sees everything the kernels before it wrote: ordering is as without PDL, only the gap shrinks.

`DISAGG_PDL=0` launches without it (for the A/B in bench/engine_gpu.py).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: compute capability 9.0 or later, not switched off."""
    if device.type != "cuda" or os.environ.get("DISAGG_PDL", "1") == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """The kernel's `PDL` constexpr and Triton's launch option, as keyword arguments of a launch."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}

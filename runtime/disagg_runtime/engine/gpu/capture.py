"""Capturing a step's forward in a CUDA graph: the one procedure the decode and prefill graphs share."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection inside a capture: a collection there can free another engine's CUDA graph, and
    destroying a graph while a stream captures invalidates the capture (seen in the GPU tests, one process
    loading engine after engine)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture(forward: Callable[[], torch.Tensor], device: torch.device,
            pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`forward` run once on a side stream (Triton compiles, cuBLAS picks its kernels, outside the capture),
    then captured into a graph in `pool`; returns the graph and its static output."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with no_gc(), torch.cuda.graph(graph, pool=pool), torch.inference_mode():
        out = forward()
    return graph, out

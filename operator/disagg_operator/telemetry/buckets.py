"""Prometheus histogram buckets <-> the planner's `LengthHistogram`.

A Prometheus histogram is cumulative: bucket `le` counts observations `<= le`. Token lengths are
integers, so bucket `(le_prev, le]` holds the lengths `floor(le_prev)+1 .. floor(le)`, which is the
half-open `LengthHistogram` bin `[floor(le_prev)+1, floor(le)+1)`. The first bucket starts at 1 (a length
is at least one token). Observations above the last finite bucket (the `+Inf` bucket's excess) have no
upper edge to put in a bin, so they are counted in the last finite bin and reported as `overflow`.

`rebin` maps any histogram onto such a bucket grid (uniform within each source bin), so that the drift
detector compares the planned lengths and the observed ones at the same resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from disagg_planner.api import LengthHistogram

from .errors import TelemetryQueryError


@dataclass(frozen=True)
class BucketHistogram:
    """A histogram read from Prometheus buckets; `histogram` is None when nothing was observed."""

    histogram: LengthHistogram | None
    total: float
    overflow: float  # observations above the last finite bucket, counted in the last bin

    @property
    def overflow_note(self) -> str | None:
        if self.overflow <= 0 or self.histogram is None:
            return None
        return (f"{self.overflow:.3g} of {self.total:.3g} lengths were above the last finite bucket "
                f"({self.histogram.edges[-1] - 1}) and are counted in the last bin")


def parse_le(value: str) -> float:
    """A bucket's `le` label value as a float (`+Inf` included)."""
    try:
        return float(value)
    except ValueError:
        raise TelemetryQueryError(f"bucket label le={value!r} is not a number") from None


def from_buckets(buckets: Iterable[tuple[float, float]]) -> BucketHistogram:
    """A `LengthHistogram` from cumulative `(le, count)` pairs (any order, `+Inf` optional).

    Counts may be fractional (Prometheus `increase()` extrapolates) and, between buckets of series that
    were summed, slightly non-monotone; the cumulative counts are made non-decreasing first.
    """
    pairs = sorted(buckets)
    finite = [(le, c) for le, c in pairs if math.isfinite(le)]
    inf_count = max((c for le, c in pairs if math.isinf(le) and le > 0), default=None)
    edges: list[int] = [1]
    counts: list[float] = []
    carried = 0.0  # counts of buckets that hold no integer length >= 1 go to the next bin that does
    running = 0.0
    for le, cumulative in finite:
        cumulative = max(cumulative, running)
        count, running = cumulative - running, cumulative
        upper = math.floor(le) + 1
        if upper <= edges[-1]:
            carried += count
            continue
        edges.append(upper)
        counts.append(count + carried)
        carried = 0.0
    overflow = max(0.0, inf_count - running) if inf_count is not None else 0.0
    if counts:
        counts[-1] += overflow + carried
    total = sum(counts)
    if not counts or total <= 0:
        return BucketHistogram(None, max(total, inf_count or 0.0), overflow)
    return BucketHistogram(LengthHistogram(edges=edges, counts=counts), total, overflow)


def rebin(hist: LengthHistogram, edges: Sequence[int]) -> LengthHistogram:
    """`hist` on the bin grid `edges`, spreading each source bin uniformly over its integer lengths.

    Mass below the grid goes to the first bin and mass above it to the last, the same way Prometheus
    folds lengths above its last finite bucket into that bucket's bin (see `from_buckets`).
    """
    out = [0.0] * (len(edges) - 1)
    lo_grid, hi_grid = edges[0], edges[-1]
    for count, a, b in zip(hist.counts, hist.edges, hist.edges[1:], strict=False):
        if count <= 0:
            continue
        width = b - a
        below = max(0, min(b, lo_grid) - a)
        above = max(0, b - max(a, hi_grid))
        out[0] += count * below / width
        out[-1] += count * above / width
        for i, (x, y) in enumerate(zip(edges, edges[1:], strict=False)):
            overlap = min(b, y) - max(a, x)
            if overlap > 0:
                out[i] += count * overlap / width
    return LengthHistogram(edges=list(edges), counts=out)


def trimmed(hist: LengthHistogram) -> LengthHistogram:
    """`hist` without empty bins at either end (a compact workload for the planner and the status)."""
    nonzero = [i for i, c in enumerate(hist.counts) if c > 0]
    first, last = nonzero[0], nonzero[-1]
    return LengthHistogram(edges=hist.edges[first:last + 2], counts=hist.counts[first:last + 1])

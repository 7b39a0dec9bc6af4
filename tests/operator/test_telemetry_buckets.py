"""Prometheus bucket vectors -> LengthHistogram, and re-binning onto a bucket grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from disagg_operator.telemetry import from_buckets, rebin, trimmed
from disagg_operator.telemetry.buckets import parse_le
from disagg_operator.telemetry.errors import TelemetryQueryError
from disagg_planner.api import LengthHistogram
from prometheus_client import CollectorRegistry, Histogram

GRID = (1, 8, 16, 32, 64, 128, 256, 512)
INF = math.inf


def test_cumulative_buckets_become_half_open_integer_bins() -> None:
    # le=1: length 1; (1, 8]: 2..8; (8, 16]: 9..16; ...
    got = from_buckets([(1, 2), (8, 5), (16, 5), (32, 9), (INF, 9)])
    assert got.histogram == LengthHistogram(edges=[1, 2, 9, 17, 33], counts=[2, 3, 0, 4])
    assert got.total == 9 and got.overflow == 0 and got.overflow_note is None


def test_order_does_not_matter_and_le_strings_parse() -> None:
    pairs = [(parse_le(le), c) for le, c in (("+Inf", 4.0), ("16.0", 3.0), ("8.0", 1.0))]
    got = from_buckets(pairs)
    assert got.histogram == LengthHistogram(edges=[1, 9, 17], counts=[1, 3])  # one above 16, folded in
    assert got.overflow == 1


def test_inf_excess_goes_into_the_last_finite_bin_and_is_reported() -> None:
    got = from_buckets([(8, 1), (16, 3), (INF, 10)])
    assert got.histogram is not None
    assert got.histogram.counts == [1, 9]
    assert got.overflow == 7 and got.total == 10
    assert "7 of 10 lengths were above the last finite bucket (16)" in (got.overflow_note or "")


def test_extrapolated_counts_are_made_monotone() -> None:
    # increase() of summed series can dip by a rounding error between neighbouring buckets
    got = from_buckets([(8, 2.0000001), (16, 2.0), (32, 5.5), (INF, 5.5)])
    assert got.histogram is not None
    assert got.histogram.counts == pytest.approx([2.0000001, 0, 3.4999999])
    assert all(c >= 0 for c in got.histogram.counts)


def test_buckets_holding_no_valid_length_fold_into_the_next_bin() -> None:
    # le=0.5 can only hold lengths < 1, which the runtime never records as valid; le 8.2 and 8.7 share
    # integer lengths with le 8.
    got = from_buckets([(0.5, 1), (8, 3), (8.7, 3), (16, 6), (INF, 6)])
    assert got.histogram == LengthHistogram(edges=[1, 9, 17], counts=[3, 3])


def test_nothing_observed_gives_no_histogram() -> None:
    assert from_buckets([(8, 0), (16, 0), (INF, 0)]).histogram is None
    assert from_buckets([]).histogram is None
    with pytest.raises(TelemetryQueryError, match="le='abc'"):
        parse_le("abc")


def test_prometheus_client_exposition_round_trips_to_exact_bin_counts() -> None:
    lengths = np.random.default_rng(7).integers(1, 700, size=500)
    registry = CollectorRegistry()
    hist = Histogram("lengths", "", buckets=GRID, registry=registry)
    for n in lengths:
        hist.observe(int(n))
    samples = [s for m in registry.collect() for s in m.samples if s.name == "lengths_bucket"]
    got = from_buckets([(parse_le(s.labels["le"]), s.value) for s in samples])
    assert got.histogram is not None
    edges = [1, *(le + 1 for le in GRID)]
    expected = [int(((lengths >= a) & (lengths < b)).sum()) for a, b in zip(edges, edges[1:], strict=False)]
    expected[-1] += int((lengths > GRID[-1]).sum())
    assert got.histogram.edges == edges
    assert got.histogram.counts == expected
    assert got.overflow == (lengths > GRID[-1]).sum()


def test_rebin_is_identity_on_its_own_grid_and_conserves_mass() -> None:
    h = LengthHistogram(edges=[1, 9, 17, 33], counts=[1, 2, 3])
    assert rebin(h, h.edges) == h
    fine = LengthHistogram(edges=[1, 5, 9, 13, 17], counts=[1, 1, 2, 2])
    coarse = rebin(fine, [1, 9, 17])
    assert coarse.counts == pytest.approx([2, 4])
    assert sum(rebin(fine, [3, 7, 11]).counts) == pytest.approx(sum(fine.counts))


def test_rebin_splits_uniformly_and_folds_mass_outside_the_grid() -> None:
    h = LengthHistogram(edges=[1, 11, 101], counts=[10, 90])
    got = rebin(h, [6, 21, 51])
    # [1,6) -> first bin (below grid): 5; [6,11): 5; [11,21): 10 -> first bin 20
    # [21,51): 30; [51,101) above grid -> last bin: 50
    assert got.counts == pytest.approx([20, 80])


def test_trimmed_drops_empty_end_bins_only() -> None:
    h = LengthHistogram(edges=[1, 2, 9, 17, 33, 65], counts=[0, 3, 0, 4, 0])
    assert trimmed(h) == LengthHistogram(edges=[2, 9, 17, 33], counts=[3, 0, 4])

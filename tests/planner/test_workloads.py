"""Workload shapes: shipped histograms, Poisson sampling, determinism, clipping."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from disagg_planner.api import LengthHistogram, WorkloadSpec
from disagg_planner.api.workload import DatasetName
from disagg_planner.workloads import (
    DATASET_SOURCES,
    SimRequest,
    clip_requests,
    dataset_histograms,
    length_histograms,
    sample_requests,
)

DATASETS = typing.get_args(DatasetName)


def test_every_named_dataset_has_a_source_and_histograms() -> None:
    assert set(DATASET_SOURCES) == set(DATASETS)
    for name in DATASETS:
        inputs, outputs = dataset_histograms(name)
        assert sum(inputs.counts) > 0 and sum(outputs.counts) > 0
        assert len(DATASET_SOURCES[name]) > 40


def test_dataset_shapes_match_their_description() -> None:
    chat_in, chat_out = dataset_histograms("chatbot")
    code_in, code_out = dataset_histograms("code")
    sum_in, sum_out = dataset_histograms("summarization")
    # DistServe's ShareGPT sample: ~760-token prompts, ~180-token answers, within OPT's 2048 context.
    assert 700 < chat_in.mean < 820 and 150 < chat_out.mean < 200 and chat_in.max < 2048
    # HumanEval: short prompts, short completions.
    assert code_in.mean < 150 and code_out.mean < 60
    # LongBench summarisation: long inputs, short outputs.
    assert sum_in.mean > 5 * chat_in.mean and sum_out.mean < sum_in.mean / 20


def test_samples_follow_the_histogram_mean() -> None:
    workload = WorkloadSpec(rate=1.0, dataset="chatbot")
    inputs, outputs = length_histograms(workload)
    reqs = sample_requests(workload, rate=1.0, n=40_000, seed=3)
    assert np.mean([r.input_len for r in reqs]) == pytest.approx(inputs.mean, rel=0.02)
    assert np.mean([r.output_len for r in reqs]) == pytest.approx(outputs.mean, rel=0.03)


def test_lengths_stay_inside_their_bins() -> None:
    hist_in = LengthHistogram(edges=[10, 20, 100], counts=[1, 0])
    hist_out = LengthHistogram(edges=[1, 2], counts=[5])
    workload = WorkloadSpec(rate=1.0, dataset=None, input_lengths=hist_in, output_lengths=hist_out)
    reqs = sample_requests(workload, rate=5.0, n=2000, seed=0)
    lengths = {r.input_len for r in reqs}
    assert min(lengths) == 10 and max(lengths) == 19  # uniform over [10, 20), the empty bin never drawn
    assert {r.output_len for r in reqs} == {1}


def test_explicit_histograms_override_the_dataset() -> None:
    hist = LengthHistogram(edges=[7, 8], counts=[1])
    workload = WorkloadSpec(rate=1.0, dataset="summarization", input_lengths=hist, output_lengths=hist)
    assert length_histograms(workload) == (hist, hist)


def test_arrivals_are_poisson_at_the_rate() -> None:
    reqs = sample_requests(WorkloadSpec(rate=1.0), rate=4.0, n=50_000, seed=11)
    gaps = np.diff([0.0] + [r.arrival for r in reqs])
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV = 1


def test_same_seed_same_trace_and_different_seed_differs() -> None:
    workload = WorkloadSpec(rate=1.0)
    a = sample_requests(workload, 2.0, 500, seed=42)
    assert a == sample_requests(workload, 2.0, 500, seed=42)
    b = sample_requests(workload, 2.0, 500, seed=43)
    assert [r.arrival for r in a] != [r.arrival for r in b]


def test_changing_the_rate_keeps_the_lengths() -> None:
    workload = WorkloadSpec(rate=1.0)
    slow = sample_requests(workload, 1.0, 300, seed=5)
    fast = sample_requests(workload, 3.0, 300, seed=5)
    assert [(r.input_len, r.output_len) for r in slow] == [(r.input_len, r.output_len) for r in fast]
    assert [r.arrival / 3 for r in slow] == pytest.approx([r.arrival for r in fast])


def test_clip_fits_the_context_and_keeps_short_requests() -> None:
    short = SimRequest(1.0, 100, 50)
    assert short.clip(2048) is short
    long = SimRequest(1.0, 9000, 300)
    clipped = long.clip(2048)
    assert (clipped.input_len, clipped.output_len) == (1748, 300)
    huge_output = SimRequest(0.0, 10, 5000).clip(2048)
    assert huge_output.input_len == 1 and huge_output.output_len == 2047
    reqs = clip_requests(sample_requests(WorkloadSpec(rate=1.0, dataset="summarization"), 1.0, 500, 0), 2048)
    assert all(r.input_len + r.output_len <= 2048 and r.input_len >= 1 for r in reqs)
    with pytest.raises(ValueError, match="max_context"):
        short.clip(1)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="rate"):
        sample_requests(WorkloadSpec(rate=1.0), 0.0, 10, 0)
    with pytest.raises(ValueError, match="at least one"):
        sample_requests(WorkloadSpec(rate=1.0), 1.0, 0, 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_histograms("poetry")  # type: ignore[arg-type]

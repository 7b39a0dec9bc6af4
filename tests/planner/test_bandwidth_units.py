"""Bandwidths say bits or bytes: unit-bearing strings, the deprecated GB/s numbers converted and reported."""

from __future__ import annotations

import pytest
from disagg_planner.api import DisaggServingSpec
from disagg_planner.api.cluster import ClusterSpec
from disagg_planner.api.units import BandwidthError, format_bandwidth, parse_bandwidth
from disagg_planner.search.latency_source import latency_model
from disagg_planner.search.problem import SearchProblem
from pydantic import ValidationError


@pytest.mark.parametrize(("text", "bytes_per_s"), [
    ("25Gbit", 3.125e9), ("25Gbit/s", 3.125e9), ("200Gbit", 25e9), ("600GB", 600e9), ("600GB/s", 600e9),
    ("3.125GB", 3.125e9), ("1GiB", 2**30), ("100Mbit", 12.5e6), ("1.5TB", 1.5e12), ("8bit", 1.0), ("10 kB", 1e4),
    ("4e2GB", 4e11),
])
def test_parses_bits_and_bytes_explicitly(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize(("text", "says"), [
    ("25G", "does not say bits or bytes"), ("25Gb", "does not say bits or bytes"), ("25gb", "does not say"),
    ("25Gbps", "read as bits by some and bytes by others"), ("25GBps", "bits by some"),
    ("25", "not a number followed by a unit"), ("fast", "not a number"), ("25furlongs", "unknown unit"),
    ("0GB", "must be positive"), ("200PB", "at most 100000GB"),
])
def test_ambiguous_or_malformed_bandwidths_are_refused(text, says):
    with pytest.raises(BandwidthError, match=says):
        parse_bandwidth(text)


def test_a_bare_number_is_refused_with_both_spellings_suggested():
    with pytest.raises(ValidationError, match="write 25Gbit for bits per second or 25GB for bytes per second"):
        ClusterSpec(nodes=1, gpus_per_node=8, inter_node_bandwidth=25)


def test_wire_form_is_canonical_gigabytes():
    c = ClusterSpec(nodes=2, gpus_per_node=8, inter_node_bandwidth="25Gbit", intra_node_bandwidth="900GB/s")
    assert c.to_wire()["interNodeBandwidth"] == "3.125GB" and c.to_wire()["intraNodeBandwidth"] == "900GB"
    assert ClusterSpec.model_validate(c.to_wire()) == c
    assert format_bandwidth(parse_bandwidth("1GiB")) == "1.073741824GB"


def test_defaults_apply_without_being_written_into_the_crd():
    c = ClusterSpec(nodes=1, gpus_per_node=8)
    assert (c.intra_node_gb_per_s, c.inter_node_gb_per_s) == (300.0, 25.0)
    schema = ClusterSpec.model_json_schema(by_alias=True)["properties"]
    assert "default" not in schema["interNodeBandwidth"] and "default" not in schema["intraNodeBandwidth"]


def test_deprecated_gbps_fields_are_converted_and_reported():
    c = ClusterSpec.model_validate({"nodes": 4, "gpusPerNode": 8, "interNodeGbps": 3.125, "intraNodeGbps": 300})
    assert c.inter_node_bandwidth == 3.125e9 and c.intra_node_bandwidth == 300e9
    assert c.inter_node_gbps is None and "interNodeGbps" not in c.to_wire()
    notes = c.deprecations()
    assert len(notes) == 2
    assert any("interNodeGbps is deprecated" in n and "interNodeBandwidth: 3.125GB" in n and "25Gbit" in n
               for n in notes)
    assert ClusterSpec(nodes=1, gpus_per_node=8, inter_node_bandwidth="25GB").deprecations() == []


def test_both_forms_of_one_link_are_an_error():
    with pytest.raises(ValidationError, match="both interNodeGbps .deprecated. and interNodeBandwidth"):
        ClusterSpec.model_validate({"nodes": 1, "gpusPerNode": 8, "interNodeGbps": 25, "interNodeBandwidth": "25GB"})
    with pytest.raises(ValidationError, match="must be a number of GB/s"):
        ClusterSpec.model_validate({"nodes": 1, "gpusPerNode": 8, "interNodeGbps": "25Gbit"})


def test_the_planner_sees_one_unit_whichever_form_was_written():
    base = {"model": {"preset": "opt-13b"}, "workload": {"rate": 2, "dataset": "chatbot"},
            "slo": {"ttftMs": 250, "tpotMs": 100}}
    old = DisaggServingSpec.model_validate({**base, "cluster": {"nodes": 2, "gpusPerNode": 8, "interNodeGbps": 3.125}})
    new = DisaggServingSpec.model_validate({**base, "cluster": {"nodes": 2, "gpusPerNode": 8,
                                                                "interNodeBandwidth": "25Gbit"}})
    assert old.planning_hash() == new.planning_hash()
    assert old.deprecations() and not new.deprecations()
    problem = SearchProblem.of(new, latency_model(new, None), seed=0)
    assert (problem.inter_node_gbps, problem.intra_node_gbps) == (3.125, 300.0)  # GB/s, the planner's unit

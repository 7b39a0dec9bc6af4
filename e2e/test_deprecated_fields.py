"""A DisaggServing written with the old GB/s fields is planned as before and says so in status.warnings;
rewritten with unit-bearing bandwidths it keeps its plan and the warning goes."""

from __future__ import annotations

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import SMALL, small


def test_deprecated_bandwidth_is_converted_and_reported(api, namespace, start_operator):
    start_operator()
    kubectl = Kubectl(api, namespace)
    cluster = {k: v for k, v in SMALL["cluster"].items() if not k.endswith(("Bandwidth", "Gbps"))}
    kubectl.create("chat", small(cluster={**cluster, "interNodeGbps": 3.125}))
    old = wait_for(lambda: kubectl.status("chat") if kubectl.status("chat").get("planHash") else None,
                   what="a plan for the deprecated spec")
    assert len(old["warnings"]) == 1 and "interNodeGbps is deprecated" in old["warnings"][0]
    assert "interNodeBandwidth: 3.125GB" in old["warnings"][0]

    kubectl.patch_spec("chat", {"cluster": {"interNodeGbps": None, "interNodeBandwidth": "25Gbit"}})
    def reconciled():
        status = kubectl.status("chat")
        return status if status.get("observedGeneration") == 2 else None

    new = wait_for(reconciled, what="the rewritten spec reconciled")
    assert new["warnings"] == [] and new["planHash"] == old["planHash"], "same link, same plan"

"""Which of DistServe's two placement algorithms the cluster's network allows.

High node-affinity (prefill and decode instances placed independently, KV crossing the inter-node network)
is chosen when the network makes KV transfer negligible, on both counts:
  * per request: moving a mean prompt's KV takes at most 1% of the latency the SLOs allow a mean request
    (TTFT + mean output x TPOT), the project's target for KV transfer's share of request latency;
  * in aggregate: the KV bytes/s at the target rate use at most half of the nodes' combined network
    bandwidth, so transfers do not queue behind each other.
Otherwise low node-affinity: same-stage prefill and decode segments share a node and KV moves over NVLink.
DistServe's testbed (25 Gbit/s between nodes) lands on "low" for OPT-66B chatbot (a mean prompt's KV is
1.8 GB: 0.6 s, 3% of the allowed latency); a 200 Gbit/s+ fabric lands on "high".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .problem import SearchProblem

Affinity = Literal["high", "low"]
PER_REQUEST_SHARE = 0.01
AGGREGATE_SHARE = 0.5


@dataclass(frozen=True)
class AffinityChoice:
    """The decision and the two numbers behind it."""

    affinity: Affinity
    transfer_share: float  # mean prompt's KV transfer time / latency allowed to a mean request
    network_load: float  # KV bytes/s at the target rate / half the nodes' combined bandwidth

    def explain(self) -> str:
        return (
            f"{self.affinity} node-affinity: KV transfer is {self.transfer_share:.2%} of a mean request's allowed "
            f"latency (limit {PER_REQUEST_SHARE:.0%}), KV traffic {self.network_load:.0%} of the network budget"
        )


def choose_affinity(problem: SearchProblem, nodes: int) -> AffinityChoice:
    """High when the inter-node network carries KV negligibly (see module doc); a single node is always high."""
    stats, model = problem.stats, problem.latency.model
    kv_bytes = stats.mean_input * model.kv_bytes_per_token
    inter = problem.inter_node_gbps * 1e9
    allowed = problem.ttft_s + stats.mean_output * problem.tpot_s
    share = kv_bytes / inter / allowed
    load = problem.target_rate * kv_bytes / (AGGREGATE_SHARE * inter * nodes)
    high = nodes == 1 or (share <= PER_REQUEST_SHARE and load <= 1.0)
    return AffinityChoice("high" if high else "low", share, load)

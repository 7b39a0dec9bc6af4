"""The whole loop with traffic: `kubectl apply` -> the operator's pods serve (as processes, node_agent.py) ->
a real Prometheus scrapes them -> the workload drifts -> re-plan -> new pods -> traffic moves -> old pods go.

Short scenarios (a re-plan interval of a few seconds); bench/control_loop.py runs longer ones and plots them.
"""

from __future__ import annotations

import pytest

from .loop_harness import loop_rig
from .podnet import PodNetwork
from .prometheus import prometheus_binary
from .scenarios import run_scenario
from .traffic import Phase

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None, reason="needs the prometheus binary (apt install prometheus)"),
    pytest.mark.skipif(PodNetwork.unavailable_reason() is not None, reason=str(PodNetwork.unavailable_reason())),
]

INTERVAL_S = 4
WINDOW_S = 6
PLANNING_BOUND_S = 30.0  # the search runs on these 2 shared cores beside the pods it plans for
DRIFT = {"rateChange": 0.6, "stepChange": 1.0, "minRequests": 10, "stableIntervals": 2}


@pytest.fixture
def rig(api, cluster, namespace, tmp_path):
    if cluster.real:
        pytest.skip("the node agent plays kubelet for the emulator; a real cluster runs its own")
    with loop_rig(api, cluster.kubeconfig, namespace, tmp_path) as rig:
        yield rig
        assert not rig.agent.errors, rig.agent.errors


def _replan(**over):
    return {"replan": {"enabled": True, "intervalSeconds": INTERVAL_S, "windowSeconds": WINDOW_S, **DRIFT, **over}}


def test_a_rate_step_rolls_out_a_bigger_plan_without_failing_a_request(rig):
    result = run_scenario(rig, "step", [Phase(14, 4.0), Phase(36, 12.0)], step_phase=1,
                          interval_s=INTERVAL_S, window_s=WINDOW_S, **_replan())
    logs = rig.agent.all_logs()[-4000:]
    assert result.rollouts, f"no re-plan after a 3x step: {result.summary(WINDOW_S)}; {rig.kubectl.status('step').get('replan')}\n{logs}"
    # The step is visible in the window after a scrape or two; one reading past stepChange confirms it at the
    # next check. Planning itself (seconds of search on a loaded 2-core machine) comes on top.
    assert result.detection_intervals is not None and result.detection_intervals <= 2.0 + 1 / INTERVAL_S, \
        result.summary(WINDOW_S)
    planning_s = (result.reaction_intervals - result.detection_intervals) * INTERVAL_S
    assert planning_s <= PLANNING_BOUND_S, result.summary(WINDOW_S)
    print(result.summary(WINDOW_S))
    assert not result.failed, [(r.status, r.error) for r in result.failed][:5]
    assert result.min_capacity_ratio() >= 1.0, result.samples
    first, new = result.plans[0], result.rollouts[0]
    assert new.rate_planned > first.rate_planned * 1.6, (first, new)
    assert new.shape != first.shape


def test_stationary_noisy_load_rolls_out_nothing(rig):
    phases = [Phase(20 * INTERVAL_S, 4.0)]  # Poisson: each window's count is noisy, the level is not
    result = run_scenario(rig, "steady", phases, step_phase=None, interval_s=INTERVAL_S, window_s=WINDOW_S,
                          **_replan())
    checks = {s["replan"] for s in result.samples}
    assert "Steady" in checks, checks  # the loop did look
    assert result.rollouts == [], result.plans
    assert not result.failed
    print(result.summary(WINDOW_S))

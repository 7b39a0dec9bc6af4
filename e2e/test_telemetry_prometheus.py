"""Telemetry against a REAL Prometheus scraping the runtime's REAL router metrics.

Three exporters stand in for three routers: `alpha` in namespace `prod` (5 req/s, prompt 100, output
20 tokens), `beta` in `prod` (2 req/s, 1000/300 tokens) and `alpha` in `staging` (2 req/s, prompts of
200000 tokens, beyond the last finite bucket). Target labels stand in for the pod-label relabelling
of a Kubernetes scrape job. After ~8 s of driven traffic at 1 s scrapes, `PrometheusTelemetry` must read
each one back on its own: rate within 20 %, lengths in the bins of the driven lengths.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import kubernetes
import pytest
from disagg_operator import labels as lb
from disagg_operator import reporting
from disagg_operator.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION
from disagg_operator.kube import KINDS, KubeClient, load_api_client
from disagg_operator.planning import PlanFn, PlanningService, ProfileStore
from disagg_operator.reconcile import DISAGG_KIND, Outcome, Reconciler
from disagg_operator.render import RenderSettings
from disagg_operator.telemetry import (
    DriftDetector,
    MetricNames,
    PrometheusTelemetry,
    ScrapeLabels,
    replan_tick,
    telemetry_for,
)
from disagg_operator.telemetry.events import KubeEventPoster
from disagg_operator.telemetry.loop import ReplanLoop
from disagg_planner.api import DisaggServingSpec, LatencyProfile, Plan
from disagg_planner.errors import NoFeasiblePlan
from disagg_planner.search import find_plan
from prometheus_client import CollectorRegistry, start_http_server

from .conftest import Cluster
from .prometheus import PrometheusServer, ScrapeTarget, free_port, prometheus_binary
from .specs import small

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="needs the prometheus binary (/usr/bin/prometheus: apt install prometheus)"),
]

metrics = pytest.importorskip("disagg_runtime.metrics", reason="the runtime's metrics module defines the series")

DRIVE_S = 8.0
LABELS = ScrapeLabels()


@dataclass(frozen=True)
class Router:
    """One exporter: who it is, and the traffic driven through it."""

    instance: str
    namespace: str
    rate: float
    prompt: int
    output: int


ROUTERS = (Router("alpha", "prod", 5.0, 100, 20), Router("beta", "prod", 2.0, 1000, 300),
           Router("alpha", "staging", 2.0, 200_000, 600))


@dataclass(frozen=True)
class Driven:
    prom: PrometheusServer
    first_scrape: float  # when every target had been scraped once (their series exist from about then)
    t0: float
    t_end: float
    sent: dict[Router, int]


def _drive(recorders: dict[Router, metrics.RequestMetrics]) -> tuple[float, float, dict[Router, int]]:
    """Send each router's requests at fixed intervals for DRIVE_S seconds (wall clock)."""
    schedule = sorted(((i / r.rate, r) for r in ROUTERS for i in range(int(DRIVE_S * r.rate))), key=lambda e: e[0])
    sent = dict.fromkeys(ROUTERS, 0)
    t0 = time.time()
    for offset, router in schedule:
        delay = t0 + offset - time.time()
        if delay > 0:
            time.sleep(delay)
        recorders[router].finished(prompt_tokens=router.prompt, output_tokens=router.output, ttft=0.05, e2e=0.5)
        sent[router] += 1
    return t0, t0 + DRIVE_S, sent


@pytest.fixture(scope="module")
def driven() -> Iterator[Driven]:
    recorders, servers, targets = {}, [], []
    for router in ROUTERS:
        registry = CollectorRegistry()
        recorders[router] = metrics.RequestMetrics.create(registry)
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append(server)
        targets.append(ScrapeTarget(f"127.0.0.1:{port}",
                                    {LABELS.instance: router.instance, LABELS.namespace: router.namespace}))
    prom = PrometheusServer(targets)
    try:
        prom.start()
        first = prom.wait_for_scrapes(1)
        prom.wait_for_scrapes(1)  # the zeros are in twice: increase() sees the first requests
        t0, t_end, sent = _drive(recorders)
        while prom.wait_for_scrapes(1) < t_end:  # a scrape after the last request
            pass
        yield Driven(prom, first, t0, t_end, sent)
    finally:
        prom.stop()
        for server in servers:
            server.shutdown()
            server.server_close()


def _telemetry(driven: Driven, router: Router, window_s: float = DRIVE_S) -> PrometheusTelemetry:
    return PrometheusTelemetry(driven.prom.url, window_s, instance=router.instance, namespace=router.namespace)


async def test_reads_back_rate_and_length_bins(driven: Driven) -> None:
    router = ROUTERS[0]
    obs = await _telemetry(driven, router).observe(at=driven.t_end)
    assert obs.series_found
    assert obs.covered_s == pytest.approx(DRIVE_S)
    assert obs.rate_rps == pytest.approx(router.rate, rel=0.2)
    assert obs.requests == pytest.approx(driven.sent[router], rel=0.2)
    # 100 tokens fall in bucket (64, 128] = bin [65, 129); 20 in (16, 32] = [17, 33).
    assert obs.input_lengths is not None and obs.output_lengths is not None
    assert obs.input_mean == pytest.approx((65 + 128) / 2)
    assert obs.output_mean == pytest.approx((17 + 32) / 2)
    assert obs.input_overflow == 0 and obs.output_overflow == 0
    assert not obs.notes


async def test_series_of_other_resources_do_not_mix(driven: Driven) -> None:
    beta = await _telemetry(driven, ROUTERS[1]).observe(at=driven.t_end)
    assert beta.rate_rps == pytest.approx(ROUTERS[1].rate, rel=0.2)
    assert beta.input_mean == pytest.approx((769 + 1024) / 2)  # 1000 in (768, 1024]
    assert beta.output_mean == pytest.approx((257 + 384) / 2)  # 300 in (256, 384]
    nobody = await PrometheusTelemetry(driven.prom.url, DRIVE_S, instance="gamma", namespace="prod").observe(
        at=driven.t_end)
    assert not nobody.series_found and nobody.requests == 0 and nobody.input_lengths is None
    assert "no disagg_requests_total series" in nobody.notes[-1]


async def test_lengths_beyond_the_last_bucket_land_in_the_last_bin(driven: Driven) -> None:
    router = ROUTERS[2]
    obs = await _telemetry(driven, router).observe(at=driven.t_end)
    last = metrics.LENGTH_BUCKETS[-1]
    assert obs.input_lengths is not None
    assert obs.input_lengths.edges[-1] == last + 1
    assert obs.input_lengths.counts[-1] == pytest.approx(sum(obs.input_lengths.counts))
    assert obs.input_overflow == pytest.approx(driven.sent[router], rel=0.2)
    assert any(f"above the last finite bucket ({last})" in note for note in obs.notes)


async def test_a_deployment_younger_than_the_window_is_measured_over_its_age(driven: Driven) -> None:
    # 120 s: the age is measured in subquery steps of max(1 s, window / 200), so 1 s here
    obs = await _telemetry(driven, ROUTERS[0], window_s=120).observe(at=driven.t_end)
    age = driven.t_end - driven.first_scrape  # each target's first scrape is within a second before it
    assert obs.covered_s == pytest.approx(age, abs=1.5)
    assert obs.covered_s < 30
    assert obs.rate_rps == pytest.approx(obs.requests / obs.covered_s)
    assert obs.requests == pytest.approx(driven.sent[ROUTERS[0]], rel=0.2)


async def test_replan_tick_confirms_drift_from_live_metrics(driven: Driven) -> None:
    spec = DisaggServingSpec.model_validate({
        "model": {"preset": "tiny-llama"}, "cluster": {"nodes": 1, "gpusPerNode": 2, "gpuType": "CPU"},
        "workload": {"rate": 2.0, "dataset": "code"}, "slo": {"ttftMs": 500, "tpotMs": 100},
        "replan": {"enabled": True, "windowSeconds": 30, "stableIntervals": 1},
    })
    telemetry = telemetry_for(spec, "alpha", "prod", default_url=driven.prom.url, names=MetricNames())
    decision = await replan_tick(spec, {}, telemetry, DriftDetector.from_spec(spec.replan, min_requests=20),
                                 now=driven.t_end)
    assert decision.replan, decision.status.message
    assert decision.event is not None and decision.event.reason == "WorkloadDrift"
    assert "arrival rate" in decision.event.message
    observed = decision.status.observed_workload
    assert observed is not None and observed.input_lengths is not None
    assert observed.input_lengths.edges == [65, 129]  # trimmed to the one bin that saw traffic


@dataclass
class Operated:
    """One DisaggServing for a driven router, rolled out once, with the operator's pieces around it."""

    kube: KubeClient
    reconciler: Reconciler
    loop: ReplanLoop
    first: Outcome
    core: kubernetes.client.CoreV1Api

    def events(self, router: Router) -> list[kubernetes.client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(router.namespace).items
                if e.involved_object.name == router.instance and e.involved_object.kind == KIND]


@asynccontextmanager
async def operated(router: Router, driven: Driven, cluster: Cluster, api: kubernetes.client.ApiClient,
                   plan_fn: PlanFn | None = None, min_requests: float = 20) -> AsyncIterator[Operated]:
    if cluster.real:
        pytest.skip("the driven traffic comes from in-process exporters, not from router pods in the cluster")
    manifest = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": router.instance, "namespace": router.namespace},
                "spec": small(workload={"rate": 1.0, "dataset": "chatbot"}, replan={
                    "enabled": True, "prometheusUrl": driven.prom.url, "windowSeconds": 30, "stableIntervals": 1})}
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, router.namespace, PLURAL, manifest)
    kube = KubeClient(load_api_client(str(cluster.kubeconfig)))
    planning = PlanningService(plan_fn, workers=1)
    reconciler = Reconciler(kube, planning, ProfileStore(None), RenderSettings())
    poster = KubeEventPoster(kube.configuration)
    loop = ReplanLoop(kube, reconciler, namespaces=(router.namespace,), min_requests=min_requests,
                      post_event=poster)
    try:
        # the first rollout, as the operator's create handler does it
        cr = await kube.get(DISAGG_KIND, router.namespace, router.instance)
        assert cr is not None
        first = await reconciler.reconcile(cr)
        await kube.patch_status(DISAGG_KIND, router.namespace, router.instance, reporting.to_patch(
            reporting.success_status(reporting.previous_status(cr), first, cr["metadata"]["generation"])))
        yield Operated(kube, reconciler, loop, first, kubernetes.client.CoreV1Api(api))
    finally:
        await reconciler.delete_children(manifest)  # the emulator does no owner-reference garbage collection
        custom.delete_namespaced_custom_object(GROUP, VERSION, router.namespace, PLURAL, router.instance)
        planning.close()
        poster.close()
        kube.close()


async def test_the_replan_loop_rolls_out_a_plan_for_the_observed_workload(driven: Driven, cluster: Cluster,
                                                                          api: kubernetes.client.ApiClient) -> None:
    """Operator side, end to end: CR -> plan -> children; live traffic drifts -> new plan applied."""
    router = ROUTERS[0]
    async with operated(router, driven, cluster, api) as op:
        [checked] = await op.loop.check_all(now=driven.t_end)
        assert checked.decision.result == "Replanned", checked.decision.status.message
        assert checked.written and checked.error is None and checked.rollout is not None
        assert checked.rollout.plan_hash != op.first.plan_hash and checked.rollout.applied

        cr = await op.kube.get(DISAGG_KIND, router.namespace, router.instance)
        assert cr is not None
        status = cr["status"]
        observed = status["replan"]["observedWorkload"]
        assert checked.decision.observation is not None
        assert observed["rate"] == pytest.approx(checked.decision.observation.rate_rps)
        assert observed["inputLengths"]["edges"] == [65, 129]
        assert status["replan"]["replanPlanHash"] == status["planHash"] == checked.rollout.plan_hash
        assert status["plan"]["targetRateRps"] == pytest.approx(observed["rate"])
        assert cr["spec"]["workload"] == {"rate": 1.0, "dataset": "chatbot"}  # the spec is not rewritten
        # the Events say why, on the resource
        events = op.events(router)
        assert [e.reason for e in events] == ["WorkloadDrift", "Planned"]
        assert "arrival rate" in events[0].message and "re-planning for" in events[0].message
        # the children now carry the new plan
        sts = await op.kube.list(KINDS["StatefulSet"], router.namespace, {lb.INSTANCE: router.instance})
        assert sts and {s["metadata"]["labels"][lb.PLAN_HASH] for s in sts} == {checked.rollout.plan_hash}
        assert await op.loop.check_all(now=driven.t_end + 1) == []  # the next check waits for intervalSeconds


async def test_a_re_plan_that_fails_keeps_the_running_plan(driven: Driven, cluster: Cluster,
                                                           api: kubernetes.client.ApiClient) -> None:
    """The observed workload has no feasible plan: nothing is applied, the spec's workload stays in force."""

    def planner(spec: DisaggServingSpec, profile: LatencyProfile | None, **kw: object) -> Plan:
        if spec.workload.rate > 1.2:  # the planner, with a GPU budget the observed ~2 req/s does not fit
            raise NoFeasiblePlan(f"{spec.workload.rate:.2f} req/s needs more GPUs than the budget")
        return find_plan(spec, profile, **kw)

    router = ROUTERS[1]
    async with operated(router, driven, cluster, api, plan_fn=planner, min_requests=10) as op:
        [checked] = await op.loop.check_all(now=driven.t_end)
        assert checked.decision.replan and checked.rollout is None and checked.written
        assert checked.error is not None and "needs more GPUs" in checked.error
        cr = await op.kube.get(DISAGG_KIND, router.namespace, router.instance)
        assert cr is not None
        replan = cr["status"]["replan"]
        assert replan.get("observedWorkload") is None  # not adopted: later reconciles keep the working plan
        assert replan["message"].startswith("re-plan for the observed workload failed, the running plan stays")
        assert cr["status"]["planHash"] == op.first.plan_hash
        [event] = op.events(router)
        assert event.type == "Warning" and event.reason == "ReplanFailed"

"""A plan of tp=2 x pp=2 instances through the operator (kmock): the children are pods holding 4 GPUs' ranks
(or one stage's tp GPUs each, for low node affinity), with args and rendezvous env the runtime accepts."""

from __future__ import annotations

import argparse

import pytest
from disagg_runtime.parallel.launcher import LaunchPlan
from disagg_runtime.serve.options import add_serve_arguments, check_serve_arguments

from .conftest import wait_for
from .kubectl import Kubectl
from .specs import by_group, container_gpus, expected_workloads, small

# OPT-66B's 132 GB of weights on 40 GiB GPUs with tp <= 2 and pp <= 2: only tp2 x pp2 instances fit.
SPEC = small(model={"preset": "opt-66b", "path": "/models/opt-66b"},
             cluster={"nodes": 2, "gpusPerNode": 4,
                      "gpu": {"name": "G40", "memoryGib": 40, "peakTflops": 312, "hbmGbps": 2039}},
             slo={"ttftMs": 5000, "tpotMs": 400}, search={"maxTp": 2, "maxPp": 2},
             mode="disaggregated")  # about multi-GPU prefill/decode pods; auto could colocate


def _parse(container) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(container["args"][1:])
    check_serve_arguments(args)
    return args


@pytest.mark.parametrize("inter_gbps", [100.0, 0.1], ids=["high-affinity", "low-affinity"])
def test_tp2_pp2_plan_renders_multi_gpu_pods(api, namespace, start_operator, inter_gbps):
    kubectl = Kubectl(api, namespace)
    start_operator()
    spec = {**SPEC, "cluster": {**SPEC["cluster"], "interNodeGbps": inter_gbps}}
    cr = kubectl.create("big", spec)
    status = wait_for(lambda: (s := kubectl.status("big")).get("observedGeneration") == cr["metadata"]["generation"]
                      and s.get("phase") in ("Progressing", "Ready") and s, what="rollout", timeout=60)
    plan = status["plan"]
    assert (plan["prefill"]["tp"], plan["prefill"]["pp"], plan["decode"]["tp"], plan["decode"]["pp"]) == (2, 2, 2, 2)
    assert plan["affinity"] == ("high" if inter_gbps == 100.0 else "low")
    workers = by_group(kubectl.children("big"))
    assert sorted(workers) == sorted(expected_workloads("big", plan))
    for name, want in expected_workloads("big", plan).items():
        sts = workers[name]
        assert container_gpus(sts) == want["gpus"]
        for container in sts["spec"]["template"]["spec"]["containers"]:
            args = _parse(container)
            env = {e["name"]: e.get("value", "10.1.2.3" if e["name"] == "POD_IP" else "0") for e in container["env"]}
            env["MASTER_ADDR"] = env["MASTER_ADDR"].replace("$(POD_INDEX)", env.get("POD_INDEX", ""))
            launch = LaunchPlan.from_env(4, tp=args.tp, stage=args.stage if args.pp > 1 else None, env=env)
            assert (args.tp, args.pp, launch.world) == (2, 2, 4)
            # A pod launches the ranks of its GPUs: all four, or its stage's two.
            assert launch.local_ranks == container_gpus(sts)[container["name"]]
            if plan["affinity"] == "low":
                stage0 = workers["big-segment-s0"]["metadata"]["name"]
                assert launch.master_addr == f"{stage0}-0.{stage0}.{namespace}.svc"
    assert status["phase"] in ("Progressing", "Ready")

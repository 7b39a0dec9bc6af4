"""`kubectl apply -f examples/k8s` works: every file there is a Kubernetes object kubectl can map to a
resource (the DisaggServing CRD installed), and a server-side dry run accepts it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import REPO, Cluster

K8S = REPO / "examples" / "k8s"


def _kubectl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (.ci/run installs it)")
    return subprocess.run([kubectl, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True,
                          text=True, timeout=120)


def test_kubectl_client_dry_run_applies_the_whole_folder(cluster: Cluster):
    run = _kubectl(cluster, "apply", "--dry-run=client", "--validate=false", "-n", "default", "-f", str(K8S))
    assert run.returncode == 0, run.stderr
    applied = sorted(line.split()[0] for line in run.stdout.splitlines())
    names = sorted(f"disaggserving.disagg.io/{p.stem.removeprefix('disaggserving-')}" for p in K8S.glob("*.yaml"))
    assert applied == names

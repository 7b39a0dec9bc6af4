"""The Argo CD health script for DisaggServing, run by the real Lua interpreter against real statuses.

Statuses come from the operator's own reporting functions (what it writes on each path), wrapped in a
DisaggServing object and handed to the script as the `obj` global, as Argo CD does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from disagg_operator import reporting
from disagg_operator.reconcile import Outcome
from disagg_operator.status import DisaggServingStatus
from operator_plans import high_plan, spec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "charts" / "disagg-operator" / "argocd" / "health.lua"
CUSTOMIZATION_KEY = "resource.customizations.health.disagg.io_DisaggServing"


def lua_literal(value: Any) -> str:
    """A Lua table/scalar literal of a JSON-shaped Python value (None becomes nil, as in Argo's decoder)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(c if c.isprintable() and c not in '\\"' else f"\\{ord(c):03d}" for c in value)
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = shutil.which("lua5.4")
    if lua is None:
        pytest.fail("lua5.4 is not installed (.ci/run installs it)")
    harness = (f"obj = {lua_literal(obj)}\n"
               f"local hs = dofile({lua_literal(str(SCRIPT))})\n"
               "io.write(hs.status, '\\n', hs.message or '')\n")
    run = subprocess.run([lua, "-"], input=harness, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    status, _, message = run.stdout.partition("\n")
    return status, message


def _outcome(*, paused=False, ready=False) -> Outcome:
    return Outcome(spec=spec(), plan=high_plan(), plan_hash="h1", plan_cached=False, plan_changed=True,
                   paused=paused, children=("StatefulSet/chat-prefill",), applied=(), pruned=(), ready=ready)


def _cr(status: DisaggServingStatus | None, *, generation=2, paused=False) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "disagg.io/v1alpha1", "kind": "DisaggServing",
                           "metadata": {"name": "chat", "namespace": "default", "generation": generation},
                           "spec": {**spec().to_wire(), "paused": paused}}
    if status is not None:
        obj["status"] = reporting.to_patch(status)
    return obj


def test_ready_is_healthy_and_says_the_plan():
    status = reporting.success_status(DisaggServingStatus(), _outcome(ready=True), generation=2)
    state, message = health(_cr(status))
    assert state == "Healthy" and "prefill 3x tp2pp1" in message


def test_rolling_out_is_progressing():
    status = reporting.success_status(DisaggServingStatus(), _outcome(), generation=2)
    assert health(_cr(status)) == ("Progressing", status.condition("Progressing").message)


def test_not_yet_planned_or_stale_status_is_progressing():
    assert health(_cr(None))[0] == "Progressing"
    ready = reporting.success_status(DisaggServingStatus(), _outcome(ready=True), generation=1)
    state, message = health(_cr(ready, generation=2))
    assert state == "Progressing" and "generation 2" in message


def test_paused_is_suspended():
    status = reporting.success_status(DisaggServingStatus(), _outcome(paused=True), generation=2)
    assert health(_cr(status, paused=True))[0] == "Suspended"


@pytest.mark.parametrize("planned", [True, False])
def test_failures_are_degraded_with_the_operators_message(planned):
    good = reporting.success_status(DisaggServingStatus(), _outcome(ready=True), generation=1)
    failed = reporting.failure_status(good, reporting.NO_FEASIBLE_PLAN, "no placement meets the SLO at 9 req/s",
                                      generation=2, planned=planned)
    assert health(_cr(failed)) == ("Degraded", "no placement meets the SLO at 9 req/s")
    assert health(_cr(failed, paused=True))[0] == "Degraded", "a failure outranks paused"


def test_messages_with_quotes_and_newlines_survive():
    good = reporting.success_status(DisaggServingStatus(), _outcome(ready=True), generation=1)
    failed = reporting.failure_status(good, reporting.APPLY_FAILED, 'apply "x"\nfailed: é', generation=2,
                                      planned=True)
    assert health(_cr(failed)) == ("Degraded", 'apply "x"\nfailed: é')


def test_docs_ship_the_script_under_argo_cds_key_for_the_crds_group():
    from disagg_operator.crd import GROUP, KIND

    assert CUSTOMIZATION_KEY == f"resource.customizations.health.{GROUP}_{KIND}"
    doc = (REPO / "docs" / "argocd.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    cm = yaml.safe_load(block)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][CUSTOMIZATION_KEY] == SCRIPT.read_text()

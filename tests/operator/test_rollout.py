"""Surge rollout rules: which children of an earlier plan keep serving, how the router lists them, the status."""

from __future__ import annotations

import asyncio

from disagg_operator import reporting
from disagg_operator.locks import KeyedLocks
from disagg_operator.reconcile import Outcome
from disagg_operator.render import child_key, render_children
from disagg_operator.rollout import retiring_endpoints, sort_stale
from disagg_operator.status import DisaggServingStatus
from operator_plans import high_plan, render_input, spec


def _live(plan, ready: int | None = None) -> dict[str, dict]:
    """A plan's children as the API server would list them, workloads with `ready` ready pods."""
    out = {}
    for obj in render_children(render_input(plan)):
        if ready is not None and obj["kind"] in ("StatefulSet", "Deployment"):
            obj["status"] = {"readyReplicas": ready}
        out[child_key(obj)] = obj
    return out


def _wider_decode():
    base = high_plan()
    return base.model_copy(update={"decode": base.decode.model_copy(update={"tp": 4, "pp": 1})})


def test_serving_workloads_of_the_old_shape_retire_with_their_service_the_rest_is_pruned():
    old = _live(high_plan(), ready=1)
    desired = set(_live(_wider_decode()))
    stale = sort_stale(old, desired)
    decode = next(k for k in old if k.startswith("StatefulSet/chat-decode-"))
    service = "Service/" + decode.split("/", 1)[1]
    assert stale.retiring == tuple(sorted((decode, service)))
    assert stale.prune == ()  # prefill kept its shape: it is in the new plan, not stale


def test_workloads_without_a_ready_pod_serve_nothing_and_go_at_once():
    old = _live(high_plan(), ready=0)
    stale = sort_stale(old, set(_live(_wider_decode())))
    assert stale.retiring == ()
    assert {k.split("-", 2)[1] for k in stale.prune} == {"decode"} and len(stale.prune) == 2


def test_nothing_is_stale_when_only_replicas_change():
    base = high_plan()
    more = base.model_copy(update={"prefill": base.prefill.model_copy(update={"replicas": 7})})
    assert sort_stale(_live(base, ready=3), set(_live(more))) == sort_stale({}, set())


def test_retiring_endpoints_are_the_old_pods_urls():
    old = _live(high_plan(), ready=1)
    stale = sort_stale(old, set(_live(_wider_decode())))
    decode = next(k for k in stale.retiring if k.startswith("StatefulSet/"))
    name = decode.split("/", 1)[1]
    assert retiring_endpoints(old, stale.retiring) == {"decode": [f"http://{name}-0.{name}.serving.svc:8001"]}


def _outcome(**over) -> Outcome:
    fields = dict(spec=spec(), plan=high_plan(), plan_hash="h2", plan_cached=False, plan_changed=True, paused=False,
                  children=("ConfigMap/chat-plan", "StatefulSet/chat-decode-bbbbbb"), applied=(), pruned=(),
                  ready=False, retiring=("Service/chat-decode-aaaaaa", "StatefulSet/chat-decode-aaaaaa"))
    return Outcome(**{**fields, **over})


def test_status_while_rolling_out_then_ready():
    rolling = reporting.success_status(DisaggServingStatus(), _outcome(), generation=4)
    conds = {c.type: c for c in rolling.conditions}
    assert rolling.phase == "Progressing" and rolling.retiring == list(_outcome().retiring)
    assert (conds["Progressing"].status, conds["Progressing"].reason) == ("True", "RollingOut")
    assert (conds["Ready"].status, conds["Ready"].reason) == ("False", "RollingOut")
    assert "1 workloads of the previous plan keep serving" in conds["Progressing"].message
    done = reporting.success_status(rolling, _outcome(retiring=(), ready=True,
                                                      pruned=_outcome().retiring), generation=4)
    conds = {c.type: c for c in done.conditions}
    assert done.phase == "Ready" and done.retiring == []
    assert (conds["Progressing"].status, conds["Progressing"].reason) == ("False", "RolloutComplete")
    assert conds["Ready"].status == "True"
    # A failure keeps the record of what still serves.
    failed = reporting.failure_status(rolling, reporting.APPLY_FAILED, "503", 4, planned=True)
    assert failed.retiring == rolling.retiring


async def test_keyed_locks_serialise_one_key_and_leave_others_free():
    locks = KeyedLocks()
    order: list[str] = []

    async def work(key: str, tag: str, pause: float) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            await asyncio.sleep(pause)
            order.append(f"{tag}-")

    await asyncio.gather(work("a", "a1", 0.05), work("a", "a2", 0), work("b", "b1", 0))
    assert order.index("a1-") < order.index("a2+")  # the second holder of "a" waited for the first
    assert order.index("b1-") < order.index("a1-")  # "b" did not wait for "a"
    assert len(locks) == 0  # no lock left behind once nobody holds or awaits it

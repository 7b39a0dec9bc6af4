"""One reconcile of a DisaggServing: validate -> plan (cached) -> render -> apply -> prune -> observe.

Independent of kopf: it takes the resource body and returns an `Outcome`; `handlers.py` turns that
into status, events and kopf's retry semantics.

Rollout: a plan change applies the new plan's children first; workloads of earlier plans that still
serve are deleted only once the new ones are ready (rollout.py has the rules, `Outcome.retiring`
lists them meanwhile).

Idempotence: every child carries a `disagg.io/applied-hash` annotation, the digest of what was
last applied. A child whose live copy has that digest and still contains every desired field is
left alone, so a second reconcile sends no writes at all (and the resourceVersions stay put).
Any other child is server-side applied, which also removes fields the operator stopped setting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

from disagg_planner.api import DisaggServingSpec, Plan
from pydantic import ValidationError

from . import labels as lb
from .crd import API_VERSION, KIND, PLURAL, VERSION
from .errors import InvalidSpecError
from .kube import CHILD_KINDS, Kind, KubeClient
from .locks import KeyedLocks
from .planning import PlanningService, ProfileStore
from .profiles import ProfileResolver
from .render import Owner, RenderInput, RenderSettings, child_key, render_children
from .rollout import retiring_endpoints, sort_stale
from .telemetry.replan import effective_spec
from .token_secret import desired_token_secret

APPLIED_HASH = "disagg.io/applied-hash"
DISAGG_KIND = Kind(API_VERSION, KIND, PLURAL)
DISAGG_CHILD = {kind.kind: kind for kind in CHILD_KINDS}
_FIRST = ("ServiceAccount", "ConfigMap", "Secret")  # referenced by the pods: apply them before the workloads


@dataclass(frozen=True)
class Outcome:
    """What one reconcile decided and did."""

    spec: DisaggServingSpec
    plan: Plan
    plan_hash: str
    plan_cached: bool
    plan_changed: bool
    paused: bool
    children: tuple[str, ...]
    applied: tuple[str, ...]
    pruned: tuple[str, ...]
    ready: bool  # every workload of the plan ready, and nothing of an earlier plan left serving
    retiring: tuple[str, ...] = ()  # children of earlier plans serving until the plan's workloads are ready


def parse_spec(raw: Mapping[str, Any] | None) -> DisaggServingSpec:
    """Validate a CR's spec with the planner's pydantic tree; errors name the field (camelCase)."""
    try:
        return DisaggServingSpec.model_validate(dict(raw or {}))
    except ValidationError as exc:
        fields, parts = [], []
        for err in exc.errors():
            path = ".".join(["spec", *(str(p) for p in err["loc"])])
            fields.append(path)
            parts.append(f"{path}: {err['msg']}")
        raise InvalidSpecError("; ".join(parts), tuple(fields)) from None


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(api_version=body.get("apiVersion", f"disagg.io/{VERSION}"), kind=body.get("kind", KIND),
                 name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""))


def applied_hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` is in `live` with the same value (lists: same length)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    return live == desired


def is_ready(obj: Mapping[str, Any]) -> bool:
    """A workload whose controller has caught up with its spec and has every replica ready."""
    if obj.get("kind") not in ("StatefulSet", "Deployment"):
        return True
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    caught_up = generation is None or status.get("observedGeneration", -1) >= generation
    return caught_up and status.get("readyReplicas", 0) >= obj.get("spec", {}).get("replicas", 1)


def controlled_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    """Owned by this resource (by uid when both sides have one; by name otherwise)."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == owner.kind and ref.get("controller"):
            return ref.get("uid") == owner.uid if (owner.uid and ref.get("uid")) else ref.get("name") == owner.name
    return False


class Reconciler:
    """Drives one DisaggServing's children towards its plan.

    Callers hold `exclusive(namespace, name)` from reading the resource until its status is written
    (see locks.py).
    """

    def __init__(self, kube: KubeClient, planning: PlanningService, profiles: ProfileStore,
                 settings: RenderSettings) -> None:
        self.kube = kube
        self._planning = planning
        self._profiles = ProfileResolver(kube, profiles)
        self._settings = settings
        self._locks = KeyedLocks()

    def exclusive(self, namespace: str, name: str) -> AbstractAsyncContextManager[None]:
        """Hold this while reconciling one resource and writing its status."""
        return self._locks.hold((namespace, name))

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        status = body.get("status") or {}
        # A drift re-plan's observed workload (status.replan) stands in for spec.workload until the spec's
        # workload is edited; without this a resume or an image change would undo the re-plan.
        spec = effective_spec(parse_spec(body.get("spec")), status)
        owner = owner_of(body)
        profile = await self._profiles.resolve(spec, owner.namespace)
        key = self._planning.key(spec, profile)
        if status.get("planHash") == key and status.get("plan"):
            # Survives operator restarts: a resource planned before is not searched again.
            self._planning.remember(key, Plan.model_validate(status["plan"]))
        result = await self._planning.plan(spec, profile)
        secret, token = await desired_token_secret(self.kube, owner, key, spec.internal_token.rotation)
        inp = RenderInput(owner=owner, spec=spec, plan=result.plan, plan_hash=key, profile=profile,
                          settings=self._settings, internal_token=token)
        desired = [secret, *render_children(inp)]
        keys = tuple(child_key(o) for o in desired)
        common = dict(spec=spec, plan=result.plan, plan_hash=key, plan_cached=result.cached,
                      plan_changed=status.get("planHash") != key, children=keys)
        if spec.paused:
            return Outcome(**common, paused=True, applied=(), pruned=(), ready=False)

        live = await self._live_children(owner)
        stale = sort_stale({k: o for k, o in live.items() if controlled_by(o, owner)}, set(keys))
        if stale.retiring:
            desired = [secret, *render_children(replace(inp, retiring_endpoints=retiring_endpoints(live, stale.retiring)))]
        results = await self._converge_all(desired, live)
        applied = {child_key(o) for o, (_, changed) in zip(desired, results, strict=True) if changed}
        workloads_ready = all(is_ready(obj) for obj, _ in results)
        retiring, gone = stale.retiring, stale.prune
        if retiring and workloads_ready:
            # The new plan serves on its own: the router's list drops the old pods first, then they go.
            now = {**live, **{child_key(o): obj for o, (obj, _) in zip(desired, results, strict=True)}}
            config = next(o for o in render_children(inp) if o["kind"] == "ConfigMap")
            if (await self._converge_all([config], now))[0][1]:
                applied.add(child_key(config))
            retiring, gone = (), stale.prune + stale.retiring
        pruned = await self._delete(owner.namespace, gone)
        return Outcome(**common, paused=False, applied=tuple(k for k in keys if k in applied), pruned=pruned,
                       ready=workloads_ready and not retiring, retiring=retiring)

    async def _live_children(self, owner: Owner) -> dict[str, dict[str, Any]]:
        """`Kind/name` -> object for every child kind labelled as this resource's."""
        selector = {lb.NAME: lb.APP_NAME, lb.INSTANCE: owner.name, lb.MANAGED: lb.MANAGED_BY}
        lists = await asyncio.gather(*(self.kube.list(kind, owner.namespace, selector) for kind in CHILD_KINDS))
        return {f"{kind.kind}/{obj['metadata']['name']}": obj
                for kind, objs in zip(CHILD_KINDS, lists, strict=True) for obj in objs}

    async def _converge_all(self, desired: list[dict[str, Any]],
                            live: Mapping[str, dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
        """Apply what differs from its live copy: the pods' ServiceAccount and ConfigMap before the rest."""
        for obj in desired:
            obj["metadata"].setdefault("annotations", {})[APPLIED_HASH] = applied_hash(obj)
        first = [i for i, o in enumerate(desired) if o["kind"] in _FIRST]
        rest = [i for i, o in enumerate(desired) if o["kind"] not in _FIRST]
        results: dict[int, tuple[dict[str, Any], bool]] = {}
        for batch in (first, rest):
            done = await asyncio.gather(*(self._converge(desired[i], live.get(child_key(desired[i])))
                                          for i in batch))
            results.update(zip(batch, done, strict=True))
        return [results[i] for i in range(len(desired))]

    async def _converge(self, desired: dict[str, Any], live: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
        if live is not None and contains(live, desired):
            return live, False
        return await self.kube.apply(desired), True

    async def _delete(self, namespace: str, keys: tuple[str, ...]) -> tuple[str, ...]:
        kinds = [DISAGG_CHILD[key.split("/", 1)[0]] for key in keys]
        await asyncio.gather(*(self.kube.delete(kind, namespace, key.split("/", 1)[1])
                               for kind, key in zip(kinds, keys, strict=True)))
        return keys

    async def _prune(self, owner: Owner, keep: set[str]) -> tuple[str, ...]:
        """Delete this resource's children other than `keep`."""
        live = await self._live_children(owner)
        return await self._delete(owner.namespace, tuple(
            key for key, obj in live.items() if key not in keep and controlled_by(obj, owner)))

    async def delete_children(self, body: Mapping[str, Any]) -> tuple[str, ...]:
        """Delete every child of a deleted resource (garbage collection does it too on real clusters)."""
        return await self._prune(owner_of(body), keep=set())

    async def sweep_orphans(self, namespaces: tuple[str, ...]) -> tuple[str, ...]:
        """Delete children whose DisaggServing is gone (e.g. deleted while the operator was down)."""
        scopes: tuple[str | None, ...] = namespaces or (None,)
        owners: set[str] = set()
        for ns in scopes:
            for cr in await self.kube.list(DISAGG_KIND, ns, {}):
                owners.add(cr["metadata"].get("uid") or f"{cr['metadata'].get('namespace')}/{cr['metadata']['name']}")
        selector = {lb.NAME: lb.APP_NAME, lb.MANAGED: lb.MANAGED_BY}
        orphans: list[tuple[Kind, str, str]] = []
        for ns in scopes:
            for kind in CHILD_KINDS:
                for obj in await self.kube.list(kind, ns, selector):
                    meta = obj["metadata"]
                    refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == KIND and r.get("controller")]
                    if not refs:
                        continue
                    ident = refs[0].get("uid") or f"{meta.get('namespace')}/{refs[0].get('name')}"
                    if ident not in owners:
                        orphans.append((kind, meta.get("namespace") or "default", meta["name"]))
        await asyncio.gather(*(self.kube.delete(kind, ns, name) for kind, ns, name in orphans))
        return tuple(f"{kind.kind}/{name}" for kind, _, name in orphans)


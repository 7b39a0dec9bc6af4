"""The latency profile a reconcile plans with: `spec.profile`'s ConfigMap, else a shipped one, else none.

A profile named by `spec.profile.configMapRef` is read from the resource's own namespace on every
reconcile, so a ConfigMap created or fixed after the resource heals it at the next retry, and an
edited profile reaches the plan at the next reconcile (the planning cache key holds the profile's
content digest, see planning.py). A named profile that cannot be used is an error, never a silent
fall back to another latency model: the user asked for measured numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from disagg_planner.api import DisaggServingSpec, LatencyProfile
from disagg_planner.api.deploy import ConfigMapKeyRef
from disagg_planner.errors import PlannerError
from pydantic import ValidationError

from .errors import InvalidProfileError, ProfileNotFoundError
from .kube import KINDS, KubeClient
from .planning import ProfileStore


class ProfileResolver:
    """Finds the profile for a spec; checked ConfigMap values are kept by content digest and model/GPU."""

    def __init__(self, kube: KubeClient, store: ProfileStore, *, cache_size: int = 32) -> None:
        self._kube = kube
        self._store = store
        self._checked: OrderedDict[tuple[str, str, str], LatencyProfile] = OrderedDict()
        self._cache_size = cache_size

    async def resolve(self, spec: DisaggServingSpec, namespace: str) -> LatencyProfile | None:
        """The referenced profile; without a reference, the store's match for the model and GPU (or None)."""
        if spec.profile is None:
            return self._store.find(spec)
        ref = spec.profile.config_map_ref
        text = await self._read(ref, namespace)
        key = (hashlib.sha256(text.encode()).hexdigest(), spec.model.spec.model_dump_json(exclude={"name"}),
               spec.cluster.gpu_spec.name)
        if key in self._checked:
            self._checked.move_to_end(key)
            return self._checked[key]
        # Up to a ConfigMap's 1 MiB of JSON, and a least-squares fit per shape: off the event loop.
        profile = await asyncio.to_thread(validate_profile, text, spec, ref)
        self._checked[key] = profile
        while len(self._checked) > self._cache_size:
            self._checked.popitem(last=False)
        return profile

    async def _read(self, ref: ConfigMapKeyRef, namespace: str) -> str:
        cm = await self._kube.get(KINDS["ConfigMap"], namespace, ref.name)
        if cm is None:
            raise ProfileNotFoundError(
                f"spec.profile.configMapRef: ConfigMap {namespace}/{ref.name} does not exist; create it with the "
                f"profile under key {ref.key!r} (kubectl create configmap {ref.name} --from-file={ref.key}=<profile>"
                f".json), the operator retries")
        data = cm.get("data") or {}
        if ref.key in data:
            return data[ref.key]
        if ref.key in (cm.get("binaryData") or {}):
            hint = "it is under binaryData; store the profile JSON as text under data"
        else:
            hint = f"its keys: {', '.join(sorted(data)) or 'none'}"
        raise ProfileNotFoundError(
            f"spec.profile.configMapRef: ConfigMap {namespace}/{ref.name} has no key {ref.key!r} ({hint})")


def validate_profile(text: str, spec: DisaggServingSpec, ref: ConfigMapKeyRef) -> LatencyProfile:
    """Parse a profile and check that it can plan `spec`: its GPU type, its model's shape, and the fits."""
    where = f"spec.profile.configMapRef: {ref.name}[{ref.key}]"
    try:
        profile = LatencyProfile.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise InvalidProfileError(f"{where} is not a latency profile (write it with `disagg profile`): "
                                  f"{problems}") from None
    if profile.gpu != spec.cluster.gpu_spec.name:
        raise InvalidProfileError(
            f"{where} was measured on {profile.gpu!r}, but the cluster's GPU type is {spec.cluster.gpu_spec.name!r}; "
            f"profile that GPU type or point spec.profile at its profile")
    # The name is free (a fine-tune has its base's shape); the shape must be the spec's model's.
    if profile.model.model_dump(exclude={"name"}) != spec.model.spec.model_dump(exclude={"name"}):
        raise InvalidProfileError(
            f"{where} is of {profile.model.name}, whose shape differs from the spec's model "
            f"{spec.model.spec.name}; profile the spec's model or point spec.profile at its profile")
    from disagg_planner.search.latency_source import latency_model  # the search package loads on first use

    try:
        latency_model(spec, profile)
    except PlannerError as exc:
        raise InvalidProfileError(f"{where}: {exc}") from None
    return profile

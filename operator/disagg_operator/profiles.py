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
from pydantic import ValidationError

from .errors import InvalidProfileError, ProfileNotFoundError
from .kube import KINDS, KubeClient
from .planning import ProfileStore


class ProfileResolver:
    """Finds the profile for a spec; parsed ConfigMap values are kept by content digest."""

    def __init__(self, kube: KubeClient, store: ProfileStore, *, cache_size: int = 32) -> None:
        self._kube = kube
        self._store = store
        self._parsed: OrderedDict[str, LatencyProfile] = OrderedDict()
        self._cache_size = cache_size

    async def resolve(self, spec: DisaggServingSpec, namespace: str) -> LatencyProfile | None:
        """The referenced profile; without a reference, the store's match for the model and GPU (or None)."""
        if spec.profile is None:
            return self._store.find(spec)
        ref = spec.profile.config_map_ref
        text = await self._read(ref, namespace)
        profile = await self._parse(text, ref)
        check_matches(profile, spec, ref)
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

    async def _parse(self, text: str, ref: ConfigMapKeyRef) -> LatencyProfile:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in self._parsed:
            self._parsed.move_to_end(digest)
            return self._parsed[digest]
        try:
            # Up to a ConfigMap's 1 MiB of JSON: parsed off the event loop.
            profile = await asyncio.to_thread(LatencyProfile.model_validate_json, text)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                                 for e in exc.errors()[:5])
            raise InvalidProfileError(
                f"spec.profile.configMapRef: {ref.name}[{ref.key}] is not a latency profile "
                f"(write it with `disagg profile`): {problems}") from None
        self._parsed[digest] = profile
        while len(self._parsed) > self._cache_size:
            self._parsed.popitem(last=False)
        return profile


def check_matches(profile: LatencyProfile, spec: DisaggServingSpec, ref: ConfigMapKeyRef) -> None:
    """A profile measures one model shape on one GPU type; planning another with it would mislead."""
    where = f"spec.profile.configMapRef: the profile in {ref.name}[{ref.key}]"
    if profile.gpu != spec.cluster.gpu_spec.name:
        raise InvalidProfileError(
            f"{where} was measured on {profile.gpu!r}, but the cluster's GPU type is "
            f"{spec.cluster.gpu_spec.name!r}; profile that GPU type or point spec.profile at its profile")
    # The name is free (a fine-tune has its base's shape); the shape must be the spec's model's.
    if profile.model.model_dump(exclude={"name"}) != spec.model.spec.model_dump(exclude={"name"}):
        raise InvalidProfileError(
            f"{where} is of {profile.model.name}, whose shape differs from the spec's model "
            f"{spec.model.spec.name}; profile the spec's model or point spec.profile at its profile")

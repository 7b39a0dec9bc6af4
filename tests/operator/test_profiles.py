"""spec.profile: the profile read from a ConfigMap, every way it can be unusable, and the planning key."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest
from disagg_operator.errors import InvalidProfileError, ProfileNotFoundError
from disagg_operator.kube import Kind
from disagg_operator.planning import PlanningService, ProfileStore
from disagg_operator.profiles import ProfileResolver, validate_profile
from disagg_planner.api import MODEL_PRESETS, LatencyProfile, ShapeProfile
from disagg_planner.api.deploy import ConfigMapKeyRef
from disagg_planner.api.profile import DecodeSample, PrefillSample
from operator_plans import spec

CREATED = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
REF = {"configMapRef": {"name": "opt13b-a100", "key": "profile.json"}}


def profile_json(*, gpu: str = "A100-80GB", model: str = "opt-13b", slope: float = 1e-4, samples: int = 3) -> str:
    shape = ShapeProfile(
        prefill=[PrefillSample(batch_size=1, sum_tokens=n, sum_sq_tokens=n * n, seconds=0.02 + n * slope)
                 for n in (64, 256, 1024)[:samples]],
        decode=[DecodeSample(batch_size=b, sum_context=b * 100, seconds=0.02 + b * slope) for b in (1, 8, 32)])
    return LatencyProfile(model=MODEL_PRESETS[model], gpu=gpu, shapes=[shape],
                          created=CREATED).model_dump_json(by_alias=True)


@dataclass
class ConfigMaps:
    """What the resolver asks the API server for: ConfigMaps by namespace and name (counts the reads)."""

    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    reads: int = 0

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert kind.kind == "ConfigMap"
        self.reads += 1
        return self.items.get((namespace or "", name))


def test_the_spec_takes_a_config_map_ref_with_a_default_key():
    s = spec(profile={"configMapRef": {"name": "p"}})
    assert s.profile is not None and s.profile.config_map_ref.key == "profile.json"
    assert s.planning_hash() == spec().planning_hash()  # the content, not the reference, moves the plan
    with pytest.raises(ValueError, match="configMapRef.name"):
        spec(profile={"configMapRef": {"name": "Not_A_Name"}})


async def test_missing_config_map_then_missing_key_then_found():
    maps = ConfigMaps()
    resolver = ProfileResolver(maps, ProfileStore(None))  # type: ignore[arg-type]
    s = spec(profile=REF)
    with pytest.raises(ProfileNotFoundError, match=r"ConfigMap serving/opt13b-a100 does not exist.*retries"):
        await resolver.resolve(s, "serving")
    maps.items[("serving", "opt13b-a100")] = {"data": {"other.json": "{}"}}
    with pytest.raises(ProfileNotFoundError, match=r"has no key 'profile.json' \(its keys: other.json\)"):
        await resolver.resolve(s, "serving")
    maps.items[("serving", "opt13b-a100")] = {"binaryData": {"profile.json": "e30="}}
    with pytest.raises(ProfileNotFoundError, match="under binaryData"):
        await resolver.resolve(s, "serving")
    maps.items[("serving", "opt13b-a100")] = {"data": {"profile.json": profile_json()}}
    found = await resolver.resolve(s, "serving")
    assert found is not None and found.gpu == "A100-80GB"
    assert await resolver.resolve(s, "serving") is found  # checked once per content
    assert maps.reads == 5  # but read on every reconcile: an edited profile is seen at the next one
    with pytest.raises(ProfileNotFoundError):
        await resolver.resolve(s, "other-namespace")  # the resource's own namespace only


async def test_without_a_ref_the_shipped_store_answers(tmp_path):
    LatencyProfile.model_validate_json(profile_json()).save(tmp_path / "p.json")
    maps = ConfigMaps()
    found = await ProfileResolver(maps, ProfileStore(tmp_path)).resolve(spec(), "serving")  # type: ignore[arg-type]
    assert found is not None and maps.reads == 0


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "is not a latency profile"),
    ('{"gpu": "A100-80GB"}', "model: Field required"),
    (profile_json(gpu="H100-80GB"), "measured on 'H100-80GB', but the cluster's GPU type is 'A100-80GB'"),
    (profile_json(model="llama-3-8b"), "shape differs from the spec's model"),
    (profile_json(samples=2), "need at least 3 samples"),  # the planner cannot fit it
])
def test_unusable_profiles_say_why(text, message):
    with pytest.raises(InvalidProfileError, match=message) as info:
        validate_profile(text, spec(profile=REF), ConfigMapKeyRef(name="opt13b-a100"))
    assert "spec.profile.configMapRef: opt13b-a100[profile.json]" in str(info.value)
    assert info.value.reason == "InvalidProfile"


def test_the_profile_content_is_in_the_planning_key():
    s = spec(profile=REF)
    ref = ConfigMapKeyRef(name="opt13b-a100")
    a = validate_profile(profile_json(), s, ref)
    same = validate_profile(profile_json(), s, ref)
    slower = validate_profile(profile_json(slope=2e-4), s, ref)
    assert PlanningService.key(s, a) == PlanningService.key(s, same)
    assert PlanningService.key(s, a) != PlanningService.key(s, slower)
    assert PlanningService.key(s, a) != PlanningService.key(s, None)

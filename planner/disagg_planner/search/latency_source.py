"""Which latency model a search uses: the runtime's measured profile when there is one, else the roofline."""

from __future__ import annotations

from ..api.profile import LatencyProfile
from ..api.spec import DisaggServingSpec
from ..errors import PlannerError
from ..latency import LatencyModel, ProfileError


def latency_model(spec: DisaggServingSpec, profile: LatencyProfile | None) -> LatencyModel:
    """The profile's fitted model when given (it must be of the spec's model), else the analytic roofline."""
    gpu, intra = spec.cluster.gpu_spec, spec.cluster.intra_node_gb_per_s
    if profile is None:
        return LatencyModel.analytic(spec.model.spec, gpu, intra)
    if profile.model.model_dump(exclude={"name"}) != spec.model.spec.model_dump(exclude={"name"}):
        raise PlannerError(
            f"the latency profile is of {profile.model.name}, whose shape differs from the spec's model "
            f"{spec.model.spec.name}; profile the spec's model or drop --profile"
        )
    try:
        return LatencyModel.from_profile(profile, gpu, intra)
    except ProfileError as exc:
        raise PlannerError(f"latency profile unusable: {exc}") from None

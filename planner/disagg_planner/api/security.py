"""Who may reach a deployment: user API keys at the router, the internal token, network policies."""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel

_DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class SecretKeyRef(ApiModel):
    """One key of a Secret in the DisaggServing's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=_DNS_NAME, description="Secret name.")
    key: str = Field(default="keys", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key under the Secret's data: the API keys, one a line (# for comments).")


class RouterSpec(ApiModel):
    """The router's client-facing settings."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Clients must send one of these keys (Authorization: Bearer, or x-api-key); the file is "
                    "re-read when the Secret changes, so keys are issued and revoked without a restart. "
                    "Unset: the router takes requests without a key.",
    )
    metrics_require_key: bool = Field(default=False, description="/metrics needs an API key too.")


class InternalTokenSpec(ApiModel):
    """The token the router, workers and KV links of this deployment share (a Secret the operator owns)."""

    rotation: int = Field(
        default=0, ge=0, le=1 << 31,
        description="Change it to issue a new token: the pods roll onto it, the previous token stays "
                    "accepted until the next rotation (rotate twice to revoke a leaked one).",
    )


class PeerSelector(ApiModel):
    """Pods, by namespace labels and pod labels, allowed to reach a port."""

    namespace_selector: dict[str, str] = Field(
        default_factory=dict, description="matchLabels of the peers' namespaces ({}: every namespace).")
    pod_selector: dict[str, str] = Field(
        default_factory=dict, description="matchLabels of the peer pods ({}: every pod of those namespaces).")


def _prometheus() -> PeerSelector:
    # The namespace label every cluster sets since 1.21, and the label of the common Prometheus charts.
    return PeerSelector(namespace_selector={"kubernetes.io/metadata.name": "monitoring"},
                        pod_selector={"app.kubernetes.io/name": "prometheus"})


class NetworkPolicySpec(ApiModel):
    """NetworkPolicies the operator renders: only the router reaches the workers, only decode pods the
    prefill KV ports, Prometheus the metrics ports, anyone the router's port; all other ingress denied."""

    enabled: bool = Field(default=True, description="false for clusters without a network policy engine.")
    prometheus: PeerSelector = Field(
        default_factory=_prometheus,
        description="Who scrapes the runtime pods' /metrics (default: app.kubernetes.io/name=prometheus pods "
                    "of the monitoring namespace).")
    clients: PeerSelector | None = Field(
        default=None, description="Who may reach the router; unset: anyone (it checks API keys itself).")

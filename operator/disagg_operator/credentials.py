"""Secrets in the runtime pods: the internal token in every pod, the users' API keys in the router's.

Both are Secret volumes, not environment variables: kubelet refreshes a mounted Secret in place (the
runtime re-reads the files, security/secret_file.py), and a volume's content appears in no pod spec,
`kubectl describe` or process listing. The token's version (a digest, not the token) is a pod-template
annotation, so a rotation rolls the pods; a change of API keys does not (they are re-read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disagg_planner.api import RouterSpec

# Beside the ConfigMap's /etc/disagg, not inside it: a mount point inside a read-only volume cannot be made.
SECRETS_DIR = "/var/run/secrets/disagg"
TOKEN_VOLUME, TOKEN_KEY = "internal-token", "tokens"
KEYS_VOLUME, KEYS_FILE = "api-keys", "keys"
TOKEN_VERSION_ANNOTATION = "disagg.io/internal-token-version"


@dataclass(frozen=True)
class TokenRef:
    """The operator-owned Secret with this deployment's internal token, and the token's version."""

    secret_name: str
    version: str
    rotation: int = 0

    @property
    def revision(self) -> str:
        """What names the worker workloads: the rotation, known before the token is (a paused spec's
        preview names the children it will create); "" until the first rotation."""
        return f"token-{self.rotation}" if self.rotation else ""

    @property
    def key(self) -> str:
        """`Kind/name`, as listed in the status."""
        return f"Secret/{self.secret_name}"


def _mount(pod_spec: dict[str, Any], volume: dict[str, Any], path: str, flag: str, file: str) -> None:
    pod_spec.setdefault("volumes", []).append(volume)
    for container in pod_spec["containers"]:
        container.setdefault("volumeMounts", []).append({"name": volume["name"], "mountPath": path, "readOnly": True})
        container["args"] += [flag, f"{path}/{file}"]


def add_internal_token(pod_spec: dict[str, Any], template_meta: dict[str, Any] | None, token: TokenRef) -> None:
    """Every container gets `--internal-token-file`; `template_meta`, if given, the token's version."""
    volume = {"name": TOKEN_VOLUME,
              "secret": {"secretName": token.secret_name, "defaultMode": 0o440,
                         "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]}}
    _mount(pod_spec, volume, f"{SECRETS_DIR}/{TOKEN_VOLUME}", "--internal-token-file", TOKEN_KEY)
    if template_meta is not None:
        template_meta.setdefault("annotations", {})[TOKEN_VERSION_ANNOTATION] = token.version


def add_api_keys(pod_spec: dict[str, Any], router: RouterSpec) -> None:
    """The router container gets `--api-key-file` (and `--metrics-require-key`) when the spec names keys."""
    ref = router.api_key_secret_ref
    if ref is None:
        return
    volume = {"name": KEYS_VOLUME,
              "secret": {"secretName": ref.name, "defaultMode": 0o440, "items": [{"key": ref.key, "path": KEYS_FILE}]}}
    _mount(pod_spec, volume, f"{SECRETS_DIR}/{KEYS_VOLUME}", "--api-key-file", KEYS_FILE)
    if router.metrics_require_key:
        for container in pod_spec["containers"]:
            container["args"].append("--metrics-require-key")

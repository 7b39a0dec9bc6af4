"""Kubernetes Pod Security Standards, "baseline" and "restricted" profiles, as checks on a pod spec.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the policy table of
each profile; restricted includes baseline). `violations(pod_spec, metadata)` returns one line per
broken rule, [] for a pod the restricted profile admits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
_VOLUME_META = {"name"}


def _containers(pod: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(field) or []:
            yield f"{field}[{c.get('name')}]", c


def _baseline(pod: Mapping[str, Any], meta: Mapping[str, Any]) -> Iterator[str]:
    pod_sc = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            yield f"{host} must be unset or false"
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        yield "pod windowsOptions.hostProcess must be unset or false"
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume.get('name')} is a hostPath"
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"sysctl {sysctl.get('name')} is not in the safe set"
    yield from _selinux("pod", pod_sc)
    yield from _seccomp_not_unconfined("pod", pod_sc)
    yield from _apparmor("pod", pod_sc)
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            yield f"annotation {key}={value}: AppArmor must be runtime/default or localhost/*"
    for where, c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            yield f"{where}: privileged"
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            yield f"{where}: windowsOptions.hostProcess"
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            yield f"{where}: adds capabilities {sorted(added - BASELINE_CAPABILITIES)} beyond the baseline set"
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                yield f"{where}: hostPort {port['hostPort']}"
        if sc.get("procMount", "Default") != "Default":
            yield f"{where}: procMount {sc['procMount']}"
        yield from _selinux(where, sc)
        yield from _seccomp_not_unconfined(where, sc)
        yield from _apparmor(where, sc)


def _selinux(where: str, sc: Mapping[str, Any]) -> Iterator[str]:
    opts = sc.get("seLinuxOptions") or {}
    if opts.get("type", "") not in SELINUX_TYPES:
        yield f"{where}: seLinuxOptions.type {opts['type']}"
    for field in ("user", "role"):
        if opts.get(field):
            yield f"{where}: seLinuxOptions.{field} must be unset"


def _seccomp_not_unconfined(where: str, sc: Mapping[str, Any]) -> Iterator[str]:
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield f"{where}: seccompProfile Unconfined"


def _apparmor(where: str, sc: Mapping[str, Any]) -> Iterator[str]:
    kind = (sc.get("appArmorProfile") or {}).get("type")
    if kind not in (None, "RuntimeDefault", "Localhost"):
        yield f"{where}: appArmorProfile {kind}"


def _restricted(pod: Mapping[str, Any]) -> Iterator[str]:
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - _VOLUME_META
        if not kinds <= RESTRICTED_VOLUMES:
            yield f"volume {volume.get('name')} of type {sorted(kinds - RESTRICTED_VOLUMES)} is not allowed"
    if pod_sc.get("runAsUser") == 0:
        yield "pod runAsUser 0"
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{where}: allowPrivilegeEscalation must be false"
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            yield f"{where}: runAsNonRoot must be true (pod or container)"
        if sc.get("runAsUser") == 0:
            yield f"{where}: runAsUser 0"
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"{where}: seccompProfile must be RuntimeDefault or Localhost (pod or container)"
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield f"{where}: capabilities must drop ALL"
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"{where}: may add only NET_BIND_SERVICE"


def violations(pod_spec: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> list[str]:
    """Every baseline and restricted rule `pod_spec` breaks (`metadata`: the pod's, for AppArmor annotations)."""
    return [*_baseline(pod_spec, metadata or {}), *_restricted(pod_spec)]

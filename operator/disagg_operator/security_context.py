"""Runtime pods that meet Kubernetes' "restricted" Pod Security Standard.

Every container runs as a fixed non-root user with a read-only root filesystem, no capabilities, no
privilege escalation and the runtime's default seccomp profile. What the runtime writes goes to
emptyDirs: /tmp, and one cache directory that HOME and the Hugging Face, Triton and torch caches point
into (Triton compiles kernels at first use). Shared memory for NCCL and CUDA IPC is an in-memory
emptyDir at /dev/shm, sized from the pod's GPUs; the pods never use hostIPC (the containers of a paired
pod share the pod's own IPC namespace). docs/security.md lists what this rules out and why nothing
needs an exception.
"""

from __future__ import annotations

from typing import Any

RUNTIME_USER = 65532  # the conventional "nonroot" uid of distroless images; any non-zero uid works
CACHE_DIR = "/var/cache/disagg"
TMP_DIR = "/tmp"
SHM_VOLUME = "dshm"

_CACHE_ENV = {
    "HOME": CACHE_DIR,
    "XDG_CACHE_HOME": CACHE_DIR,
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torchinductor",
    "DISAGG_CACHE": f"{CACHE_DIR}/disagg",
    "TMPDIR": TMP_DIR,
    "PYTHONDONTWRITEBYTECODE": "1",  # the image's site-packages are read-only
}


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_USER, "runAsGroup": RUNTIME_USER, "fsGroup": RUNTIME_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_USER, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "privileged": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def shm_size(gpus: int) -> str:
    """/dev/shm for a pod with `gpus` GPUs: 1 GiB, plus 1 GiB a GPU for NCCL's shared-memory transport
    between the ranks (and the pod's other container) and pinned staging buffers."""
    return f"{1 + max(0, gpus)}Gi"


def restrict(pod_spec: dict[str, Any], *, gpus: int) -> None:
    """Make `pod_spec` (as render.py built it) pass the restricted standard; `gpus` sizes /dev/shm."""
    pod_spec["securityContext"] = pod_security_context()
    pod_spec["hostIPC"] = False
    volumes = pod_spec.setdefault("volumes", [])
    for volume in volumes:
        if volume["name"] == SHM_VOLUME:
            volume["emptyDir"] = {"medium": "Memory", "sizeLimit": shm_size(gpus)}
    volumes += [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    for container in pod_spec["containers"]:
        container["securityContext"] = container_security_context()
        # /tmp last: a node that binds volumes in this order from directories under its own /tmp (the e2e
        # node agent) would otherwise hide the later ones' sources.
        container.setdefault("volumeMounts", []).extend(
            [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": TMP_DIR}])
        env = container.setdefault("env", [])
        env.extend({"name": k, "value": v} for k, v in _CACHE_ENV.items())

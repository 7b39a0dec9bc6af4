"""What a user does with kubectl, through the official client: apply/patch/delete DisaggServings and
read their children and status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kubernetes
from disagg_operator import labels as lb
from disagg_operator.crd import GROUP, PLURAL, VERSION
from disagg_operator.kube import CHILD_KINDS


@dataclass
class Kubectl:
    api: kubernetes.client.ApiClient
    namespace: str

    @property
    def _crs(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DisaggServing",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}
        return self._crs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self._crs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_spec(self, name: str, spec_patch: dict[str, Any]) -> dict[str, Any]:
        return self._crs.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                        {"spec": spec_patch})

    def delete(self, name: str) -> None:
        self._crs.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def children(self, instance: str | None = None) -> dict[str, dict[str, Any]]:
        """`Kind/name` -> object for every operator-managed object in the namespace (of one instance)."""
        wanted = {lb.NAME: lb.APP_NAME, lb.MANAGED: lb.MANAGED_BY}
        if instance:
            wanted[lb.INSTANCE] = instance
        out: dict[str, dict[str, Any]] = {}
        for kind in CHILD_KINDS:
            data = self.api.call_api(*self.api.param_serialize(
                "GET", kind.path(self.namespace), query_params=[("labelSelector", lb.selector_string(wanted))],
                header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]))
            data.read()
            items = self.api.deserialize(data.data.decode(), "object", "application/json").get("items") or []
            for item in items:
                # Re-filter: an emulator may ignore label selectors.
                if lb.matches(item["metadata"].get("labels"), wanted):
                    out[f"{kind.kind}/{item['metadata']['name']}"] = item
        return out

    def put_config_map(self, name: str, data: dict[str, str]) -> None:
        """Create the ConfigMap, or replace its data."""
        core = kubernetes.client.CoreV1Api(self.api)
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": self.namespace},
                "data": data}
        try:
            core.create_namespaced_config_map(self.namespace, body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            core.patch_namespaced_config_map(name, self.namespace, {"data": data})

    def config_map(self, name: str) -> dict[str, str]:
        return kubernetes.client.CoreV1Api(self.api).read_namespaced_config_map(name, self.namespace).data or {}

    def report_ready(self, key: str) -> None:
        """Emulator bookkeeping for a workload: what its controller writes once every pod passes its
        readiness probe (a real cluster's StatefulSet/Deployment controller and kubelet do this)."""
        obj = self.children()[key]
        replicas = obj["spec"]["replicas"]
        self.patch_workload_status(key, {"observedGeneration": obj["metadata"]["generation"], "replicas": replicas,
                                         "readyReplicas": replicas})

    def patch_workload_status(self, key: str, status: dict[str, Any]) -> None:
        """Play the part of the workload controllers (which the emulator does not run)."""
        kind, name = key.split("/", 1)
        apps = kubernetes.client.AppsV1Api(self.api)
        if kind == "StatefulSet":
            apps.patch_namespaced_stateful_set_status(name, self.namespace, {"status": status})
        else:
            apps.patch_namespaced_deployment_status(name, self.namespace, {"status": status})

    def events(self, involved: str) -> list[dict[str, Any]]:
        core = kubernetes.client.CoreV1Api(self.api)
        items = core.list_namespaced_event(self.namespace).items
        return [e.to_dict() for e in items if e.involved_object and e.involved_object.name == involved]

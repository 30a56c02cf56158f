"""The operator's only conversation with the API server.

Plain REST through the Kubernetes client's ApiClient, so every call states its verb, path
and content type: server-side apply for the run's infrastructure (idempotent create-or-
update), create-or-AlreadyExists for pods (fixed names make a retried create harmless),
deletes with a UID precondition (never the replacement of the pod we meant), and a JSON
merge-patch of the status carrying `metadata.resourceVersion`, which makes it conditional:
a stale read ends in 409 Conflict instead of a lost restart count.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any, Callable

from bloomrun.operator.desired import CHILD_KINDS
from bloomrun.operator.evaluation import JOB_KIND
from bloomrun.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

FIELD_MANAGER = "bloomrun-operator"
REQUEST_TIMEOUT_S = 15


def api_prefix(api_version: str) -> str:
    """`/api/v1` for the core group, `/apis/<group>/<version>` for the others."""
    return f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"


# kind -> (API prefix, plural): the run's children (desired.CHILD_KINDS), its Events and itself.
PATHS = {child.kind: (api_prefix(child.api_version), child.plural) for child in (*CHILD_KINDS, JOB_KIND)} | {
    "Event": (api_prefix("v1"), "events"),
    "BloomRun": (api_prefix(f"{GROUP}/{VERSION}"), PLURAL),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Conflict(ApiError):
    """The object changed since it was read; plan again from a fresh read."""


class NamespaceTerminating(ApiError):
    """403 from the NamespaceLifecycle admission: the namespace is being deleted, and the run
    with it. Not a refusal of our RBAC and nothing to retry: the garbage collector wins."""

    @staticmethod
    def matches(status: int, message: str) -> bool:
        return status == 403 and "because it is being terminated" in message


class ForeignObject(Exception):
    """A child's name is taken by an object this run does not control. Never adopted: the
    force of server-side apply and our owner reference would let a run take over (or get
    garbage-collected with it) a ServiceAccount, Role or ConfigMap of someone else's."""

    def __init__(self, kind: str, namespace: str, name: str):
        super().__init__(f"{kind} {namespace}/{name} exists and is not this run's; delete or rename it, "
                         "or rename the run")
        self.kind, self.name = kind, name


class LeftoverChild(ForeignObject):
    """A child's name is taken by the child of a deleted run of the same name that the
    garbage collector has not removed yet (`kubectl delete` then `apply` at once): not
    foreign for long, so the run waits for it instead of failing."""

    def __init__(self, kind: str, namespace: str, name: str):
        Exception.__init__(self, f"{kind} {namespace}/{name} still belongs to a deleted run of this name; "
                                 "waiting for the garbage collector to remove it")
        self.kind, self.name = kind, name


def object_path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = PATHS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def load_api_client():
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32  # one per executor thread and then some
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api_client=None, on_error: Callable[[str], None] | None = None):
        self.api = api_client or load_api_client()
        self.on_error = on_error or (lambda verb: None)
        self.identity = os.environ.get("POD_NAME") or socket.gethostname()

    # ------------------------------------------------------------------ raw requests

    def request(self, verb: str, path: str, body: Any = None, query: dict | None = None,
                content_type: str = "application/json") -> dict | None:
        try:
            method, url, headers, payload, post_params = self.api.param_serialize(
                verb, path, query_params=list((query or {}).items()),
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body, auth_settings=["BearerToken"],
            )
            response = self.api.call_api(method, url, headers, payload, post_params,
                                         _request_timeout=REQUEST_TIMEOUT_S)
            data = response.read()
        except Exception:
            self.on_error(verb.lower())
            raise
        if response.status >= 400:
            message = response.reason or ""
            try:
                message = json.loads(data or b"{}").get("message", message)
            except ValueError:
                pass
            if NamespaceTerminating.matches(response.status, message):
                raise NamespaceTerminating(response.status, message)
            if response.status not in (404, 409):
                self.on_error(verb.lower())
            raise (Conflict if response.status == 409 else ApiError)(response.status, message)
        return json.loads(data) if data else None

    # ---------------------------------------------------------------------- the run

    def get_run(self, namespace: str, name: str) -> dict | None:
        try:
            return self.request("GET", object_path("BloomRun", namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def patch_run_status(self, namespace: str, name: str, resource_version: str, status: dict) -> dict | None:
        """Conditional on `resource_version`: raises Conflict when the run changed meanwhile."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return self.request("PATCH", object_path("BloomRun", namespace, name) + "/status", body,
                            content_type="application/merge-patch+json")

    # ------------------------------------------------------------------------ children

    def apply(self, obj: dict) -> None:
        """Server-side apply: creates the object or brings our fields up to date."""
        meta = obj["metadata"]
        self.request("PATCH", object_path(obj["kind"], meta["namespace"], meta["name"]), obj,
                     query={"fieldManager": FIELD_MANAGER, "force": "true"},
                     content_type="application/apply-patch+yaml")

    def apply_owned(self, obj: dict, owner_uid: str) -> None:
        """Create the child; when its name is taken, apply it only if this run (uid) already
        controls it, else raise ForeignObject and leave the object untouched."""
        if not self.create_owned(obj, owner_uid):
            self.apply(obj)

    def create_owned(self, obj: dict, owner_uid: str) -> bool:
        """Create the child (True); when its name is taken by this run's (uid) own object, leave
        it as it is (False); by anyone else's, raise ForeignObject. For objects that must never
        be changed once made, such as an evaluation Job (its pod template is immutable)."""
        meta = obj["metadata"]
        try:
            self.request("POST", object_path(obj["kind"], meta["namespace"]), obj)
            return True
        except Conflict:  # AlreadyExists
            pass
        existing = self.request("GET", object_path(obj["kind"], meta["namespace"], meta["name"])) or {}
        controller = next((ref for ref in existing.get("metadata", {}).get("ownerReferences") or []
                           if ref.get("controller")), {})
        if controller.get("uid") == owner_uid:
            return False
        ours = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("uid") == owner_uid), None)
        if ours and (controller.get("kind"), controller.get("name")) == (ours["kind"], ours["name"]):
            # Same kind and name, another uid: a predecessor deleted from this namespace
            # (names are unique there, so it no longer exists), whose children GC removes.
            raise LeftoverChild(obj["kind"], meta["namespace"], meta["name"])
        raise ForeignObject(obj["kind"], meta["namespace"], meta["name"])

    def job_termination_message(self, namespace: str, job_uid: str) -> str:
        """The termination message of a finished Job's last pod to end (the evaluation's summary
        or error; the log's tail after a crash); "" when its pods are gone."""
        pods = (self.request("GET", object_path("Pod", namespace),
                             query={"labelSelector": f"batch.kubernetes.io/controller-uid={job_uid}"}) or {})
        ended = []
        for pod in pods.get("items") or []:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated")
                if terminated:
                    ended.append((terminated.get("finishedAt") or "", terminated.get("message") or ""))
        return max(ended)[1] if ended else ""

    def create_pod(self, manifest: dict) -> bool:
        """True if created, False if a pod of that name already exists."""
        try:
            self.request("POST", object_path("Pod", manifest["metadata"]["namespace"]), manifest)
            return True
        except Conflict:
            return False

    def delete_pod(self, namespace: str, name: str, uid: str, force: bool = False) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
        if force:
            body["gracePeriodSeconds"] = 0
        try:
            self.request("DELETE", object_path("Pod", namespace, name), body)
        except ApiError as err:
            if err.status not in (404, 409):  # gone already, or a different pod now
                raise

    def list_node_names(self) -> set[str]:
        """Names only (metadata-only list from the API server's watch cache: cheap at 2,000 nodes)."""
        method, url, headers, payload, post_params = self.api.param_serialize(
            "GET", "/api/v1/nodes", query_params=[("resourceVersion", "0")],
            header_params={"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
                                     "application/json"},
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, headers, payload, post_params,
                                         _request_timeout=REQUEST_TIMEOUT_S)
            data = response.read()
        except Exception:
            self.on_error("list")
            raise
        if response.status >= 400:
            self.on_error("list")
            raise ApiError(response.status, response.reason or "")
        return {n["metadata"]["name"] for n in json.loads(data).get("items", [])}

    def get_node(self, name: str) -> dict | None:
        """The Node object, None when it does not exist."""
        try:
            return self.request("GET", f"/api/v1/nodes/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def node_exists(self, name: str) -> bool:
        try:
            self.request("GET", f"/api/v1/nodes/{name}")
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    def post_event(self, run_body: dict, type_: str, reason: str, message: str) -> None:
        meta = run_body["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": run_body["apiVersion"], "kind": run_body["kind"],
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER, "reportingInstance": self.identity[:128],
        }
        try:
            self.request("POST", object_path("Event", meta["namespace"]), event)
        except NamespaceTerminating:
            pass  # the run goes with its namespace: nobody will read the event
        except ApiError as err:  # an event is a courtesy, never a reason to fail a reconcile
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], err)

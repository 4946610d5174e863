"""AdmissionReviews as the API server sends them, the pods its controllers create, and an HTTPS client for them.

Shared by the admission tests (unit, integration, e2e), so each posts the same documented shapes:

- `controller_pod(workload)`: the Pod a workload's controller would ask the API server to create from its pod
  template, after the API server's own admission plugins and defaulting ran and before the mutating webhooks do
  (they run late): the template's labels and annotations plus the controller's own labels, `generateName` and no
  name (a StatefulSet's pods are the exception: they are named `<set>-<ordinal>`), an owner reference, the
  namespace; the service account the ServiceAccount plugin fills in, with its projected token volume mounted into
  every container; the defaults the API server sets (`dnsPolicy`, `terminationMessagePath`, ...). A bare Pod is
  itself, defaulted the same way.
- `admission_review(pod, ...)`: the `admission.k8s.io/v1` AdmissionReview of that create, every request field the
  Kubernetes API reference lists (uid, kind, resource, requestKind, requestResource, name, namespace, operation,
  userInfo, object, oldObject, dryRun, options).
- `patched(review_answer, pod)`: the answer's base64 JSONPatch applied to the pod with jsonpatch.
- `post(...)`: one HTTPS request with Python's `ssl` and `http.client`, verifying the webhook's certificate and its
  DNS name against the mesh's bundle, as the API server does with the `caBundle`.
- `webhook_process(directory)`: a real `mtlsmesh webhook` on 127.0.0.1, with a CA and a serving SVID made by the
  `mtlsmesh ca` commands deploy/README.md gives, stopped (by its PID) when the block ends.

What it does not: run a webhook in-process (the integration tests do), or know the answer a review should get.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch

from mtlsmesh.lab.pods import log_records

WEBHOOK_DNS = "mtlsmesh-webhook.mtlsmesh-system.svc"  # what the webhook's SVID is issued for, as deploy/ says
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

# Where each kind keeps its pod template, written out here independently of mtlsmesh.inject (the tests' oracle).
TEMPLATE_PATHS = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_CONTROLLERS = {  # the service account each controller runs as in kube-controller-manager
    "ReplicaSet": "replicaset-controller",
    "StatefulSet": "statefulset-controller",
    "DaemonSet": "daemon-set-controller",
    "Job": "job-controller",
    "ReplicationController": "replication-controller",
}


def _hash(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def template_of(workload: dict[str, Any]) -> dict[str, Any]:
    node = workload
    for key in TEMPLATE_PATHS[workload["kind"]]:
        node = node[key]
    return node


def controller_pod(workload: dict[str, Any]) -> dict[str, Any]:
    """The Pod the workload's controller creates (a bare Pod: itself), as a mutating webhook receives it."""
    meta = workload["metadata"]
    namespace = meta.get("namespace", "default")
    if workload["kind"] == "Pod":
        pod = copy.deepcopy(workload)
        pod["metadata"].setdefault("namespace", namespace)
        return _defaulted(pod)
    template = template_of(workload)
    metadata: dict[str, Any] = copy.deepcopy(template.get("metadata") or {})
    labels: dict[str, str] = metadata.setdefault("labels", {})
    name, kind, owner_kind = meta["name"], workload["kind"], workload["kind"]
    owner_api = workload["apiVersion"]
    if kind == "Deployment":
        template_hash = _hash(json.dumps(template, sort_keys=True))
        labels["pod-template-hash"] = template_hash
        owner_kind, owner_api, owner_name = "ReplicaSet", "apps/v1", f"{name}-{template_hash}"
        generate = f"{owner_name}-"
    elif kind in ("CronJob", "Job"):
        job = name if kind == "Job" else f"{name}-{29000000 + int(_hash(name, 4), 16) % 100000}"
        owner_kind, owner_api, owner_name, generate = "Job", "batch/v1", job, f"{job}-"
        controller_uid = str(uuid.uuid5(uuid.NAMESPACE_URL, job))
        labels.update({"batch.kubernetes.io/controller-uid": controller_uid, "batch.kubernetes.io/job-name": job})
        labels.update({"controller-uid": controller_uid, "job-name": job})
    elif kind == "StatefulSet":
        owner_name, generate = name, ""
        labels.update({"apps.kubernetes.io/pod-index": "0", "statefulset.kubernetes.io/pod-name": f"{name}-0"})
        labels["controller-revision-hash"] = f"{name}-{_hash(json.dumps(template, sort_keys=True))}"
    else:  # DaemonSet, ReplicaSet, ReplicationController
        owner_name, generate = name, f"{name}-"
        if kind == "DaemonSet":
            labels["controller-revision-hash"] = _hash(json.dumps(template, sort_keys=True))
    if generate:
        metadata["generateName"] = generate
        metadata.pop("name", None)
    else:
        metadata["name"] = f"{name}-0"
    metadata["namespace"] = namespace
    metadata["ownerReferences"] = [
        {
            "apiVersion": owner_api,
            "kind": owner_kind,
            "name": owner_name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{owner_kind}/{owner_name}")),
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = copy.deepcopy(template["spec"])
    if kind == "StatefulSet":
        spec.setdefault("hostname", f"{name}-0")
        if "serviceName" in workload["spec"]:
            spec.setdefault("subdomain", workload["spec"]["serviceName"])
        # As the StatefulSet controller does: one volume per claim template first, then the template's own.
        claims = [
            {
                "name": claim["metadata"]["name"],
                "persistentVolumeClaim": {"claimName": f"{claim['metadata']['name']}-{name}-0"},
            }
            for claim in workload["spec"].get("volumeClaimTemplates", [])
        ]
        if claims:
            names = {claim["name"] for claim in claims}
            spec["volumes"] = claims + [v for v in spec.get("volumes") or () if v["name"] not in names]
    return _defaulted({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})


def _defaulted(pod: dict[str, Any]) -> dict[str, Any]:
    """What the API server's defaulting and its ServiceAccount admission plugin add before the webhooks run."""
    spec = pod["spec"]
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = account
    token_volume = f"kube-api-access-{_hash(json.dumps(pod, sort_keys=True), 5)}"
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or ():
            container.setdefault("imagePullPolicy", "IfNotPresent")
            container.setdefault("resources", {})
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            mount = {"name": token_volume, "readOnly": True, "mountPath": TOKEN_MOUNT}
            container.setdefault("volumeMounts", []).append(mount)
    spec.setdefault("volumes", []).append(
        {
            "name": token_volume,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                }
                            ]
                        }
                    },
                ],
            },
        }
    )
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    spec.setdefault(
        "tolerations",
        [
            {
                "key": f"node.kubernetes.io/{taint}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for taint in ("not-ready", "unreachable")
        ],
    )
    return pod


def admission_review(
    obj: dict[str, Any] | None,
    *,
    namespace: str = "default",
    operation: str = "CREATE",
    uid: str | None = None,
    resource: tuple[str, str, str] = ("", "v1", "pods"),
    kind: tuple[str, str, str] = ("", "v1", "Pod"),
    sub_resource: str = "",
    username: str | None = None,
) -> dict[str, Any]:
    """The AdmissionReview the API server posts for `operation` on `obj`."""
    owner = (obj or {}).get("metadata", {}).get("ownerReferences", [{}])[0].get("kind")
    controller = _CONTROLLERS.get(owner or "")
    user = username or (f"system:serviceaccount:kube-system:{controller}" if controller else "kubernetes-admin")
    group, version, name = kind
    resource_ref = {"group": resource[0], "version": resource[1], "resource": resource[2]}
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": group, "version": version, "kind": name},
        "resource": resource_ref,
        "requestKind": {"group": group, "version": version, "kind": name},
        "requestResource": resource_ref,
        "name": (obj or {}).get("metadata", {}).get("name", ""),
        "namespace": namespace,
        "operation": operation,
        "userInfo": {
            "username": user,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            if controller
            else ["kubeadm:cluster-admins", "system:authenticated"],
        },
        "object": obj if operation != "DELETE" else None,
        "oldObject": obj if operation in ("UPDATE", "DELETE") else None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": f"{operation.capitalize()}Options"},
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def patched(answer: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """The pod after the answer's JSONPatch (the pod itself when there is none)."""
    response = answer["response"]
    if "patch" not in response:
        return copy.deepcopy(pod)
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"], validate=True))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, operations)
    return result


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def client_context(bundle: Path) -> ssl.SSLContext:
    """A TLS client that trusts the mesh's roots only and checks the webhook's DNS name, as the API server does."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.set_alpn_protocols(["h2", "http/1.1"])  # what a Go client offers; the webhook picks http/1.1
    return context


def post(
    address: tuple[str, int],
    bundle: Path,
    body: bytes | dict[str, Any],
    *,
    path: str = "/inject?timeout=10s",
    method: str = "POST",
    content_type: str | None = "application/json",
    timeout: float = 10.0,
) -> Reply:
    """One request to the webhook at `address`, over HTTPS to `WEBHOOK_DNS` (resolved to `address`)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection = WebhookConnection(address, context=client_context(bundle), timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request(method, path, body=data if method != "GET" else None, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, response.getheader("content-type", ""), response.read())
    finally:
        connection.close()


class WebhookConnection(http.client.HTTPSConnection):
    """HTTPS to the webhook's Service name without DNS: connect to `address`, verify the name `WEBHOOK_DNS`."""

    def __init__(self, address: tuple[str, int], *, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(WEBHOOK_DNS, address[1], timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=WEBHOOK_DNS)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# A real `mtlsmesh webhook` process

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


@dataclass
class WebhookProcess:
    process: subprocess.Popen[str]
    address: tuple[str, int]
    bundle: Path  # the mesh CA's bundle.pem: what a deployment puts in the caBundle
    ca_dir: Path

    def stop(self) -> list[dict[str, str]]:
        """SIGTERM, wait for a clean exit, and return everything it logged, parsed."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=10) == 0
        assert self.process.stderr is not None
        return log_records(self.process.stderr.read())


def mtlsmesh(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert done.returncode == 0, f"mtlsmesh {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


@contextlib.contextmanager
def webhook_process(directory: Path, *extra: str) -> Iterator[WebhookProcess]:
    """`mtlsmesh webhook` with a fresh CA (`directory/ca`) and its serving SVID (`directory/svid`), issued as
    deploy/README.md says; killed by PID when the block ends, however it ends."""
    ca_dir, svid = directory / "ca", directory / "svid"
    mtlsmesh("ca", "init", "--dir", str(ca_dir), cwd=directory)
    mtlsmesh("ca", "issue", "--ca-dir", str(ca_dir), "--namespace", "mtlsmesh-system", "--service-account",
             "mtlsmesh-webhook", "--dns", WEBHOOK_DNS, "--out", str(svid), cwd=directory)  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mtlsmesh", "webhook", "--listen", "127.0.0.1:0", "--cert", str(svid / "cert.pem"),
         "--key", str(svid / "key.pem"), *extra],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT
        address: tuple[str, int] | None = None
        while address is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if "event=listening" in line:
                host, _, port = log_records(line)[0]["address"].rpartition(":")
                address = (host, int(port))
            elif not line and process.poll() is not None:
                break
        if address is None:
            raise AssertionError(f"mtlsmesh webhook did not start (exit status {process.poll()})")
        yield WebhookProcess(process, address, svid / "bundle.pem", ca_dir)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()

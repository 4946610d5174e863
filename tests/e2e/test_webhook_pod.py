"""End-to-end: pods the admission webhook injected run in the lab as a cluster would run them, and are meshed.

A real `mtlsmesh webhook` process (on loopback, serving an SVID issued for its Service's DNS name, as
deploy/README.md says) is sent the AdmissionReviews of the pods that the productpage-v1 and details-v1 Deployments
of deploy/examples/bookinfo.yaml (not injected) make their ReplicaSets create: `generateName`, owner references
and the API server's defaults, the service-account token volume included. The patches it answers with, applied
with jsonpatch, are the pods the lab then runs exactly as tests/e2e/test_injected_pod.py runs the CLI's
(`podspecs.mesh_pod`): their own `mtlsmesh iptables` as root and `mtlsmesh sidecar` as the proxy's uid, from the
volumes a kubelet would mount, the projected token minted by the lab's API server into the proxy's mount only; each
sidecar enrols with the lab's CA service. productpage's app calls the details Service in plaintext and the wire
carries only TLS records, each side authenticated as its pod's service account.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mtlsmesh import inject
from mtlsmesh.lab.pods import Lab, log_records
from mtlsmesh.lab.topology import IdentitySpec, PodSpec, ServiceSpec, Topology
from mtlsmesh.manifest import parse_manifests
from tests import kubelet
from tests.admission_reviews import admission_review, controller_pod, patched, post, webhook_process
from tests.e2e import harness, podspecs
from tests.e2e.podspecs import APP_PORT, base_config_map, mesh_pod, workload

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "deploy" / "examples" / "bookinfo.yaml"
WORKLOADS = {"productpage": "productpage-v1", "details": "details-v1"}  # lab pod -> Deployment

TOPOLOGY = Topology(
    pods=(PodSpec("productpage", mesh=False), PodSpec("details", mesh=False), PodSpec("outside", mesh=False)),
    services=(ServiceSpec("details", APP_PORT, "details", APP_PORT),),
    identity=IdentitySpec(ttl="1h"),
)


@dataclass(frozen=True, slots=True)
class Meshed:
    lab: Lab
    pods: dict[str, dict[str, Any]]  # lab pod -> the Pod as the webhook's patch made it
    sent: dict[str, dict[str, Any]]  # lab pod -> the Pod as the API server sent it
    webhook_log: list[dict[str, str]]


@pytest.fixture(scope="module", name="meshed")
def meshed_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshed]:
    documents = parse_manifests(BOOKINFO.read_text(), BOOKINFO.name)
    sent = {pod: controller_pod(workload(documents, name)) for pod, name in WORKLOADS.items()}
    pods: dict[str, dict[str, Any]] = {}
    with webhook_process(tmp_path_factory.mktemp("webhook")) as webhook:
        for pod, obj in sent.items():
            reply = post(webhook.address, webhook.bundle, admission_review(obj, namespace="default", uid=f"uid-{pod}"))
            assert reply.status == 200, reply.body
            response = reply.json()["response"]
            assert (response["uid"], response["allowed"], response["patchType"]) == (f"uid-{pod}", True, "JSONPatch")
            pods[pod] = patched(reply.json(), obj)
        webhook_log = webhook.stop()
    config_map = base_config_map()
    lab = Lab(TOPOLOGY, tag="mmw")
    projector = kubelet.TokenProjector()
    try:
        lab.start()
        for pod, obj in pods.items():
            mesh_pod(lab, pod, obj, lab.ca_dir, config_map, projector)
        podspecs.start_bookinfo_apps(lab)
        yield Meshed(lab, pods, sent, webhook_log)
    finally:
        projector.close()
        # Also when meshing a pod fails part-way: stop what was started, then prove nothing is left.
        pids = lab.processes()
        lab.close()
        harness.assert_nothing_left(lab, pids)


@pytest.mark.root
def test_the_webhook_injected_pods_talk_mtls(meshed: Meshed) -> None:
    productpage, details = (podspecs.spiffe_id(meshed.pods[p]) for p in ("productpage", "details"))
    assert (productpage, details) == (
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "spiffe://cluster.local/ns/default/sa/bookinfo-details",
    )
    podspecs.assert_productpage_reaches_details_over_mtls(meshed.lab, productpage, details, "webhook")


@pytest.mark.root
def test_plaintext_from_outside_the_mesh_is_refused(meshed: Meshed) -> None:
    lab = meshed.lab
    harness.refused(lambda: harness.get(lab, "outside", lab.ip("details"), APP_PORT, "/from-outside"))
    assert "/from-outside" not in lab.app_log("details", "http")


@pytest.mark.root
def test_each_proxy_serves_the_svid_its_pod_spec_names(meshed: Meshed) -> None:
    for pod, obj in meshed.pods.items():
        ready = [r for r in log_records(meshed.lab.sidecar_log(pod)) if r.get("event") == "ready"]
        assert [r.get("spiffe_id") for r in ready] == [podspecs.spiffe_id(obj)]


@pytest.mark.root
def test_the_patched_pods_are_the_cli_pods_with_the_apps_untouched(meshed: Meshed) -> None:
    for pod, obj in meshed.pods.items():
        sent = meshed.sent[pod]
        (cli,) = inject.inject_documents([sent]).documents
        assert obj == cli
        assert obj["spec"]["containers"] == sent["spec"]["containers"]  # the app and its token mount as they were
        assert [c["name"] for c in obj["spec"]["initContainers"]] == [inject.INIT_CONTAINER, inject.PROXY_CONTAINER]


@pytest.mark.root
def test_the_webhook_logged_one_line_per_review(meshed: Meshed) -> None:
    reviews = [r for r in meshed.webhook_log if "decision" in r]
    assert [(r["uid"], r["decision"], r["reason"]) for r in reviews] == [
        (f"uid-{pod}", "inject", "injected") for pod in WORKLOADS
    ]
    for record, pod in zip(reviews, WORKLOADS, strict=True):
        assert record["pod"] == f"default/{meshed.sent[pod]['metadata']['generateName']}*"

"""The CA service's manifests (deploy/ca), checked offline like the rest of deploy/: every object validates
against the pinned Kubernetes schemas and the pod rules the schemas miss, the flags are the ones `mtlsmesh ca
serve` parses, the CA's key Secret is mounted by the CA alone, and the CA gets no Kubernetes API access at all.
"""

from __future__ import annotations

from typing import Any

import yaml

from mtlsmesh import caproto
from mtlsmesh.cli import build_parser
from mtlsmesh.cli.ca import parse_ttl
from tests.unit.test_manifests import DEPLOY, check_pod_spec, load_documents, validate

CA = DEPLOY / "ca"
RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def ca_docs() -> list[dict[str, Any]]:
    return load_documents(CA / "ca.yaml")


def deployment() -> dict[str, Any]:
    (doc,) = [d for d in ca_docs() if d["kind"] == "Deployment"]
    return doc


def test_every_object_validates() -> None:
    docs = ca_docs()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    for doc in docs:
        validate(doc, "deploy/ca/ca.yaml")
    check_pod_spec(deployment()["spec"]["template"]["spec"], "deploy/ca/ca.yaml: Deployment mtlsmesh-ca")


def test_kustomization_names_existing_files() -> None:
    data = yaml.safe_load((CA / "kustomization.yaml").read_text())
    assert data["kind"] == "Kustomization"
    for name in data["resources"]:
        assert (CA / name).exists(), f"deploy/ca/kustomization.yaml names {name}, which does not exist"


def test_the_container_args_are_what_ca_serve_parses() -> None:
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    args = build_parser(container["args"]).parse_args(container["args"])
    assert (args.command, args.ca_command) == ("ca", "serve")
    assert args.token_audience == "mtlsmesh-ca"
    assert args.listen == [f"0.0.0.0:{caproto.CA_PORT}"]
    assert parse_ttl(args.ttl).total_seconds() == 86400
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args.dir == mounts["ca"]
    assert args.token_jwks.startswith(mounts["jwks"] + "/")
    assert all(m.get("readOnly") for m in container["volumeMounts"])


def test_the_service_exposes_the_ca_port() -> None:
    (service,) = [d for d in ca_docs() if d["kind"] == "Service"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(caproto.CA_PORT, "https-ca")]
    assert service["spec"]["selector"] == deployment()["spec"]["selector"]["matchLabels"]


def test_the_ca_key_secret_is_mounted_by_the_ca_alone_and_owner_only() -> None:
    mounting: list[str] = []
    for path in DEPLOY.rglob("*.yaml"):
        for doc in load_documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for volume in pod.get("volumes", []):
                if volume.get("secret", {}).get("secretName") == "mtlsmesh-ca":
                    mounting.append(f"{path.name}:{doc['metadata']['name']}")
                    assert volume["secret"]["defaultMode"] == 0o400  # the CA refuses a key others can read
    assert mounting == ["ca.yaml:mtlsmesh-ca"]


def test_the_ca_gets_no_kubernetes_api_access() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mtlsmesh-ca"
    assert pod["automountServiceAccountToken"] is False
    assert not [d for d in ca_docs() if d["kind"] in RBAC_KINDS]
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True

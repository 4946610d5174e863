"""The CA service's manifests (deploy/ca), checked offline like the rest of deploy/: every object validates
against the pinned Kubernetes schemas and the pod rules the schemas miss, the flags are the ones `mtlsmesh ca
serve` parses, the CA's key Secret is mounted by the CA alone, the CA runs as non-root with its key in its own group,
and its Kubernetes API access is exactly the two things it does: read the token issuer's keys, and get and patch
the trust bundle ConfigMap of each namespace it publishes to (mtlsmesh-system and default), each of which deploy/base
creates.
"""

from __future__ import annotations

from typing import Any

import yaml

from mtlsmesh import bundlepublish, caproto, caserver, kubeapi
from mtlsmesh.cli import build_parser
from mtlsmesh.cli.ca import parse_ttl
from tests.unit.test_manifests import DEPLOY, check_pod_spec, load_documents, validate

CA = DEPLOY / "ca"
TRUST_BUNDLE = "mtlsmesh-trust-bundle"
RBAC_GROUP = "rbac.authorization.k8s.io"
APP_NAMESPACE = "default"  # where the meshed pods run, and a copy of the trust bundle ConfigMap
CA_SUBJECT = {"kind": "ServiceAccount", "name": "mtlsmesh-ca", "namespace": caproto.CA_NAMESPACE}


def ca_docs() -> list[dict[str, Any]]:
    return load_documents(CA / "ca.yaml")


def deployment() -> dict[str, Any]:
    (doc,) = [d for d in ca_docs() if d["kind"] == "Deployment"]
    return doc


def test_every_object_validates() -> None:
    docs = ca_docs()
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRoleBinding", "Deployment", "Role", "Role", "RoleBinding", "RoleBinding", "Service",
    ]  # fmt: skip
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
    assert args.token_jwks == "https://kubernetes.default.svc/openid/v1/jwks"
    # The defaults the CA falls back to (the service account's ca.crt, token) are where the volume puts them.
    assert mounts["kube-api-access"] == kubeapi.SERVICE_ACCOUNT_DIR
    assert args.token_jwks_bearer == kubeapi.SA_TOKEN_FILE
    assert args.token_jwks_ca is None and args.kube_ca is None and args.kube_token is None and args.kube_api is None
    assert args.publish_bundle == [f"{caproto.CA_NAMESPACE}/{TRUST_BUNDLE}", f"{APP_NAMESPACE}/{TRUST_BUNDLE}"]
    bundlepublish.parse_targets(args.publish_bundle, "--publish-bundle")  # what `ca serve` accepts: each once
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


def published() -> list[bundlepublish.Target]:
    (container,) = deployment()["spec"]["template"]["spec"]["containers"]
    args = build_parser(container["args"]).parse_args(container["args"])
    return list(bundlepublish.parse_targets(args.publish_bundle, "--publish-bundle"))


def test_each_trust_bundle_configmap_published_is_one_deploy_base_makes() -> None:
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    made = [(g["namespace"], g["name"], g["files"]) for g in base["configMapGenerator"]]
    assert [(t.namespace, t.name) for t in published()] == [
        (caproto.CA_NAMESPACE, TRUST_BUNDLE),
        (APP_NAMESPACE, TRUST_BUNDLE),
    ]
    for target in published():  # the CA never creates one: a target deploy/base does not make would fail forever
        assert (target.namespace, target.name, ["bundle.pem=trust-bundle.pem"]) in made
    assert bundlepublish.DEFAULT_KEY == "bundle.pem"


def rbac(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in ca_docs() if d["kind"] == kind]
    return doc


def test_the_ca_may_get_and_patch_each_trust_bundle_configmap_and_nothing_else() -> None:
    roles = {d["metadata"]["namespace"]: d for d in ca_docs() if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in ca_docs() if d["kind"] == "RoleBinding"}
    # One Role and one RoleBinding per namespace published to, none elsewhere.
    assert sorted(roles) == sorted(bindings) == sorted(t.namespace for t in published())
    for target in published():
        role, binding = roles[target.namespace], bindings[target.namespace]
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [target.name], "verbs": ["get", "patch"]}
        ]
        assert binding["roleRef"] == {"apiGroup": RBAC_GROUP, "kind": "Role", "name": role["metadata"]["name"]}
        assert binding["subjects"] == [CA_SUBJECT]
    # The cluster-wide grant is the built-in role for the issuer's discovery paths only, for the CA alone.
    cluster = rbac("ClusterRoleBinding")
    assert cluster["roleRef"]["kind"] == "ClusterRole"
    assert cluster["roleRef"]["name"] == "system:service-account-issuer-discovery"
    assert cluster["subjects"] == [CA_SUBJECT]
    assert not [d for d in ca_docs() if d["kind"] == "ClusterRole"]


def test_the_api_token_is_the_ca_containers_alone_and_it_runs_unprivileged() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mtlsmesh-ca"
    assert pod["automountServiceAccountToken"] is False  # the only token is the projected volume below
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    sources = volume["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token == {"path": "token", "expirationSeconds": 3600}  # the API server's audience, an hour
    assert {"key": "ca.crt", "path": "ca.crt"} in next(s["configMap"] for s in sources if "configMap" in s)["items"]
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    # The key's group is the CA's own: what caserver.key_mode_problem accepts for a Secret with an fsGroup.
    assert security["fsGroup"] == security["runAsGroup"]
    mode = 0o400 | 0o040  # defaultMode 0400, plus the group read the kubelet adds for the fsGroup
    assert caserver.key_mode_problem(mode, security["fsGroup"], security["runAsUser"], security["runAsGroup"]) is None

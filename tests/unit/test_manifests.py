"""Every Kubernetes manifest we ship or generate is valid, checked offline.

Objects are validated against the Kubernetes OpenAPI schemas of a pinned version with `kubernetes-validate`
(strict: unknown fields are errors, so a typo like `readinesProbe` fails). The schemas cannot see some rules the
API server enforces, so the pod specs are also checked here for them: unique container and port names, port names
that are valid IANA service names, mounts of declared volumes, `restartPolicy` only on init containers.
The kustomization is not an object: it must parse and every file it names must exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mtlsmesh import caproto, config, inject

# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29, stable in 1.33.
K8S_VERSION = "1.33"

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
GOLDEN = Path(__file__).resolve().parent / "golden" / "inject"
CUSTOM_GROUPS = ("example.com/",)  # the golden files' custom resource: no schema exists, by design

_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME, <= 15 chars


def load_documents(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"
    out: list[dict[str, Any]] = []
    for doc in docs:
        # A List has no schema of its own; its items are the objects.
        out.extend(doc["items"] if doc.get("kind") == "List" else [doc])
    return out


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def kustomize_resources() -> list[Path]:
    return [BASE / name for name in kustomization()["resources"]]


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps the kustomization's configMapGenerator makes, built the way kustomize builds them."""
    maps = []
    for generator in kustomization()["configMapGenerator"]:
        data = {}
        for entry in generator["files"]:
            key, _, file_name = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (BASE / file_name).read_text()
        metadata = {"name": generator["name"], "namespace": generator["namespace"]}
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


MANIFESTS = sorted(
    [
        *kustomize_resources(),
        *DEPLOY.glob("examples/*.yaml"),
        *GOLDEN.glob("*.injected.yaml"),
    ]
)


def validate(doc: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        # The library's message embeds the whole schema; the path and the reason are what a person needs.
        location = "/".join(str(part) for part in exc.absolute_path)
        pytest.fail(f"{where}: {doc['kind']} {doc.get('metadata', {}).get('name')}: {location}: {exc.message}")


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc["kind"]
    if kind == "Pod":
        return [doc["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def check_pod_spec(spec: dict[str, Any], where: str, claims: frozenset[str] = frozenset()) -> None:
    """Rules of the API server's pod validation that the OpenAPI schema does not express.

    `claims`: volume names a StatefulSet's volumeClaimTemplates add to each pod."""
    init = spec.get("initContainers", [])
    containers = [*init, *spec["containers"]]
    names = [c["name"] for c in containers]
    assert len(names) == len(set(names)), f"{where}: duplicate container names {names}"
    volumes = {v["name"] for v in spec.get("volumes", [])} | claims
    port_names: list[str] = []
    for container in containers:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: {container['name']} mounts undeclared volume {mount['name']}"
        for port in container.get("ports", []):
            if "name" in port:
                assert _PORT_NAME.match(port["name"]), f"{where}: bad port name {port['name']!r}"
                port_names.append(port["name"])
        env_names = [e["name"] for e in container.get("env", [])]
        assert len(env_names) == len(set(env_names)), f"{where}: {container['name']} has duplicate env names"
    assert len(port_names) == len(set(port_names)), f"{where}: duplicate port names {port_names}"
    for container in spec["containers"]:
        assert "restartPolicy" not in container, f"{where}: restartPolicy on app container {container['name']}"
    for container in init:
        assert container.get("restartPolicy", "Always") == "Always", f"{where}: {container['name']} restartPolicy"
        if container.get("restartPolicy") != "Always":
            # Probes are only allowed on init containers that are sidecars.
            assert not any(p in container for p in ("readinessProbe", "livenessProbe", "startupProbe")), where


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path}: no documents"
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        validate(doc, str(path.relative_to(ROOT)))
        claims = frozenset(t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", []))
        for spec in pod_specs(doc):
            check_pod_spec(spec, f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata'].get('name')}", claims)


def test_the_examples_and_goldens_are_all_covered() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"bookinfo.yaml", "bookinfo-injected.yaml", "namespace.yaml", "rbac.yaml"} <= names
    assert len([n for n in names if n.endswith(".injected.yaml")]) >= 8


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.update(readinesProbe={}), r"'readinesProbe' was unexpected"),
        (lambda c: c["securityContext"].update(runAsUser="1337"), r"'1337' is not of type 'integer'"),
        (lambda c: c["ports"][0].update(containerPort="15021"), r"is not of type 'integer'"),
    ],
)
def test_the_validator_catches_broken_pod_specs(mutate: Any, match: str) -> None:
    """The check above can fail: a broken injected proxy container is rejected."""
    (doc,) = load_documents(GOLDEN / "deployment.injected.yaml")
    mutate(doc["spec"]["template"]["spec"]["initContainers"][1])
    with pytest.raises(kubernetes_validate.ValidationError) as exc:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert re.search(match, exc.value.message)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"containers": [{"name": "a", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}, r"undeclared volume v"),
        ({"containers": [{"name": "a"}, {"name": "a"}]}, r"duplicate container names"),
        ({"containers": [{"name": "a", "ports": [{"name": "mtlsmesh-metrics", "containerPort": 1}]}]}, r"port name"),
        ({"containers": [{"name": "a", "restartPolicy": "Always"}]}, r"restartPolicy on app container"),
    ],
)
def test_the_pod_spec_rules_can_fail(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_pod_spec(spec, "case")


def test_kustomization_parses_and_every_file_it_names_exists() -> None:
    data = kustomization()
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    named = [*data["resources"]]
    for generator in data["configMapGenerator"]:
        named.extend(entry.rpartition("=")[2] for entry in generator["files"])
    for name in named:
        assert (BASE / name).is_file(), f"kustomization.yaml names {name}, which does not exist"
    assert {g["name"] for g in data["configMapGenerator"]} == {"mtlsmesh-trust-bundle", "mtlsmesh-config"}


@pytest.mark.parametrize("config_map", generated_config_maps(), ids=lambda m: m["metadata"]["name"])
def test_generated_config_maps_validate(config_map: dict[str, Any]) -> None:
    validate(config_map, "deploy/base/kustomization.yaml configMapGenerator")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (its kustomize is optional)")
def test_kubectl_kustomize_output_validates() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    kinds = sorted((d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", "default", "mtlsmesh-config"),
        ("ConfigMap", "default", "mtlsmesh-trust-bundle"),
        ("ConfigMap", "mtlsmesh-system", "mtlsmesh-trust-bundle"),
        ("Namespace", "", "mtlsmesh-system"),
        ("Role", "default", "mtlsmesh-svid-writer"),
        ("RoleBinding", "default", "mtlsmesh-svid-writer"),
        ("ServiceAccount", "mtlsmesh-system", "mtlsmesh-ca"),
        ("ServiceAccount", "mtlsmesh-system", "mtlsmesh-svid-writer"),
    ]
    for doc in docs:
        validate(doc, "kubectl kustomize deploy/base")


def test_rbac_grants_only_secrets_in_one_namespace() -> None:
    docs = load_documents(BASE / "rbac.yaml")
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update", "patch"]}
    ]
    # Bound to the job's own service account, never to the CA service's (which must not write Secrets).
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mtlsmesh-svid-writer", "namespace": "mtlsmesh-system"}
    ]


def test_sidecar_config_matches_the_injected_mounts() -> None:
    data = yaml.safe_load((BASE / "config.yaml").read_text())
    # Identity mode: the CA Service of deploy/ca, the token and the bundle where the injector mounts them.
    assert data["identity"] == {
        "ca_address": f"{caproto.CA_SERVICE_DNS}:{caproto.CA_PORT}",
        "token": f"{inject.TOKEN_DIR}/{inject.TOKEN_FILE}",
        "bundle": f"{inject.BUNDLE_DIR}/bundle.pem",
        "ttl": "24h",
        "renew_fraction": 0.5,
    }
    assert "credentials" not in data
    assert inject.TOKEN_AUDIENCE == caproto.DEFAULT_AUDIENCE
    assert (data["outbound"]["listen"], data["inbound"]["listen"]) == ("[::]:15001", "[::]:15006")
    assert data["inbound"]["mode"] == "strict"
    secret = yaml.safe_load((BASE / "config-secret.yaml").read_text())
    assert secret["credentials"] == {
        "cert": "/var/run/mtlsmesh/svid/cert.pem",
        "key": "/var/run/mtlsmesh/svid/key.pem",
        "bundle": "/var/run/mtlsmesh/svid/bundle.pem",
        "reload_interval": "2s",
    }
    # The two configs differ in their SVID source only, and both are where the proxy's --config says.
    assert {k: v for k, v in data.items() if k != "identity"} == {k: v for k, v in secret.items() if k != "credentials"}
    assert list(data) == [("identity" if k == "credentials" else k) for k in secret]
    names = (Path(inject.CONFIG_FILE).name, Path(inject.SECRET_CONFIG_FILE).name)
    assert names == ("config.yaml", "config-secret.yaml")


def test_the_trust_bundle_config_map_is_generated_where_the_pods_mount_it() -> None:
    generated = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in generated_config_maps()}
    bundle = generated[("default", inject.BUNDLE_CONFIG_MAP)]
    assert list(bundle["data"]) == ["bundle.pem"]
    assert bundle["data"] == generated[("mtlsmesh-system", inject.BUNDLE_CONFIG_MAP)]["data"]
    assert list(generated[("default", inject.CONFIG_MAP)]["data"]) == ["config.yaml", "config-secret.yaml"]


@pytest.mark.skipif(not hasattr(config, "load_config"), reason="the sidecar config parser is not in this tree yet")
def test_sidecar_config_is_accepted_by_the_parser() -> None:
    loaded = config.load_config(str(BASE / "config.yaml"))  # type: ignore[attr-defined,unused-ignore]
    assert loaded.inbound.mode is config.Mode.STRICT
    assert loaded.outbound.listen == config.ListenAddr("::", 15001)
    assert loaded.credentials is None and loaded.identity is not None
    assert loaded.identity.token == "/var/run/secrets/tokens/mtlsmesh-token"
    secret = config.load_config(str(BASE / "config-secret.yaml"))  # type: ignore[attr-defined,unused-ignore]
    assert secret.credentials is not None and secret.credentials.key == "/var/run/mtlsmesh/svid/key.pem"
    assert secret.identity is None


@pytest.mark.skipif(not (ROOT / "mtlsmesh" / "cli" / "ca.py").exists(), reason="`mtlsmesh ca` is not in this tree yet")
def test_ca_issued_secret_validates_and_is_the_one_the_injected_pod_mounts(tmp_path: Path) -> None:
    def mtlsmesh(*argv: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "mtlsmesh", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    mtlsmesh("ca", "init", "--dir", str(tmp_path / "ca"))
    secret = yaml.safe_load(
        mtlsmesh("ca", "issue", "--ca-dir", str(tmp_path / "ca"), "--namespace", "default",
                 "--service-account", "bookinfo-details", "--k8s-secret")
    )  # fmt: skip
    validate(secret, "mtlsmesh ca issue --k8s-secret")
    # The Secret mode, for clusters without the CA service: bookinfo injected with `--identity secret`.
    offline = inject.inject_documents(
        load_documents(DEPLOY / "examples" / "bookinfo.yaml"), options=inject.InjectOptions(identity="secret")
    )
    (deployment,) = [
        d for d in offline.documents
        if isinstance(d, dict) and d["kind"] == "Deployment" and d["metadata"]["name"] == "details-v1"
    ]  # fmt: skip
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "mtlsmesh-svid"]
    assert (secret["metadata"]["namespace"], secret["metadata"]["name"]) == (
        deployment["metadata"]["namespace"],
        volume["secret"]["secretName"],
    )
    proxy = next(c for c in spec["initContainers"] if c["name"] == "mtlsmesh-proxy")
    files = {arg.rpartition("/")[2] for arg in proxy["args"] if arg.startswith("/var/run/mtlsmesh/svid/")}
    assert set(secret["data"]) == files == {"cert.pem", "key.pem", "bundle.pem"}


def test_no_private_key_or_certificate_is_committed_in_deploy() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text, path
            assert "BEGIN CERTIFICATE" not in text, path


def test_dockerfile_runs_as_the_proxy_uid_with_the_cli_entrypoint() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert next(line for line in lines if line.startswith("FROM ")) == "FROM python:3.11-slim"
    assert "USER 1337:1337" in lines
    assert lines[-1] == 'ENTRYPOINT ["mtlsmesh"]'
    apt = next(line for line in lines if "apt-get install" in line)
    assert "iptables" in apt and "iproute2" in apt
    # Everything the Dockerfile copies is in the build context's allow-list, and nothing else is.
    copied = {part.rstrip("/") for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    assert copied == allowed == {"pyproject.toml", "README.md", "mtlsmesh"}

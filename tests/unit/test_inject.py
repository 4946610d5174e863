"""The injector: golden files per workload kind, idempotence, annotations, refusals, untouched documents, the CLI.

Golden files live in tests/unit/golden/inject/: `<case>.yaml` is the input, `<case>.injected.yaml` the expected
output; deploy/examples/bookinfo-injected.yaml is one too. After a deliberate change to the injector, regenerate them
and read the diff before committing:

    MTLSMESH_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_inject.py

(the one switch for every golden test, see tests/golden.py).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsmesh.annotations import IDENTITY, STATUS_ANNOTATION
from mtlsmesh.cli import main
from mtlsmesh.errors import ConfigError, MeshError
from mtlsmesh.inject import (
    ADMIN_VOLUME,
    BUNDLE_VOLUME,
    INIT_CONTAINER,
    PROXY_CONTAINER,
    SKIP_HOST_NETWORK,
    SKIP_OPTED_OUT,
    SVID_VOLUME,
    TOKEN_VOLUME,
    InjectOptions,
    inject_documents,
    inject_text,
    pod_commands,
)
from mtlsmesh.manifest import parse_manifests
from tests import golden
from tests.admission_reviews import template_of

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden" / "inject"
CASES = sorted(p.name.removesuffix(".yaml") for p in GOLDEN.glob("*.yaml") if not p.name.endswith(".injected.yaml"))
KINDS = ["pod", "deployment", "statefulset", "daemonset", "job", "cronjob", "replicaset", "replicationcontroller"]


def deployment(annotations: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "image": "example/app:1"}], **spec}
    metadata: dict[str, Any] = {"labels": {"app": "app"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "app"}}, "template": {"metadata": metadata, "spec": pod_spec}},
    }


def inject_one(doc: dict[str, Any], options: InjectOptions | None = None) -> dict[str, Any]:
    result = inject_documents([doc], source="app.yaml", options=options)
    out = result.documents[0]
    assert isinstance(out, dict)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Golden files


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    source = GOLDEN / f"{case}.yaml"
    expected_path = GOLDEN / f"{case}.injected.yaml"
    result = inject_text(source.read_text(), source=source.name)
    golden.assert_golden(expected_path, result.text)


def test_every_kind_has_a_golden_file() -> None:
    assert set(KINDS) <= set(CASES), "a workload kind lacks its golden file"


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_gives_the_same_bytes(case: str) -> None:
    once = inject_text((GOLDEN / f"{case}.yaml").read_text(), source="once").text
    twice = inject_text(once, source="twice")
    assert twice.text == once
    assert twice.warnings == ()


@pytest.mark.parametrize("case", KINDS)
def test_every_kind_gets_the_init_container_then_the_native_sidecar(case: str) -> None:
    (doc,) = parse_manifests((GOLDEN / f"{case}.injected.yaml").read_text(), case)
    assert isinstance(doc, dict)
    template = template_of(doc)
    spec = template["spec"]
    init, proxy = spec["initContainers"][:2]
    assert (init["name"], proxy["name"]) == (INIT_CONTAINER, PROXY_CONTAINER)
    assert init["command"] + init["args"] == ["mtlsmesh", "iptables"]
    assert "restartPolicy" not in init
    assert init["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    }
    assert proxy["restartPolicy"] == "Always"
    assert proxy["securityContext"] == {
        "runAsUser": 1337,
        "runAsGroup": 1337,
        "runAsNonRoot": True,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert {p["containerPort"]: p["name"] for p in proxy["ports"]} == {15021: "mesh-health", 15090: "mesh-metrics"}
    assert proxy["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    # Identity mode, the default: the projected token and the bundle ConfigMap, no SVID Secret.
    assert proxy["volumeMounts"] == [
        {"name": "mtlsmesh-config", "mountPath": "/etc/mtlsmesh", "readOnly": True},
        {"name": "mtlsmesh-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
        {"name": "mtlsmesh-bundle", "mountPath": "/var/run/mtlsmesh/bundle", "readOnly": True},
        {"name": "mtlsmesh-admin", "mountPath": "/var/run/mtlsmesh/admin"},  # where the admin token is written
    ]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["mtlsmesh-admin"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert "mtlsmesh-svid" not in volumes
    assert volumes["mtlsmesh-token"]["projected"] == {
        "sources": [
            {"serviceAccountToken": {"audience": "mtlsmesh-ca", "expirationSeconds": 3600, "path": "mtlsmesh-token"}}
        ],
        "defaultMode": 0o444,
    }
    assert volumes["mtlsmesh-bundle"]["configMap"] == {"name": "mtlsmesh-trust-bundle"}
    assert volumes["mtlsmesh-config"]["configMap"] == {"name": "mtlsmesh-config"}
    assert STATUS_ANNOTATION in template["metadata"]["annotations"]
    # The app containers are exactly what they were.
    (original,) = parse_manifests((GOLDEN / f"{case}.yaml").read_text(), case)
    assert isinstance(original, dict)
    assert spec["containers"] == template_of(original)["spec"]["containers"]


def test_pod_without_service_account_mounts_the_default_accounts_secret() -> None:
    (doc,) = parse_manifests((GOLDEN / "pod.yaml").read_text(), "pod")
    assert isinstance(doc, dict)
    injected = inject_one(doc, InjectOptions(identity="secret"))
    volumes = {v["name"]: v for v in injected["spec"]["volumes"]}
    assert volumes["mtlsmesh-svid"]["secret"]["secretName"] == "mtlsmesh-svid-default"


def test_secret_mode_mounts_the_svid_secret_and_runs_with_the_secret_config() -> None:
    (doc,) = parse_manifests((GOLDEN / "secret.injected.yaml").read_text(), "secret")
    assert isinstance(doc, dict)
    spec = template_of(doc)["spec"]
    proxy = spec["initContainers"][1]
    assert proxy["volumeMounts"] == [
        {"name": "mtlsmesh-config", "mountPath": "/etc/mtlsmesh", "readOnly": True},
        {"name": "mtlsmesh-svid", "mountPath": "/var/run/mtlsmesh/svid", "readOnly": True},
        {"name": "mtlsmesh-admin", "mountPath": "/var/run/mtlsmesh/admin"},
    ]
    assert [v["name"] for v in spec["volumes"]] == [
        "mtlsmesh-svid", "mtlsmesh-config", "mtlsmesh-init-run", "mtlsmesh-admin"
    ]  # fmt: skip
    assert spec["volumes"][0]["secret"] == {"secretName": "mtlsmesh-svid-ratings", "defaultMode": 0o444}
    _, (proxy_argv, _) = pod_commands(spec)
    assert proxy_argv == [
        "mtlsmesh", "sidecar", "--config", "/etc/mtlsmesh/config-secret.yaml",
        "--cert", "/var/run/mtlsmesh/svid/cert.pem",
        "--key", "/var/run/mtlsmesh/svid/key.pem",
        "--bundle", "/var/run/mtlsmesh/svid/bundle.pem",
    ]  # fmt: skip


def injected_templates() -> list[tuple[str, dict[str, Any]]]:
    """(file, template) for every injected pod template of the golden outputs and deploy/examples."""
    paths = [*sorted(GOLDEN.glob("*.injected.yaml")), ROOT / "deploy" / "examples" / "bookinfo-injected.yaml"]
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(doc: object, name: str) -> None:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            for item in doc["items"]:
                walk(item, name)
        elif isinstance(doc, dict) and doc.get("kind") in (
            "Pod",
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "Job",
            "CronJob",
            "ReplicaSet",
            "ReplicationController",
        ):
            template = template_of(doc)
            if STATUS_ANNOTATION in (template.get("metadata") or {}).get("annotations", {}):
                found.append((name, template))

    for path in paths:
        for doc in parse_manifests(path.read_text(), path.name):
            walk(doc, path.name)
    return found


def test_only_the_proxy_mounts_the_token_the_bundle_or_the_svid() -> None:
    # The projected token proves the pod's identity to the CA: an app container that could read it could get
    # itself an SVID of the pod's service account. Nothing but the proxy may mount it (nor the SVID Secret).
    templates = injected_templates()
    assert len(templates) >= 12
    modes = set()
    for name, template in templates:
        spec = template["spec"]
        containers = [
            *spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])
        ]  # fmt: skip
        volumes = {v["name"] for v in spec["volumes"]}
        modes.add(TOKEN_VOLUME in volumes)
        for container in containers:
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            if container["name"] == PROXY_CONTAINER:
                assert mounted & volumes & {TOKEN_VOLUME, BUNDLE_VOLUME, SVID_VOLUME}, name
                assert ADMIN_VOLUME in mounted & volumes, name
            else:
                assert not mounted & {TOKEN_VOLUME, BUNDLE_VOLUME, SVID_VOLUME, ADMIN_VOLUME}, (name, container["name"])
    assert modes == {True, False}  # both SVID sources were looked at


def test_identity_annotation_beats_the_option_and_a_bad_value_is_refused() -> None:
    doc = deployment({IDENTITY: "ca"})
    spec = inject_one(doc, InjectOptions(identity="secret"))["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]][:2] == [TOKEN_VOLUME, BUNDLE_VOLUME]
    spec = inject_one(deployment(), InjectOptions(identity="secret"))["spec"]["template"]["spec"]
    assert spec["volumes"][0]["name"] == SVID_VOLUME
    with pytest.raises(ConfigError, match=r"annotation mtlsmesh.io/identity: expected one of ca, secret, got 'vault'"):
        inject_documents([deployment({IDENTITY: "vault"})], source="app.yaml")
    with pytest.raises(ConfigError, match=r"identity: expected one of ca, secret"):
        InjectOptions(identity="files")


def test_reinjection_follows_a_changed_identity_annotation() -> None:
    first = inject_one(deployment())
    first["spec"]["template"]["metadata"]["annotations"][IDENTITY] = "secret"
    spec = inject_one(first)["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]] == [
        "mtlsmesh-svid", "mtlsmesh-config", "mtlsmesh-init-run", "mtlsmesh-admin"
    ]  # fmt: skip
    assert {m["name"] for m in spec["initContainers"][1]["volumeMounts"]} == {
        "mtlsmesh-svid", "mtlsmesh-config", "mtlsmesh-admin"
    }  # fmt: skip


def test_existing_init_containers_and_volumes_are_kept_after_ours() -> None:
    (doc,) = parse_manifests((GOLDEN / "pod.injected.yaml").read_text(), "pod")
    assert isinstance(doc, dict)
    assert [c["name"] for c in doc["spec"]["initContainers"]] == [INIT_CONTAINER, PROXY_CONTAINER, "wait-for-db"]
    assert [v["name"] for v in doc["spec"]["volumes"]] == [
        "scratch",
        "mtlsmesh-token",
        "mtlsmesh-bundle",
        "mtlsmesh-config",
        "mtlsmesh-init-run",
        "mtlsmesh-admin",
    ]


def test_bookinfo_injected_example_is_up_to_date() -> None:
    source = ROOT / "deploy" / "examples" / "bookinfo.yaml"
    result = inject_text(source.read_text(), source=str(source))
    assert result.injected == (
        "Deployment default/details-v1",
        "Deployment default/ratings-v1",
        "Deployment default/reviews-v1",
        "Deployment default/productpage-v1",
    )
    golden.assert_golden(ROOT / "deploy" / "examples" / "bookinfo-injected.yaml", result.text)


# ---------------------------------------------------------------------------------------------------------------
# Annotations

BASE_INIT_ENV = {
    "MTLSMESH_PROXY_UID": "1337",
    "MTLSMESH_PROXY_GID": "1337",
    "MTLSMESH_OUTBOUND_PORT": "15001",
    "MTLSMESH_INBOUND_PORT": "15006",
    "MTLSMESH_INBOUND_PORTS": "*",
    "MTLSMESH_EXCLUDE_INBOUND_PORTS": "",
    "MTLSMESH_EXCLUDE_OUTBOUND_PORTS": "",
    "MTLSMESH_INCLUDE_OUTBOUND_CIDRS": "*",
    "MTLSMESH_EXCLUDE_OUTBOUND_CIDRS": "",
}


@pytest.mark.parametrize(
    ("annotation", "value", "variable", "expected"),
    [
        ("mtlsmesh.io/exclude-inbound-ports", "8081, 9090", "MTLSMESH_EXCLUDE_INBOUND_PORTS", "8081,9090"),
        ("mtlsmesh.io/exclude-inbound-ports", "", "MTLSMESH_EXCLUDE_INBOUND_PORTS", ""),
        ("mtlsmesh.io/exclude-outbound-ports", "5432", "MTLSMESH_EXCLUDE_OUTBOUND_PORTS", "5432"),
        ("mtlsmesh.io/exclude-outbound-ports", " 25 ,587 ", "MTLSMESH_EXCLUDE_OUTBOUND_PORTS", "25,587"),
        ("mtlsmesh.io/include-inbound-ports", "*", "MTLSMESH_INBOUND_PORTS", "*"),
        ("mtlsmesh.io/include-inbound-ports", "9080,9443", "MTLSMESH_INBOUND_PORTS", "9080,9443"),
        ("mtlsmesh.io/include-inbound-ports", "", "MTLSMESH_INBOUND_PORTS", ""),
        ("mtlsmesh.io/exclude-outbound-cidrs", "10.96.0.1/32", "MTLSMESH_EXCLUDE_OUTBOUND_CIDRS", "10.96.0.1/32"),
        ("mtlsmesh.io/exclude-outbound-cidrs", "169.254.0.0/16, fd00::/8", "MTLSMESH_EXCLUDE_OUTBOUND_CIDRS",
         "169.254.0.0/16,fd00::/8"),
        ("mtlsmesh.io/include-outbound-cidrs", "10.0.0.0/8", "MTLSMESH_INCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8"),
        ("mtlsmesh.io/include-outbound-cidrs", "*", "MTLSMESH_INCLUDE_OUTBOUND_CIDRS", "*"),
    ],
)  # fmt: skip
def test_capture_annotation_becomes_init_env(annotation: str, value: str, variable: str, expected: str) -> None:
    out = inject_one(deployment({annotation: value}))
    (init_argv, init_env), (_, proxy_env) = pod_commands(out["spec"]["template"]["spec"])
    assert init_argv == ["mtlsmesh", "iptables"]
    assert init_env == {**BASE_INIT_ENV, variable: expected}
    assert proxy_env == {}


@pytest.mark.parametrize("mode", ["strict", "permissive", "disable", "Permissive"])
def test_inbound_mode_annotation_sets_proxy_env(mode: str) -> None:
    out = inject_one(deployment({"mtlsmesh.io/inbound-mode": mode}))
    (_, init_env), (proxy_argv, proxy_env) = pod_commands(out["spec"]["template"]["spec"])
    assert proxy_env == {"MTLSMESH_INBOUND_MODE": mode.lower()}
    assert init_env == BASE_INIT_ENV
    assert proxy_argv[:2] == ["mtlsmesh", "sidecar"]


@pytest.mark.parametrize("value", ["TPROXY", "tproxy"])
def test_tproxy_annotation_sets_the_init_step_and_the_proxy_alike(value: str) -> None:
    out = inject_one(deployment({"mtlsmesh.io/interception-mode": value}))
    spec = out["spec"]["template"]["spec"]
    (_, init_env), (_, proxy_env) = pod_commands(spec)
    assert init_env == {**BASE_INIT_ENV, "MTLSMESH_INTERCEPTION_MODE": "TPROXY"}
    assert proxy_env == {"MTLSMESH_INTERCEPTION_MODE": "TPROXY"}
    proxy = next(c for c in spec["initContainers"] if c["name"] == "mtlsmesh-proxy")
    assert proxy["securityContext"]["capabilities"] == {"add": ["NET_ADMIN"], "drop": ["ALL"]}


def test_redirect_annotation_changes_nothing() -> None:
    plain = inject_one(deployment({}))
    redirect = inject_one(deployment({"mtlsmesh.io/interception-mode": "REDIRECT"}))
    assert pod_commands(redirect["spec"]["template"]["spec"]) == pod_commands(plain["spec"]["template"]["spec"])
    proxy = next(c for c in redirect["spec"]["template"]["spec"]["initContainers"] if c["name"] == "mtlsmesh-proxy")
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_workload_annotations_apply_and_the_template_wins() -> None:
    doc = deployment({"mtlsmesh.io/exclude-outbound-ports": "25"})
    doc["metadata"]["annotations"] = {
        "mtlsmesh.io/exclude-outbound-ports": "587",
        "mtlsmesh.io/exclude-inbound-ports": "8081",
    }
    (_, env), _ = pod_commands(inject_one(doc)["spec"]["template"]["spec"])
    assert env["MTLSMESH_EXCLUDE_OUTBOUND_PORTS"] == "25"
    assert env["MTLSMESH_EXCLUDE_INBOUND_PORTS"] == "8081"


@pytest.mark.parametrize(
    ("annotations", "match"),
    [
        ({"mtlsmesh.io/exclude-inbound-ports": "80,http"}, r"annotation mtlsmesh.io/exclude-inbound-ports: 'http' is "
         r"not a port \(1-65535\)"),
        ({"mtlsmesh.io/exclude-inbound-ports": "0"}, r"exclude-inbound-ports: '0' is not a port"),
        ({"mtlsmesh.io/exclude-inbound-ports": "\u0661\u0662"}, r"exclude-inbound-ports: '\u0661\u0662' is not a port"),
        ({"mtlsmesh.io/exclude-inbound-ports": "8080;8081"}, r"exclude-inbound-ports: '8080;8081' is not a port"),
        ({"mtlsmesh.io/exclude-outbound-ports": "65536"}, r"exclude-outbound-ports: '65536' is not a port"),
        ({"mtlsmesh.io/exclude-outbound-ports": "*"}, r"exclude-outbound-ports: '\*' is not a port"),
        ({"mtlsmesh.io/include-inbound-ports": "80,,81"}, r"include-inbound-ports: '' is not a port"),
        ({"mtlsmesh.io/include-inbound-ports": "-1"}, r"include-inbound-ports: '-1' is not a port"),
        ({"mtlsmesh.io/exclude-outbound-cidrs": "10.0.0.1/8"}, r"exclude-outbound-cidrs: '10.0.0.1/8' is not a CIDR"),
        ({"mtlsmesh.io/include-outbound-cidrs": "10.0.0.0/33"}, r"include-outbound-cidrs: '10.0.0.0/33' is not a CIDR"),
        ({"mtlsmesh.io/exclude-outbound-cidrs": "*"}, r"exclude-outbound-cidrs: '\*' is not a CIDR"),
        ({"mtlsmesh.io/inbound-mode": "mtls"}, r"annotation mtlsmesh.io/inbound-mode: expected one of strict, "
         r"permissive, disable, got 'mtls'"),
        ({"mtlsmesh.io/interception-mode": "nat"}, r"annotation mtlsmesh.io/interception-mode: expected one of "
         r"REDIRECT, TPROXY, got 'nat'"),
        ({"mtlsmesh.io/include-inbound-ports": "9080,15021"}, r"annotation mtlsmesh.io/include-inbound-ports: port "
         r"15021 is the sidecar's own and is never captured"),
        ({"mtlsmesh.io/include-inbound-ports": "80, 443", "mtlsmesh.io/exclude-inbound-ports": "443"},
         r"annotations mtlsmesh.io/include-inbound-ports and mtlsmesh.io/exclude-inbound-ports: port 443 is both "
         r"captured and excluded"),
        ({"mtlsmesh.io/include-outbound-cidrs": "10.0.0.0/8", "mtlsmesh.io/exclude-outbound-cidrs": "10.0.0.0/8"},
         r"annotations mtlsmesh.io/include-outbound-cidrs and mtlsmesh.io/exclude-outbound-cidrs: 10.0.0.0/8 is "
         r"both included and excluded"),
        ({"mtlsmesh.io/inject": "no"}, r"annotation mtlsmesh.io/inject: expected \"true\" or \"false\", got 'no'"),
        ({"mtlsmesh.io/inject": False}, r"annotation mtlsmesh.io/inject: annotation values are strings, quote it"),
        ({"mtlsmesh.io/exclude-inbound-ports": 8080}, r"exclude-inbound-ports: annotation values are strings"),
        ({"mtlsmesh.io/exclude-inbound-port": "8080"}, r"annotation mtlsmesh.io/exclude-inbound-port: unknown; "
         r"known: .*mtlsmesh.io/exclude-inbound-ports"),
    ],
)  # fmt: skip
def test_bad_annotation_is_a_config_error_naming_document_and_annotation(
    annotations: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        inject_documents([{"kind": "ConfigMap"}, deployment(annotations)], source="app.yaml")
    assert exc.value.path == "app.yaml: document 2 (Deployment shop/app)"


@pytest.mark.parametrize("where", ["template", "workload"])
def test_inject_false_opts_out(where: str) -> None:
    doc = deployment({"mtlsmesh.io/inject": "false"} if where == "template" else None)
    if where == "workload":
        doc["metadata"]["annotations"] = {"mtlsmesh.io/inject": "false"}
    result = inject_documents([doc])
    assert result.documents == (doc,)
    assert result.injected == ()
    assert result.skipped == (("Deployment shop/app", SKIP_OPTED_OUT),)


def test_inject_true_injects() -> None:
    result = inject_documents([deployment({"mtlsmesh.io/inject": "true"})])
    assert result.injected == ("Deployment shop/app",)
    assert result.skipped == ()


def test_reinjection_follows_changed_annotations_and_image() -> None:
    first = inject_one(deployment({"mtlsmesh.io/exclude-inbound-ports": "8081"}))
    first["spec"]["template"]["metadata"]["annotations"]["mtlsmesh.io/exclude-inbound-ports"] = "9090"
    second = inject_one(first, InjectOptions(image="registry.example/mtlsmesh:0.2.0"))
    spec = second["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_CONTAINER, PROXY_CONTAINER]
    assert [v["name"] for v in spec["volumes"]] == [
        "mtlsmesh-token", "mtlsmesh-bundle", "mtlsmesh-config", "mtlsmesh-init-run", "mtlsmesh-admin"
    ]  # fmt: skip
    assert {c["image"] for c in spec["initContainers"]} == {"registry.example/mtlsmesh:0.2.0"}
    (_, env), _ = pod_commands(spec)
    assert env["MTLSMESH_EXCLUDE_INBOUND_PORTS"] == "9090"


# ---------------------------------------------------------------------------------------------------------------
# Refusals and skips


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"securityContext": {"runAsUser": 1337}}, r"document 1 \(Deployment shop/app\): the pod's securityContext "
         r"runs as uid 1337, the proxy's uid"),
        ({"securityContext": {"runAsGroup": 1337}}, r"the pod's securityContext runs as gid 1337, the proxy's gid"),
        ({"containers": [{"name": "app", "image": "a", "securityContext": {"runAsUser": 1337}}]},
         r"Deployment shop/app\): container 'app' runs as uid 1337"),
        ({"containers": [{"name": "ok", "image": "a"}, {"name": "worker", "image": "b",
                                                        "securityContext": {"runAsGroup": 1337}}]},
         r"container 'worker' runs as gid 1337"),
        ({"initContainers": [{"name": "setup", "image": "a", "securityContext": {"runAsUser": 1337}}]},
         r"container 'setup' runs as uid 1337"),
        ({"initContainers": [{"name": "mtlsmesh-proxy", "image": "a"}]},
         r"spec.initContainers already has a container named 'mtlsmesh-proxy'"),
        ({"volumes": [{"name": "mtlsmesh-config", "emptyDir": {}}]},
         r"spec.volumes already has a volume named 'mtlsmesh-config'"),
        ({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 15001}]}]},
         r"container 'app' declares port 15001, which the proxy binds"),
        ({"containers": "app"}, r"spec.containers: expected a list"),
        ({"containers": [{"name": "app", "image": "a", "ports": 5}]},
         r"container 'app': ports: expected a list \(got 5\)"),
        ({"containers": [{"name": "app", "image": "a", "ports": ["http"]}]},
         r"container 'app': ports: expected a list of mappings \(got 'http'\)"),
        ({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": [1]}]}]},
         r"container 'app': containerPort: expected an integer \(got \[1\]\)"),
        ({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": "80"}]}]},
         r"container 'app': containerPort: expected an integer \(got '80'\)"),
        ({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 80, "name": ["web"]}]}]},
         r"container 'app': ports name: expected a string \(got \['web'\]\)"),
    ],
)  # fmt: skip
def test_refuses_pods_that_would_break_the_mesh(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(MeshError, match=match):
        inject_documents([deployment(**spec)], source="app.yaml")


def test_other_proxy_uid_is_the_one_refused() -> None:
    doc = deployment(securityContext={"runAsUser": 1337})
    out = inject_one(doc, InjectOptions(proxy_uid=2000, proxy_gid=2000))
    (_, env), _ = pod_commands(out["spec"]["template"]["spec"])
    assert (env["MTLSMESH_PROXY_UID"], env["MTLSMESH_PROXY_GID"]) == ("2000", "2000")
    with pytest.raises(MeshError, match=r"runs as uid 2000"):
        inject_one(deployment(securityContext={"runAsUser": 2000}), InjectOptions(proxy_uid=2000))


def test_host_network_pod_is_skipped_with_a_warning() -> None:
    doc = deployment(hostNetwork=True)
    result = inject_documents([doc], source="app.yaml")
    assert result.documents == (doc,)
    assert result.warnings == (
        "app.yaml: document 1 (Deployment shop/app): skipped: hostNetwork pods share the node's network, "
        "capture would hit the node",
    )
    assert result.skipped == (("Deployment shop/app", SKIP_HOST_NETWORK),)


@pytest.mark.parametrize(
    ("annotations", "port", "warned"),
    [
        (None, 8080, True),
        (None, "http", True),
        ({"mtlsmesh.io/inbound-mode": "permissive"}, 8080, False),
        ({"mtlsmesh.io/inbound-mode": "strict"}, 8080, True),
        ({"mtlsmesh.io/exclude-inbound-ports": "8080"}, 8080, False),
        ({"mtlsmesh.io/include-inbound-ports": "9080"}, 8080, False),
        (None, 15021, False),
    ],
)
def test_probe_on_a_strictly_captured_port_warns(
    annotations: dict[str, str] | None, port: object, warned: bool
) -> None:
    container = {
        "name": "app",
        "image": "a",
        "ports": [{"name": "http", "containerPort": 8080}],
        "livenessProbe": {"httpGet": {"path": "/", "port": port}},
    }
    result = inject_documents([deployment(annotations, containers=[container])], source="app.yaml")
    expected = (
        "app.yaml: document 1 (Deployment shop/app): container 'app': livenessProbe reaches port 8080 in plaintext "
        "from the kubelet; in strict inbound mode the sidecar refuses it: set mtlsmesh.io/inbound-mode: permissive "
        "or add the port to mtlsmesh.io/exclude-inbound-ports",
    )
    assert result.warnings == (expected if warned else ())


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}},
         r"document 1 \(Deployment x\): spec.template: expected a mapping"),
        ({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": {}}},
         r"\(CronJob c\): spec.jobTemplate.spec: expected a mapping"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
         r"\(Pod p\): spec: expected a mapping"),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": ["a"]}, "spec": {}},
         r"\(Pod p\): metadata.annotations: expected a mapping"),
    ],
)  # fmt: skip
def test_malformed_workload_is_a_config_error(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        inject_documents([doc], source="app.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Everything else stays as it was


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b\nc\n"}},
        {"apiVersion": "example.com/v1", "kind": "Deployment", "spec": {"template": {"spec": {"containers": []}}}},
        {"apiVersion": "v1", "kind": "PodTemplate", "template": {"spec": {"containers": []}}},
        {"kind": "List", "items": "not a list"},
        ["a", "list", "document"],
        "a string document",
        42,
    ],
)
def test_non_pod_documents_are_untouched(doc: object) -> None:
    before = copy.deepcopy(doc)
    result = inject_documents([doc])
    assert result.documents == (before,)
    assert result.injected == ()


@pytest.mark.parametrize(
    "value",
    ["two  \nlines", "blank\n\nline\n", "\ttab\nx", "  leading\nspace", "keep\n\n\n", "ünïcode\n✓\n", "no newline"],
)
def test_untouched_strings_render_the_same_twice(value: str) -> None:
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"v": value}}
    once = inject_text(yaml.safe_dump(doc), source="in").text
    assert parse_manifests(once, "once") == [doc]
    assert inject_text(once, source="once").text == once


def test_input_documents_are_not_mutated() -> None:
    doc = deployment({"mtlsmesh.io/exclude-inbound-ports": "8081"})
    before = copy.deepcopy(doc)
    inject_documents([doc])
    assert doc == before


def test_multi_document_injects_only_pod_templates_and_keeps_order() -> None:
    text = (GOLDEN / "multi.yaml").read_text()
    result = inject_text(text, source="multi.yaml")
    before = [d for d in parse_manifests(text, "in") if d is not None]
    after = parse_manifests(result.text, "out")
    assert len(before) == len(after) == 5  # the empty document is dropped
    assert result.injected == ("Deployment default/web",)
    for old, new in zip(before, after, strict=True):
        assert isinstance(old, dict) and isinstance(new, dict)
        assert list(new) == list(old)  # key order kept
        if (new["kind"], new["metadata"]["name"]) != ("Deployment", "web"):
            assert new == old
    assert "app.properties: |\n    greeting=hello\n    retries=3\n" in result.text


def test_list_items_are_injected_one_by_one() -> None:
    result = inject_text((GOLDEN / "list.yaml").read_text(), source="list.yaml")
    assert result.injected == ("Deployment default/ratings",)
    (doc,) = parse_manifests(result.text, "out")
    assert isinstance(doc, dict)
    kinds = [(item["kind"], item["metadata"]["name"], "initContainers" in template_of(item)["spec"])
             for item in doc["items"] if item["kind"] == "Deployment"]  # fmt: skip
    assert kinds == [("Deployment", "ratings", True), ("Deployment", "ratings-debug", False)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("kind: Pod\nmetadata: {name: a\n", r"^app.yaml:3: malformed YAML: expected ',' or '}', but got"),
        ("a: 1\n---\nb: [1, 2\nc: 3\n", r"^app.yaml:4: malformed YAML"),
        ("key: value\n  bad indent: here\n", r"^app.yaml:2: malformed YAML: mapping values are not allowed here"),
        ("a: !!python/object:os.system x\n", r"^app.yaml:1: malformed YAML: could not determine a constructor"),
        ("a: \x07bell\n", r"^app.yaml: malformed YAML: character '\\x07' at offset 3 is not allowed$"),
    ],
)
def test_malformed_yaml_names_the_file_and_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        inject_text(text, source="app.yaml")


# ---------------------------------------------------------------------------------------------------------------
# pod_commands: reading an injected pod back


@pytest.mark.parametrize("case", KINDS)
def test_pod_commands_returns_exactly_what_the_yaml_says(case: str) -> None:
    (doc,) = parse_manifests((GOLDEN / f"{case}.injected.yaml").read_text(), case)
    assert isinstance(doc, dict)
    spec = template_of(doc)["spec"]
    (init_argv, init_env), (proxy_argv, proxy_env) = pod_commands(spec)
    init, proxy = spec["initContainers"][:2]
    assert init_argv == init["command"] + init["args"]
    assert init_env == {e["name"]: e["value"] for e in init["env"]}
    assert proxy_argv == proxy["command"] + proxy["args"]
    assert proxy_env == {e["name"]: e["value"] for e in proxy.get("env", [])}
    assert proxy_argv == ["mtlsmesh", "sidecar", "--config", "/etc/mtlsmesh/config.yaml"]


def test_pod_commands_of_the_annotated_golden_deployment() -> None:
    (doc,) = parse_manifests((GOLDEN / "deployment.injected.yaml").read_text(), "deployment")
    assert isinstance(doc, dict)
    (_, init_env), (_, proxy_env) = pod_commands(doc["spec"]["template"]["spec"])
    assert init_env == {
        **BASE_INIT_ENV,
        "MTLSMESH_INBOUND_PORTS": "9080,9443",
        "MTLSMESH_EXCLUDE_INBOUND_PORTS": "9090",
        "MTLSMESH_EXCLUDE_OUTBOUND_PORTS": "5432,6379",
        "MTLSMESH_INCLUDE_OUTBOUND_CIDRS": "10.0.0.0/8,fd00::/8",
        "MTLSMESH_EXCLUDE_OUTBOUND_CIDRS": "10.96.0.1/32",
    }
    assert proxy_env == {"MTLSMESH_INBOUND_MODE": "permissive"}


@pytest.mark.skipif(
    not (ROOT / "mtlsmesh" / "cli" / "iptables.py").exists(), reason="`mtlsmesh iptables` is not in this tree yet"
)
@pytest.mark.parametrize(
    ("case", "expected"), [("pod", "--dport 15090 -j RETURN"), ("deployment", "--dport 9090 -j RETURN")]
)
def test_init_command_is_accepted_by_mtlsmesh_iptables(case: str, expected: str) -> None:
    """The injected init step's argv and env, run as `mtlsmesh iptables --dry-run` (no root needed)."""
    (doc,) = parse_manifests((GOLDEN / f"{case}.injected.yaml").read_text(), case)
    assert isinstance(doc, dict)
    (argv, env), _ = pod_commands(template_of(doc)["spec"])
    assert argv[0] == "mtlsmesh"
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *argv[1:], "--dry-run"],
        env={**base_env, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"containers": [{"name": "app"}]}, r"no container 'mtlsmesh-init': the pod spec is not injected"),
        ({"initContainers": [{"name": "mtlsmesh-init", "command": ["mtlsmesh"], "args": ["iptables"]}]},
         r"no container 'mtlsmesh-proxy'"),
        ({"initContainers": [{"name": "mtlsmesh-init", "args": ["iptables"]}]}, r"mtlsmesh-init: expected command"),
        ({"initContainers": [{"name": "mtlsmesh-init", "command": ["mtlsmesh"],
                              "env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}]},
         r"mtlsmesh-init.env: .*only literal string values"),
    ],
)  # fmt: skip
def test_pod_commands_refuses_what_it_cannot_read(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pod_commands(spec)


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_reads_a_file_and_writes_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "app.yaml"
    source.write_text((GOLDEN / "job.yaml").read_text())
    assert main(["inject", "-f", str(source)]) == 0
    captured = capsys.readouterr()
    assert captured.out == (GOLDEN / "job.injected.yaml").read_text()
    assert captured.err == ""


def test_cli_writes_output_file_and_custom_image(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump(deployment()))
    out = tmp_path / "out.yaml"
    assert main(["inject", "-f", str(source), "-o", str(out), "--image", "reg.example/mesh:1"]) == 0
    (doc,) = parse_manifests(out.read_text(), "out")
    assert isinstance(doc, dict)
    assert {c["image"] for c in doc["spec"]["template"]["spec"]["initContainers"]} == {"reg.example/mesh:1"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mtlsmesh-inject-")]


def test_cli_identity_flag_sets_the_svid_source_of_unannotated_pods(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump_all([deployment(), deployment({IDENTITY: "ca"})]))
    out = tmp_path / "out.yaml"
    assert main(["inject", "-f", str(source), "-o", str(out), "--identity", "secret"]) == 0
    plain, annotated = parse_manifests(out.read_text(), "out")
    assert isinstance(plain, dict) and isinstance(annotated, dict)
    assert plain["spec"]["template"]["spec"]["volumes"][0]["name"] == SVID_VOLUME
    assert annotated["spec"]["template"]["spec"]["volumes"][0]["name"] == TOKEN_VOLUME


def test_cli_reads_stdin_and_prints_warnings_to_stderr() -> None:
    text = yaml.safe_dump(deployment(hostNetwork=True))
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "inject", "-f", "-"], input=text, capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout) == yaml.safe_load(text)
    assert result.stderr == (
        "mtlsmesh: warning: <stdin>: document 1 (Deployment shop/app): skipped: hostNetwork pods share the node's "
        "network, capture would hit the node\n"
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("kind: Pod\nmetadata: [\n", r"^mtlsmesh: error: .*app.yaml:3: malformed YAML"),
        (yaml.safe_dump(deployment(securityContext={"runAsUser": 1337})),
         r"^mtlsmesh: error: .*app.yaml: document 1 \(Deployment shop/app\): the pod's securityContext runs as "
         r"uid 1337"),
        (yaml.safe_dump(deployment({"mtlsmesh.io/inbound-mode": "on"})),
         r"^mtlsmesh: error: .*annotation mtlsmesh.io/inbound-mode: expected one of"),
        ("a: &a [*a]\n", r"^mtlsmesh: error: .*app.yaml: document 1: an anchor refers to itself"),
        ("kind: Pod\nmetadata: &m {labels: *m}\n", r"^mtlsmesh: error: .*app.yaml: document 1: an anchor refers"),
        (yaml.safe_dump(deployment(containers=[{"name": "app", "image": "a", "ports": 5}])),
         r"^mtlsmesh: error: .*app.yaml: document 1 \(Deployment shop/app\): container 'app': ports: expected a list"),
        (yaml.safe_dump(deployment(containers=[{"name": "app", "image": "a", "ports": [{"containerPort": [1]}]}])),
         r"^mtlsmesh: error: .*container 'app': containerPort: expected an integer \(got \[1\]\)"),
    ],
)  # fmt: skip
def test_cli_error_is_one_line_exit_2_and_leaves_output_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, match: str
) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(content)
    out = tmp_path / "out.yaml"
    out.write_text("previous\n")
    assert main(["inject", "-f", str(source), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("mtlsmesh: error: ")
    assert re.match(match, captured.err)
    assert out.read_text() == "previous\n"


def test_cli_missing_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["inject", "-f", str(missing)]) == 2
    assert capsys.readouterr().err == f"mtlsmesh: error: {missing}: cannot read: No such file or directory\n"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xfekind: Pod\n", r"^mtlsmesh: error: <stdin>: not UTF-8 text \(byte 0\)\n$"),
        (
            b"a: [\n",
            r"^mtlsmesh: error: <stdin>:2: malformed YAML: expected the node content, but found '<stream end>'\n$",
        ),
        (b"a: \x07\n", r"^mtlsmesh: error: <stdin>: malformed YAML: character '\\x07' at offset 3 is not allowed\n$"),
    ],
)
def test_cli_bad_stdin_is_one_line_exit_2(data: bytes, match: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "inject", "-f", "-"], input=data, capture_output=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert re.match(match, result.stderr.decode())


def test_cli_accepts_a_byte_order_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "app.yaml"
    source.write_bytes(b"\xef\xbb\xbf" + (GOLDEN / "job.yaml").read_bytes())
    assert main(["inject", "-f", str(source)]) == 0
    assert capsys.readouterr().out == (GOLDEN / "job.injected.yaml").read_text()


def test_cli_may_overwrite_its_input(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text((GOLDEN / "daemonset.yaml").read_text())
    assert main(["inject", "-f", str(source), "-o", str(source)]) == 0
    assert source.read_text() == (GOLDEN / "daemonset.injected.yaml").read_text()

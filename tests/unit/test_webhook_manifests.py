"""deploy/webhook: the admission webhook's objects are valid, and say what the code and deploy/README.md say.

Every object validates against the Kubernetes schemas (offline, as tests/unit/test_manifests.py does); the
Deployment runs the real `mtlsmesh webhook` flags (parsed here by its own parser) from the Secret that
`mtlsmesh ca issue --k8s-secret` makes, non-root on a read-only root filesystem, with HTTPS probes on the port the
Service targets; the MutatingWebhookConfiguration calls that Service on the path the webhook serves, and its
selectors, evaluated here on a table of namespaces and pods, select exactly what deploy/README.md promises. The
documented caBundle command, run as written, fills in a valid configuration.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsmesh import admission
from mtlsmesh.cli import build_parser
from mtlsmesh.cli.webhook import build_settings
from mtlsmesh.config import ListenAddr
from tests.admission_reviews import WEBHOOK_DNS
from tests.unit.test_manifests import check_pod_spec, load_documents, validate

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_DIR = ROOT / "deploy" / "webhook"
FILES = sorted(WEBHOOK_DIR.glob("*.yaml"))
EXCLUDED = ("kube-system", "mtlsmesh-system")


def objects() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in (WEBHOOK_DIR / "webhook.yaml", WEBHOOK_DIR / "mutatingwebhook.yaml"):
        for doc in load_documents(path):
            out[doc["kind"]] = doc
    return out


def mtlsmesh(*argv: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *argv], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("path", [p for p in FILES if p.name != "kustomization.yaml"], ids=lambda p: p.name)
def test_every_object_validates(path: Path) -> None:
    for doc in load_documents(path):
        validate(doc, str(path.relative_to(ROOT)))
        if doc["kind"] == "Deployment":
            check_pod_spec(doc["spec"]["template"]["spec"], f"{path.name}: Deployment")


def test_the_kustomization_adds_the_webhook_to_the_base() -> None:
    data = yaml.safe_load((WEBHOOK_DIR / "kustomization.yaml").read_text())
    assert (data["apiVersion"], data["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert data["resources"][0] == "../base"
    for name in data["resources"]:
        assert (WEBHOOK_DIR / name).exists(), f"kustomization.yaml names {name}, which does not exist"
    assert set(data["resources"][1:]) == {p.name for p in FILES} - {"kustomization.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (its kustomize is optional)")
def test_kubectl_kustomize_output_validates() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(WEBHOOK_DIR)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "mtlsmesh-webhook"), ("Service", "mtlsmesh-webhook"),
            ("PodDisruptionBudget", "mtlsmesh-webhook"), ("ServiceAccount", "mtlsmesh-webhook"),
            ("MutatingWebhookConfiguration", "mtlsmesh-sidecar-injector"), ("Namespace", "mtlsmesh-system"),
            ("ConfigMap", "mtlsmesh-config")} <= names  # fmt: skip
    for doc in docs:
        validate(doc, "kubectl kustomize deploy/webhook")
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mtlsmesh"


# ---------------------------------------------------------------------------------------------------------------
# The Deployment, its Secret, its Service


def test_two_replicas_a_disruption_budget_and_a_service_that_select_them() -> None:
    found = objects()
    deployment, budget, service = found["Deployment"], found["PodDisruptionBudget"], found["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert budget["spec"]["minAvailable"] == 1
    for selector in (deployment["spec"]["selector"]["matchLabels"], budget["spec"]["selector"]["matchLabels"],
                     service["spec"]["selector"]):  # fmt: skip
        assert selector.items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (port["port"], named[port["targetPort"]]) == (443, 15017)
    assert f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc" == WEBHOOK_DNS


def test_the_webhook_runs_non_root_read_only_with_nothing_extra() -> None:
    deployment = objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in container["resources"] and "requests" in container["resources"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["mtlsmesh.io/inject"] == "false"


def test_the_probes_ask_the_health_path_over_https_on_the_served_port() -> None:
    (container,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = container[probe]["httpGet"]
        assert (target["path"], target["scheme"], target["port"]) == (admission.HEALTH_PATH, "HTTPS", "https")


def test_the_args_are_the_real_flags_and_name_the_secrets_files(tmp_path: Path) -> None:
    deployment = objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "webhook"  # the image's entrypoint is `mtlsmesh`
    settings = build_settings(build_parser(container["args"]).parse_args(container["args"]))
    assert settings.webhook.listen == ListenAddr("0.0.0.0", 15017)
    assert settings.webhook.options.image == container["image"]  # the injected containers run this very image
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    files = {settings.files.cert, settings.files.key, settings.files.bundle}
    assert {str(Path(f).parent) for f in files} == {mount["mountPath"]}
    # The Secret the documented command makes is the one mounted, with the keys the flags name.
    mtlsmesh("ca", "init", "--dir", str(tmp_path / "ca"), cwd=tmp_path)
    secret = yaml.safe_load(
        mtlsmesh("ca", "issue", "--ca-dir", str(tmp_path / "ca"), "--namespace", "mtlsmesh-system",
                 "--service-account", "mtlsmesh-webhook", "--dns", WEBHOOK_DNS, "--ttl", "720h", "--k8s-secret",
                 cwd=tmp_path)
    )  # fmt: skip
    validate(secret, "mtlsmesh ca issue --k8s-secret")
    assert (secret["metadata"]["namespace"], secret["metadata"]["name"]) == (
        deployment["metadata"]["namespace"],
        volume["secret"]["secretName"],
    )
    assert set(secret["data"]) == {Path(f).name for f in files}
    assert (
        volume["secret"]["defaultMode"] == 0o440
        and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    )


# ---------------------------------------------------------------------------------------------------------------
# The MutatingWebhookConfiguration


def webhooks() -> list[dict[str, Any]]:
    hooks: list[dict[str, Any]] = objects()["MutatingWebhookConfiguration"]["webhooks"]
    return hooks


def test_each_webhook_calls_the_service_on_the_inject_path_for_pod_creates_only() -> None:
    service = objects()["Service"]
    assert len(webhooks()) == 2
    for hook in webhooks():
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"], ref["port"], ref["path"]) == (
            service["metadata"]["name"], service["metadata"]["namespace"], 443, admission.INJECT_PATH,
        )  # fmt: skip
        assert hook["rules"] == [
            {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
             "scope": "Namespaced"}
        ]  # fmt: skip
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] == "Fail"
        assert hook["reinvocationPolicy"] == "Never"
        assert 1 <= hook["timeoutSeconds"] <= 30


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector, as the API server evaluates one (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


@pytest.mark.parametrize(
    ("namespace", "namespace_label", "pod_label", "selected"),
    [
        ("shop", "enabled", None, True),  # the namespace asks for the mesh
        ("shop", "enabled", "true", True),
        ("shop", "enabled", "false", False),  # a pod opts out
        ("shop", None, None, False),  # nobody asked
        ("shop", None, "true", True),  # a pod asks in a namespace that did not
        ("shop", None, "false", False),
        ("shop", "disabled", "true", False),  # the namespace's no beats the pod's yes
        ("shop", "disabled", None, False),
        ("kube-system", "enabled", "true", False),
        ("kube-system", None, "true", False),
        ("mtlsmesh-system", "enabled", None, False),
        ("mtlsmesh-system", None, "true", False),
    ],
)
def test_the_selectors_pick_exactly_the_pods_deploy_readme_promises(
    namespace: str, namespace_label: str | None, pod_label: str | None, selected: bool
) -> None:
    namespace_labels = {"kubernetes.io/metadata.name": namespace}  # set by the API server on every namespace
    if namespace_label is not None:
        namespace_labels["mtlsmesh.io/injection"] = namespace_label
    pod_labels = {"app": "web"} if pod_label is None else {"app": "web", "mtlsmesh.io/inject": pod_label}
    calls = [
        hook["name"]
        for hook in webhooks()
        if _matches(hook["namespaceSelector"], namespace_labels) and _matches(hook["objectSelector"], pod_labels)
    ]
    assert len(calls) == (1 if selected else 0), calls  # never twice: the two webhooks are disjoint


def test_the_committed_ca_bundle_is_an_empty_placeholder() -> None:
    assert [hook["clientConfig"]["caBundle"] for hook in webhooks()] == ["", ""]


def test_the_documented_ca_bundle_command_fills_in_a_valid_configuration(tmp_path: Path) -> None:
    text = (WEBHOOK_DIR / "mutatingwebhook.yaml").read_text()
    (command,) = re.findall(r"^#   (sed -i .*)$", text, re.MULTILINE)
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert command in readme, "deploy/README.md gives another caBundle command than mutatingwebhook.yaml"
    mtlsmesh("ca", "init", "--dir", str(tmp_path / "mesh-ca"), cwd=tmp_path)
    (tmp_path / "deploy" / "webhook").mkdir(parents=True)
    target = tmp_path / "deploy" / "webhook" / "mutatingwebhook.yaml"
    target.write_text(text)
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=30)
    (filled,) = load_documents(target)
    validate(filled, "mutatingwebhook.yaml after the caBundle command")
    bundle = (tmp_path / "mesh-ca" / "bundle.pem").read_bytes()
    assert [base64.b64decode(h["clientConfig"]["caBundle"], validate=True) for h in filled["webhooks"]] == [bundle] * 2
    # Nothing else changed, the comments included (the command is still there to run again after a rotation).
    assert target.read_text().count("caBundle: ") == text.count("caBundle: ")
    assert command in target.read_text()
    for hook in filled["webhooks"]:
        hook["clientConfig"]["caBundle"] = ""
    assert filled == objects()["MutatingWebhookConfiguration"]

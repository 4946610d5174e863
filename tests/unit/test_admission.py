"""The admission decision, pure: AdmissionReview bodies in, answers out, no server.

For every workload kind the webhook sees as a Pod (a bare Pod; the pods the Deployment, StatefulSet, DaemonSet,
Job, CronJob and ReplicaSet controllers create from the golden templates), the answer is `allowed: true` with a
JSONPatch that, applied with jsonpatch, gives exactly what `mtlsmesh inject` makes of that pod, and the result
validates against the Kubernetes schemas. Then every other decision: skipped, denied (with the message kubectl
shows), rejected before any review (with the HTTP status), and the log fields of each.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from mtlsmesh import admission
from mtlsmesh.admission import Decision, Reason, answer, review
from mtlsmesh.annotations import STATUS_ANNOTATION
from mtlsmesh.inject import InjectOptions, inject_text
from mtlsmesh.manifest import parse_manifests, render_manifests
from tests.admission_reviews import admission_review, controller_pod, patched, template_of
from tests.unit.test_manifests import check_pod_spec, validate

GOLDEN = Path(__file__).resolve().parent / "golden" / "inject"
KINDS = ["pod", "deployment", "statefulset", "daemonset", "job", "cronjob", "replicaset"]
OPTIONS = InjectOptions()


def golden_pod(case: str) -> dict[str, Any]:
    (workload,) = parse_manifests((GOLDEN / f"{case}.yaml").read_text(), case)
    assert isinstance(workload, dict)
    return controller_pod(workload)


def cli_injected(pod: dict[str, Any], options: InjectOptions = OPTIONS) -> dict[str, Any]:
    """What `mtlsmesh inject -f pod.yaml` prints for this pod, read back."""
    (out,) = parse_manifests(inject_text(render_manifests([pod]), source="pod.yaml", options=options).text, "out")
    assert isinstance(out, dict)
    return out


def decide(body: dict[str, Any] | bytes, options: InjectOptions = OPTIONS) -> admission.Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return answer("POST", "/inject", "application/json", data, options)


def response_of(result: admission.Answer) -> dict[str, Any]:
    assert (result.status, result.content_type) == (200, "application/json")
    document = json.loads(result.body)
    assert (document["apiVersion"], document["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert set(document) == {"apiVersion", "kind", "response"}
    response: dict[str, Any] = document["response"]
    return response


def shop_pod(**spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "image": "example/app:1"}], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "app-7d9f-", "namespace": "shop"},
            "spec": pod_spec}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Injection: the patch gives the CLI's pod


@pytest.mark.parametrize("case", KINDS)
def test_the_patch_makes_the_pod_the_cli_makes(case: str) -> None:
    pod = golden_pod(case)
    body = admission_review(pod, namespace=pod["metadata"]["namespace"], uid=f"uid-{case}")
    result = decide(body)
    response = response_of(result)
    assert response["uid"] == f"uid-{case}"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    after = patched({"response": response}, pod)
    assert after == cli_injected(pod)
    assert render_manifests([after]) == inject_text(render_manifests([pod]), source="pod.yaml").text  # key order too
    assert (result.decision, result.reason) == (Decision.INJECT, Reason.INJECTED)


@pytest.mark.parametrize("case", KINDS)
def test_the_patched_pod_validates_against_the_kubernetes_schema(case: str) -> None:
    pod = golden_pod(case)
    after = patched({"response": response_of(decide(admission_review(pod)))}, pod)
    validate(after, f"webhook-patched {case} pod")
    check_pod_spec(after["spec"], f"webhook-patched {case} pod")
    validate(pod, f"{case} pod as sent")  # the review's object itself is a valid Pod: the test's input is sound


@pytest.mark.parametrize("case", [k for k in KINDS if k != "pod"])
def test_webhook_pods_match_the_pods_of_cli_injected_workloads(case: str) -> None:
    """The GitOps path (inject the workload, its controller makes pods) and the webhook path (the controller makes
    a plain pod, the webhook injects it) give the same pod. Only the status annotation's record of the keys
    injection created may differ: a template without metadata (the Job) has it created, its pods do not."""
    (workload,) = parse_manifests((GOLDEN / f"{case}.yaml").read_text(), case)
    (injected_workload,) = parse_manifests((GOLDEN / f"{case}.injected.yaml").read_text(), case)
    assert isinstance(workload, dict) and isinstance(injected_workload, dict)
    raw_pod = _undefaulted(controller_pod(workload), workload)
    via_webhook = patched({"response": response_of(decide(admission_review(raw_pod)))}, raw_pod)
    via_cli = _undefaulted(controller_pod(injected_workload), injected_workload)
    # The controller labels hash the template, which injection changed: compare the rest.
    for pod in (via_webhook, via_cli):
        for label in ("pod-template-hash", "controller-revision-hash"):
            pod["metadata"]["labels"].pop(label, None)
        pod["metadata"]["ownerReferences"] = []
        pod["metadata"].pop("generateName", None)
    status = [json.loads(p["metadata"]["annotations"].pop(STATUS_ANNOTATION)) for p in (via_webhook, via_cli)]
    assert via_webhook == via_cli
    for entry in status:
        entry.pop("created", None)
    assert status[0] == status[1]


def _undefaulted(pod: dict[str, Any], workload: dict[str, Any]) -> dict[str, Any]:
    """The controller's pod without the API server's defaults: the workload's own pod template, made a pod."""
    spec = copy.deepcopy(template_of(workload)["spec"])
    if workload["kind"] == "StatefulSet":
        spec.update({k: pod["spec"][k] for k in ("hostname", "subdomain") if k in pod["spec"]})
        claims = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        spec["volumes"] = claims + (spec.get("volumes") or [])
    return {**pod, "spec": spec}


def test_the_patch_is_a_small_diff_not_a_replacement() -> None:
    pod = golden_pod("pod")
    operations = json.loads(base64.b64decode(response_of(decide(admission_review(pod)))["patch"]))
    # The pod has init containers, volumes and no annotations: two containers go in front, five volumes (the
    # token, the bundle, the config, the init step's /run, the admin token's directory) at the end, and the
    # annotations are added. Nothing the app wrote is replaced.
    assert {op["op"] for op in operations} == {"add"}
    assert sorted(op["path"] for op in operations) == [
        "/metadata/annotations",
        "/spec/initContainers/0",
        "/spec/initContainers/1",
        "/spec/volumes/2",
        "/spec/volumes/3",
        "/spec/volumes/4",
        "/spec/volumes/5",
        "/spec/volumes/6",
    ]


def test_the_annotation_key_is_escaped_in_the_pointer() -> None:
    pod = shop_pod()
    pod["metadata"]["annotations"] = {"team": "shop"}
    operations = json.loads(base64.b64decode(response_of(decide(admission_review(pod, namespace="shop")))["patch"]))
    assert {"op": "add", "path": "/metadata/annotations/mtlsmesh.io~1status"} in [
        {k: v for k, v in op.items() if k != "value"} for op in operations
    ]


def test_the_same_annotations_take_effect_and_the_image_option_applies() -> None:
    pod = shop_pod()
    pod["metadata"]["annotations"] = {
        "mtlsmesh.io/inbound-mode": "permissive",
        "mtlsmesh.io/exclude-inbound-ports": "9090",
    }
    options = InjectOptions(image="registry.example/mtlsmesh:9")
    after = patched({"response": response_of(decide(admission_review(pod, namespace="shop"), options))}, pod)
    (init, proxy) = after["spec"]["initContainers"][:2]
    assert {init["image"], proxy["image"]} == {"registry.example/mtlsmesh:9"}
    assert {"name": "MTLSMESH_EXCLUDE_INBOUND_PORTS", "value": "9090"} in init["env"]
    assert proxy["env"] == [{"name": "MTLSMESH_INBOUND_MODE", "value": "permissive"}]
    (expected,) = parse_manifests(inject_text(render_manifests([pod]), source="p", options=options).text, "e")
    assert after == expected


def test_probe_warnings_reach_kubectl_as_admission_warnings() -> None:
    pod = shop_pod(containers=[{"name": "app", "image": "a", "ports": [{"containerPort": 8080}],
                                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}])  # fmt: skip
    response = response_of(decide(admission_review(pod, namespace="shop")))
    assert response["allowed"] is True and "patch" in response
    (warning,) = response["warnings"]
    assert "readinessProbe reaches port 8080 in plaintext from the kubelet" in warning
    assert "\n" not in warning


def test_a_dry_run_is_injected_like_any_other_create() -> None:
    pod = shop_pod()
    body = admission_review(pod, namespace="shop")
    body["request"]["dryRun"] = True  # the webhook has no side effects (sideEffects: None), so nothing differs
    assert patched({"response": response_of(decide(body))}, pod) == cli_injected(pod)


# ---------------------------------------------------------------------------------------------------------------
# Skipped: allowed, no patch


def test_an_injected_pod_is_skipped_so_a_reinvocation_changes_nothing() -> None:
    pod = golden_pod("deployment")
    once = patched({"response": response_of(decide(admission_review(pod)))}, pod)
    result = decide(admission_review(once, uid="again"))
    assert response_of(result) == {"uid": "again", "allowed": True}
    assert (result.decision, result.reason) == (Decision.SKIP, Reason.ALREADY_INJECTED)


def test_a_pod_from_a_cli_injected_workload_is_left_as_the_cli_made_it() -> None:
    (workload,) = parse_manifests((GOLDEN / "deployment.injected.yaml").read_text(), "d")
    assert isinstance(workload, dict)
    result = decide(admission_review(controller_pod(workload), uid="gitops"))
    assert response_of(result) == {"uid": "gitops", "allowed": True}
    assert result.reason is Reason.ALREADY_INJECTED


def test_an_opted_out_pod_is_skipped() -> None:
    pod = shop_pod()
    pod["metadata"]["annotations"] = {"mtlsmesh.io/inject": "false"}
    result = decide(admission_review(pod, namespace="shop", uid="u1"))
    assert response_of(result) == {"uid": "u1", "allowed": True}
    assert (result.decision, result.reason, result.pod) == (Decision.SKIP, Reason.OPTED_OUT, "shop/app-7d9f-*")


def test_a_host_network_pod_is_skipped_with_the_injectors_warning() -> None:
    result = decide(admission_review(shop_pod(hostNetwork=True), namespace="shop", uid="u2"))
    response = response_of(result)
    assert (response["uid"], response["allowed"], "patch" in response) == ("u2", True, False)
    assert "hostNetwork pods share the node's network" in response["warnings"][0]
    assert (result.decision, result.reason) == (Decision.SKIP, Reason.HOST_NETWORK)


@pytest.mark.parametrize(
    ("changes", "described"),
    [
        ({"operation": "UPDATE"}, "core/v1 pods UPDATE"),
        ({"operation": "DELETE"}, "core/v1 pods DELETE"),
        ({"operation": "CONNECT", "sub_resource": "exec"}, "core/v1 pods/exec CONNECT"),
        ({"sub_resource": "ephemeralcontainers", "operation": "UPDATE"}, "core/v1 pods/ephemeralcontainers UPDATE"),
        ({"sub_resource": "binding"}, "core/v1 pods/binding CREATE"),
        ({"resource": ("apps", "v1", "deployments"), "kind": ("apps", "v1", "Deployment")},
         "apps/v1 deployments CREATE"),
        ({"resource": ("", "v1", "configmaps"), "kind": ("", "v1", "ConfigMap")}, "core/v1 configmaps CREATE"),
    ],
)  # fmt: skip
def test_anything_but_a_pod_create_is_allowed_untouched(changes: dict[str, Any], described: str) -> None:
    # Another resource or operation means the webhook configuration's rules are wider than they should be. Blocking
    # it (a 4xx, or allowed: false) would, with failurePolicy: Fail, break what the webhook was never meant to see.
    result = decide(admission_review(shop_pod(), namespace="shop", uid="other", **changes))
    assert response_of(result) == {"uid": "other", "allowed": True}
    assert (result.decision, result.reason) == (Decision.SKIP, Reason.NOT_POD_CREATE)
    assert result.detail == f"{described}: not a Pod CREATE, left alone"


# ---------------------------------------------------------------------------------------------------------------
# Denied: allowed false, the message kubectl shows


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"securityContext": {"runAsUser": 1337}}, "the pod's securityContext runs as uid 1337, the proxy's uid"),
        ({"containers": [{"name": "app", "image": "a", "securityContext": {"runAsUser": 1337}}]},
         "container 'app' runs as uid 1337, the proxy's uid"),
        ({"initContainers": [{"name": "setup", "image": "a", "securityContext": {"runAsUser": 1337}}]},
         "container 'setup' runs as uid 1337"),
        ({"securityContext": {"runAsGroup": 1337}}, "the pod's securityContext runs as gid 1337, the proxy's gid"),
        ({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 15006}]}]},
         "container 'app' declares port 15006, which the proxy binds"),
    ],
)  # fmt: skip
def test_a_pod_the_injector_refuses_is_denied_with_its_message(spec: dict[str, Any], message: str) -> None:
    result = decide(admission_review(shop_pod(**spec), namespace="shop", uid="deny-me"))
    response = response_of(result)
    assert (response["uid"], response["allowed"]) == ("deny-me", False)
    assert response["status"]["code"] == 403
    assert response["status"]["message"].startswith(f"mtlsmesh cannot inject pod shop/app-7d9f-*: {message}")
    assert "patch" not in response
    assert (result.decision, result.reason, result.uid) == (Decision.DENY, Reason.REFUSED, "deny-me")
    assert result.detail == response["status"]["message"]


def test_a_bad_annotation_is_denied_naming_it() -> None:
    pod = shop_pod()
    pod["metadata"]["annotations"] = {"mtlsmesh.io/inbound-mode": "on"}
    response = response_of(decide(admission_review(pod, namespace="shop")))
    assert response["allowed"] is False
    assert (
        "annotation mtlsmesh.io/inbound-mode: expected one of strict, permissive, disable"
        in response["status"]["message"]
    )


@pytest.mark.parametrize(
    "obj",
    [None, "a pod", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}, {"kind": "Pod", "spec": {}}],
)
def test_a_pod_create_whose_object_is_not_a_pod_is_denied(obj: object) -> None:
    body = admission_review(shop_pod(), namespace="shop", uid="odd")
    body["request"]["object"] = obj
    result = decide(body)
    response = response_of(result)
    assert (response["uid"], response["allowed"]) == ("odd", False)
    assert response["status"] == {"code": 403, "message": "request.object is not a v1 Pod"}
    assert result.reason is Reason.NOT_A_POD


# ---------------------------------------------------------------------------------------------------------------
# Rejected before any review: 4xx, a line of text


def _deep(levels: int) -> bytes:
    return (
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "x": ' + b"[" * levels + b"]" * levels + b"}"
    )


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        (b"", Reason.MALFORMED, "the body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"{not json", Reason.MALFORMED, "the body is not JSON: Expecting property name enclosed in double quotes"),
        (b"\xff\xfe\x00", Reason.MALFORMED, "the body is not JSON"),
        (b'{"a": NaN}', Reason.MALFORMED, "the body is not JSON: NaN is not JSON"),
        (b"[1, 2]", Reason.MALFORMED, "the body is not a JSON object"),
        (_deep(70), Reason.MALFORMED, "the body is nested deeper than 64 levels"),
        (_deep(100_000), Reason.MALFORMED, "the body is not JSON: maximum recursion depth exceeded"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}}',
         Reason.WRONG_KIND, "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion "
         "'admission.k8s.io/v1beta1' kind 'AdmissionReview' (the webhook configuration must say "
         'admissionReviewVersions: ["v1"])'),
        (json.dumps({"request": admission_review(shop_pod())["request"]}).encode(), Reason.WRONG_KIND,
         "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion None kind None"),
        (b'{"apiVersion": "v1", "kind": "Pod"}', Reason.WRONG_KIND,
         "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion 'v1' kind 'Pod'"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', Reason.MALFORMED,
         "the AdmissionReview has no request object"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"operation": "CREATE"}}',
         Reason.NO_UID, "the AdmissionReview's request has no uid to answer to"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}',
         Reason.NO_UID, "the AdmissionReview's request has no uid to answer to"),
    ],
)  # fmt: skip
def test_a_body_no_api_server_sends_is_a_400(body: bytes, reason: Reason, message: str) -> None:
    result = decide(body)
    assert (result.status, result.content_type, result.decision, result.reason) == (
        400,
        "text/plain",
        Decision.REJECT,
        reason,
    )
    assert result.body.decode().startswith(message)
    assert result.body.count(b"\n") == 1 and result.body.endswith(b"\n")
    assert result.detail.startswith(message)
    assert result.uid == "-"


@pytest.mark.parametrize(
    ("method", "path", "content_type", "status", "reason", "message"),
    [
        ("POST", "/mutate", "application/json", 404, Reason.NOT_FOUND,
         "no such path '/mutate': reviews go to POST /inject"),
        ("POST", "/", "application/json", 404, Reason.NOT_FOUND, "no such path '/'"),
        ("GET", "/inject", None, 405, Reason.METHOD_NOT_ALLOWED, "/inject takes POST, not GET"),
        ("PUT", "/inject", "application/json", 405, Reason.METHOD_NOT_ALLOWED, "/inject takes POST, not PUT"),
        ("POST", "/healthz", "application/json", 405, Reason.METHOD_NOT_ALLOWED, "/healthz answers GET"),
        ("HEAD", "/healthz", None, 405, Reason.METHOD_NOT_ALLOWED, "/healthz answers GET"),
        ("POST", "/inject", None, 415, Reason.UNSUPPORTED_MEDIA_TYPE,
         "expected Content-Type: application/json, got none"),
        ("POST", "/inject", "text/yaml", 415, Reason.UNSUPPORTED_MEDIA_TYPE,
         "expected Content-Type: application/json, got text/yaml"),
    ],
)  # fmt: skip
def test_a_wrong_path_method_or_content_type_is_a_4xx(
    method: str, path: str, content_type: str | None, status: int, reason: Reason, message: str
) -> None:
    body = json.dumps(admission_review(shop_pod())).encode()
    result = answer(method, path, content_type, body, OPTIONS)
    assert (result.status, result.decision, result.reason) == (status, Decision.REJECT, reason)
    assert result.body.decode().startswith(message)
    if status == 405:
        assert dict(result.headers)["allow"] in ("POST", "GET")


def test_the_content_type_may_carry_a_charset() -> None:
    body = json.dumps(admission_review(shop_pod(), uid="cs")).encode()
    result = answer("POST", "/inject", "Application/JSON; charset=utf-8", body, OPTIONS)
    assert response_of(result)["uid"] == "cs"


def test_the_health_path_answers_and_is_not_a_review() -> None:
    result = answer("GET", "/healthz", None, b"", OPTIONS)
    assert (result.status, result.body, result.decision) == (200, b"ok\n", None)


@pytest.mark.parametrize(
    ("status", "reason"),
    [(413, Reason.TOO_LARGE), (431, Reason.HEADER_TOO_LARGE), (408, Reason.TIMEOUT), (400, Reason.BAD_HTTP)],
)
def test_the_http_layers_refusals_get_a_reason_each(status: int, reason: Reason) -> None:
    result = admission.refusal(status, "the body is larger than 3145728 bytes")
    assert (result.status, result.decision, result.reason) == (status, Decision.REJECT, reason)
    assert result.body == b"the body is larger than 3145728 bytes\n"


# ---------------------------------------------------------------------------------------------------------------
# The patch's self-check, and the log fields


def test_a_diff_that_disagrees_with_the_injector_falls_back_to_whole_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = golden_pod("deployment")
    wrong = jsonpatch.JsonPatch([{"op": "add", "path": "/metadata/labels/broken", "value": "yes"}])
    monkeypatch.setattr(admission.jsonpatch, "make_patch", lambda _a, _b: wrong)
    response = response_of(decide(admission_review(pod)))
    operations = json.loads(base64.b64decode(response["patch"]))
    assert [(op["op"], op["path"]) for op in operations] == [("replace", "/metadata"), ("replace", "/spec")]
    assert patched({"response": response}, pod) == cli_injected(pod)


def test_the_whole_parts_patch_adds_what_the_pod_lacks() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}
    injected = {**pod, "metadata": {"annotations": {"a": "b"}}}
    operations = admission.whole_parts_patch(pod, injected)
    assert operations == [{"op": "add", "path": "/metadata", "value": {"annotations": {"a": "b"}}}]
    assert jsonpatch.apply_patch(pod, operations) == injected


def test_the_log_fields_name_uid_pod_decision_reason_and_detail() -> None:
    pod = golden_pod("job")
    result = decide(admission_review(pod, namespace="default", uid="job-uid"))
    fields = result.log_fields()
    assert list(fields) == ["uid", "pod", "decision", "reason", "detail"]
    assert fields["uid"] == "job-uid"
    assert str(fields["pod"]).startswith("default/migrate-") and str(fields["pod"]).endswith("-*")
    assert (fields["decision"], fields["reason"]) == ("inject", "injected")
    assert fields["detail"] == f"{len(json.loads(base64.b64decode(response_of(result)['patch'])))} patch operations"


def test_a_named_pod_is_logged_by_its_name() -> None:
    result = decide(admission_review(golden_pod("statefulset"), namespace="data"))
    assert result.pod == "data/db-0"


def test_review_is_what_answer_calls_for_a_post_to_inject() -> None:
    body = json.dumps(admission_review(shop_pod(), uid="same")).encode()
    assert review(body, OPTIONS) == answer("POST", "/inject", "application/json", body, OPTIONS)

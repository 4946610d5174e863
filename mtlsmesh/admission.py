"""The admission webhook's decisions: an HTTP request in, the answer and its one log line out, with no I/O.

What it does: `answer` routes one request (`POST /inject`, `GET /healthz`) and, for an `admission.k8s.io/v1`
`AdmissionReview` of a Pod CREATE, decides with `review`:

- inject: `allowed: true` and a base64 `JSONPatch` that turns the pod into exactly what `mtlsmesh inject` makes of
  it. The patch is computed, not written: the pod goes through `inject.inject_documents` (the CLI's code path, the
  same annotations) and jsonpatch takes the difference between the pod and the result. The patch is checked by
  applying it before it is sent; should the diff ever disagree with the injector, the answer replaces the pod's
  `metadata` and `spec` whole instead (still a JSON Patch, still exactly the injector's pod).
- skip (`allowed: true`, no patch): a pod already injected (it carries `mtlsmesh.io/status`: injected by the CLI,
  or a reinvocation), opted out (`mtlsmesh.io/inject: "false"`), on the host network; and any request that is not
  a Pod CREATE (another resource, a subresource, another operation), which the webhook's rules should never have
  sent and which is not this webhook's to block.
- deny (`allowed: false`, `status.code` 403 and a `status.message` kubectl shows): a pod the injector refuses (it
  runs as the proxy's uid or gid 1337, uses a name or port of ours, has a bad `mtlsmesh.io/*` annotation), and a
  review whose object is not a v1 Pod.
- reject (HTTP 4xx, no AdmissionReview): a body the API server never sends, one that is not JSON, nested deeper
  than `MAX_DEPTH`, not an `admission.k8s.io/v1` `AdmissionReview`, or without a request uid to answer to; a wrong
  path (404), method (405) or content type (415). The API server counts any answer but 200 as the webhook failing.

Every AdmissionReview answer echoes the request's uid. The log line (`Answer.log_fields`) names the uid, the pod
(`namespace/name`, or `namespace/generateName*` for a pod a controller creates), the decision, one reason from a
closed set and, when there is more to say, a detail for people.

What it does not: sockets, TLS, HTTP parsing or the size limits (see `webhook` and `http11`), or reading anything
the review does not carry (no API calls: namespace labels are the webhook configuration's selectors' business).
"""

from __future__ import annotations

import base64
import copy
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from mtlsmesh.annotations import STATUS_ANNOTATION
from mtlsmesh.errors import ConfigError
from mtlsmesh.inject import SKIP_HOST_NETWORK, SKIP_OPTED_OUT, InjectOptions, inject_documents

ADMISSION_API_VERSION = "admission.k8s.io/v1"
INJECT_PATH = "/inject"
HEALTH_PATH = "/healthz"
JSON = "application/json"
TEXT = "text/plain"
# Far deeper than any Pod (its deepest fields sit about ten levels down), far shallower than what would make the
# parser, the deep copy or the diff run out of Python's recursion limit.
MAX_DEPTH = 64
DENIED_CODE = 403  # what the API server reports for a denied admission when the webhook names no other code

# A pod as the API server asks about it: group "" (core), version v1.
_POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
_POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}

JsonDict = dict[str, Any]


class Decision(enum.StrEnum):
    INJECT = "inject"
    SKIP = "skip"
    DENY = "deny"
    REJECT = "reject"


class Reason(enum.StrEnum):
    """Why, in one word of a closed set (the log's `reason`); the free text goes in the detail."""

    INJECTED = "injected"
    ALREADY_INJECTED = "already_injected"
    OPTED_OUT = "opted_out"
    HOST_NETWORK = "host_network"
    NOT_POD_CREATE = "not_pod_create"
    REFUSED = "refused"  # the injector refused the pod
    NOT_A_POD = "not_a_pod"
    MALFORMED = "malformed"  # not JSON, too deep, not an object
    WRONG_KIND = "wrong_kind"  # not an admission.k8s.io/v1 AdmissionReview
    NO_UID = "no_uid"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # Refused by the HTTP layer before a request was whole (see `refusal`).
    TOO_LARGE = "too_large"
    HEADER_TOO_LARGE = "header_too_large"
    TIMEOUT = "timeout"
    BAD_HTTP = "bad_http"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Answer:
    """What to send back and what to log about it."""

    status: int  # HTTP status
    body: bytes
    content_type: str
    decision: Decision | None  # None: not a review (the health path), nothing to log
    reason: Reason | None
    uid: str = "-"
    pod: str = "-"
    detail: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def log_fields(self) -> dict[str, object]:
        """The log line's fields, in order; the detail only when there is one."""
        fields: dict[str, object] = {"uid": self.uid, "pod": self.pod, "decision": self.decision}
        fields["reason"] = self.reason
        if self.detail:
            fields["detail"] = self.detail
        return fields


def answer(method: str, path: str, content_type: str | None, body: bytes, options: InjectOptions) -> Answer:
    """The answer to one HTTP request to the webhook. Pure: the same request always gets the same answer."""
    if path == HEALTH_PATH:
        if method != "GET":  # the kubelet's probes GET; HEAD would need an answer without the body
            return _reject(405, Reason.METHOD_NOT_ALLOWED, f"{path} answers GET", (("allow", "GET"),))
        return Answer(200, b"ok\n", TEXT, None, None)
    if path != INJECT_PATH:
        return _reject(404, Reason.NOT_FOUND, f"no such path {path!r}: reviews go to POST {INJECT_PATH}")
    if method != "POST":
        return _reject(405, Reason.METHOD_NOT_ALLOWED, f"{INJECT_PATH} takes POST, not {method}", (("allow", "POST"),))
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != JSON:
        shown = content_type if content_type else "none"
        return _reject(415, Reason.UNSUPPORTED_MEDIA_TYPE, f"expected Content-Type: {JSON}, got {shown}")
    return review(body, options)


def refusal(status: int, message: str) -> Answer:
    """The answer for a request the HTTP layer refused before it was whole (too large, too slow, not HTTP)."""
    reason = {413: Reason.TOO_LARGE, 431: Reason.HEADER_TOO_LARGE, 408: Reason.TIMEOUT}.get(status, Reason.BAD_HTTP)
    return _reject(status, reason, message)


def internal_error(detail: str) -> Answer:
    """The answer when the review itself failed (a bug): 500, which the API server treats per failurePolicy."""
    return _reject(500, Reason.INTERNAL_ERROR, detail)


def _reject(status: int, reason: Reason, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, f"{message}\n".encode(), TEXT, Decision.REJECT, reason, detail=message, headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# The review


def review(body: bytes, options: InjectOptions) -> Answer:
    """Decide on one AdmissionReview body (see the module docstring for what each decision means)."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return _reject(400, Reason.MALFORMED, f"the body is not JSON: {_one_line(exc)}")
    if _deeper_than(document, MAX_DEPTH):
        return _reject(400, Reason.MALFORMED, f"the body is nested deeper than {MAX_DEPTH} levels")
    if not isinstance(document, dict):
        return _reject(400, Reason.MALFORMED, "the body is not a JSON object")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if (api_version, kind) != (ADMISSION_API_VERSION, "AdmissionReview"):
        return _reject(
            400,
            Reason.WRONG_KIND,
            f"expected an {ADMISSION_API_VERSION} AdmissionReview, got apiVersion {api_version!r} kind {kind!r} "
            '(the webhook configuration must say admissionReviewVersions: ["v1"])',
        )
    request = document.get("request")
    if not isinstance(request, dict):
        return _reject(400, Reason.MALFORMED, "the AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return _reject(400, Reason.NO_UID, "the AdmissionReview's request has no uid to answer to")
    return _review_request(request, uid, options)


def _review_request(request: JsonDict, uid: str, options: InjectOptions) -> Answer:
    namespace = request.get("namespace") if isinstance(request.get("namespace"), str) else ""
    pod = request.get("object")
    label = _pod_label(str(namespace), pod, request)
    what = _describe(request)
    if what != "Pod CREATE":
        return _allowed(uid, label, Decision.SKIP, Reason.NOT_POD_CREATE, f"{what}: not a Pod CREATE, left alone")
    if not (isinstance(pod, dict) and pod.get("apiVersion") == "v1" and pod.get("kind") == "Pod"):
        return _denied(uid, label, Reason.NOT_A_POD, "request.object is not a v1 Pod")
    metadata = pod.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if isinstance(annotations, dict) and STATUS_ANNOTATION in annotations:
        return _allowed(uid, label, Decision.SKIP, Reason.ALREADY_INJECTED, f"the pod carries {STATUS_ANNOTATION}")
    try:
        result = inject_documents([pod], source=f"pod {label}", options=options)
    except ConfigError as exc:
        return _denied(uid, label, Reason.REFUSED, f"mtlsmesh cannot inject pod {label}: {exc.message}")
    warnings = tuple(_one_line(w) for w in result.warnings)
    if not result.injected:
        skip_reasons = {SKIP_OPTED_OUT: Reason.OPTED_OUT, SKIP_HOST_NETWORK: Reason.HOST_NETWORK}
        reason = skip_reasons[result.skipped[0][1]]
        return _allowed(uid, label, Decision.SKIP, reason, "; ".join(warnings), warnings=warnings)
    (injected,) = result.documents
    assert isinstance(injected, dict)
    patch = pod_patch(pod, injected)
    return _allowed(
        uid, label, Decision.INJECT, Reason.INJECTED, f"{len(patch)} patch operations", patch=patch, warnings=warnings
    )


def pod_patch(pod: JsonDict, injected: JsonDict) -> list[JsonDict]:
    """The JSON Patch from `pod` to `injected`, checked by applying it; the whole-part fallback if the check fails."""
    operations: list[JsonDict] = jsonpatch.make_patch(pod, injected).patch
    if _applies_to(pod, operations, injected):
        return operations
    return whole_parts_patch(pod, injected)


def whole_parts_patch(pod: JsonDict, injected: JsonDict) -> list[JsonDict]:
    """A patch that sets each top-level part that differs (`metadata`, `spec`) to the injected one whole."""
    return [
        {"op": "replace" if key in pod else "add", "path": f"/{key}", "value": copy.deepcopy(value)}
        for key, value in injected.items()
        if pod.get(key, _MISSING) != value
    ]


_MISSING = object()


def _applies_to(pod: JsonDict, operations: list[JsonDict], expected: JsonDict) -> bool:
    try:
        return bool(jsonpatch.apply_patch(pod, operations) == expected)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        return False


def _allowed(
    uid: str,
    pod: str,
    decision: Decision,
    reason: Reason,
    detail: str,
    *,
    patch: list[JsonDict] | None = None,
    warnings: tuple[str, ...] = (),
) -> Answer:
    response: JsonDict = {"uid": uid, "allowed": True}
    if patch:
        text = json.dumps(patch, separators=(",", ":"), ensure_ascii=False).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(text).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    return Answer(200, _review_body(response), JSON, decision, reason, uid, pod, detail)


def _denied(uid: str, pod: str, reason: Reason, message: str) -> Answer:
    response = {"uid": uid, "allowed": False, "status": {"code": DENIED_CODE, "message": message}}
    return Answer(200, _review_body(response), JSON, Decision.DENY, reason, uid, pod, message)


def _review_body(response: JsonDict) -> bytes:
    review_answer = {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}
    return json.dumps(review_answer, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------------------------
# Reading the request


def _describe(request: Mapping[str, object]) -> str:
    """`Pod CREATE` for what we inject; anything else as `group/version resource[/sub] OPERATION` for the log."""
    kind, resource = request.get("kind"), request.get("resource")
    operation, sub = request.get("operation"), request.get("subResource") or ""
    if kind == _POD_KIND and resource == _POD_RESOURCE and not sub and operation == "CREATE":
        return "Pod CREATE"
    if isinstance(resource, dict):
        group, version = resource.get("group") or "core", resource.get("version", "?")
        name = f"{group}/{version} {resource.get('resource', '?')}{'/' + str(sub) if sub else ''}"
    else:
        name = "an unnamed resource"
    return f"{name} {operation if isinstance(operation, str) else '?'}"


def _pod_label(namespace: str, pod: object, request: Mapping[str, object]) -> str:
    """`namespace/name`, or `namespace/generateName*` for a pod whose name the API server has yet to generate."""
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name") or request.get("name")
    if not (isinstance(name, str) and name):
        generate = metadata.get("generateName")
        name = f"{generate}*" if isinstance(generate, str) and generate else "-"
    namespace = namespace or str(metadata.get("namespace") or "-")
    return f"{namespace}/{name}"


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _deeper_than(root: object, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` deep; iterative, so no depth can break it."""
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def _one_line(value: object) -> str:
    return " ".join(str(value).split())

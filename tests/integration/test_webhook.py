"""The admission webhook served for real: trio on 127.0.0.1:0, TLS 1.3, reviews posted by Python's `ssl` and
`http.client` (in a thread) that verify the webhook's certificate and DNS name against the mesh's bundle, as the
API server does with the `caBundle`.

For each workload kind the webhook sees as a Pod the returned patch, applied with jsonpatch, gives the pod the CLI
makes and validates against the Kubernetes schemas. Every bad request gets its status and message and exactly one
log line, and the next good request is served. The serving certificate reloads: new handshakes get the new one.
Once, the whole thing runs as a real `mtlsmesh webhook` process.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from mtlsmesh import admission, http11
from mtlsmesh.cli import build_parser
from mtlsmesh.cli.webhook import build_settings
from mtlsmesh.config import CredentialFiles, ListenAddr
from mtlsmesh.credentials import CredentialStore
from mtlsmesh.inject import InjectOptions
from mtlsmesh.lab.pods import log_records
from mtlsmesh.webhook import LIMITS, MAX_BODY, WebhookSettings, serve_webhook
from tests.admission_reviews import (
    WEBHOOK_DNS,
    Reply,
    WebhookConnection,
    admission_review,
    client_context,
    post,
    webhook_process,
)
from tests.pki import TD, Pki
from tests.unit.test_admission import KINDS, cli_injected, golden_pod, patched
from tests.unit.test_manifests import check_pod_spec, validate

ROOT = Path(__file__).resolve().parents[2]
IO_TIMEOUT = 10.0


@dataclass
class Served:
    address: tuple[str, int]
    bundle: Path
    files: CredentialFiles
    caplog: pytest.LogCaptureFixture

    async def post(self, body: bytes | dict[str, Any], **kwargs: Any) -> Reply:
        return await trio.to_thread.run_sync(lambda: post(self.address, self.bundle, body, **kwargs))

    def lines(self) -> list[dict[str, str]]:
        """The webhook's review log lines so far, parsed."""
        text = "\n".join(r.getMessage() for r in self.caplog.records if r.name == "mtlsmesh.webhook")
        return [r for r in log_records(text) if "decision" in r]


def webhook_files(pki: Pki) -> CredentialFiles:
    return pki.issue("mtlsmesh-webhook", "mtlsmesh-system", dns_names=[WEBHOOK_DNS])


async def start(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture, **settings: Any
) -> tuple[Served, trio.Event]:
    caplog.set_level("INFO", logger="mtlsmesh")
    files = webhook_files(pki)
    store = CredentialStore.load(files, TD)
    stop = trio.Event()
    config = WebhookSettings(ListenAddr("127.0.0.1", 0), **settings)
    host, port = await nursery.start(
        lambda task_status: serve_webhook(config, store, stop=stop, task_status=task_status)
    )
    return Served((host, port), Path(files.bundle), files, caplog), stop


@pytest.fixture
async def served(nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Served]:
    webhook, stop = await start(nursery, pki, caplog)
    yield webhook
    stop.set()


async def assert_good_request_served(webhook: Served, uid: str = "after") -> None:
    """A well-formed review right after: answered, and logged."""
    pod = golden_pod("pod")
    reply = await webhook.post(admission_review(pod, namespace="shop", uid=uid))
    assert reply.status == 200
    assert reply.json()["response"]["uid"] == uid
    assert patched(reply.json(), pod) == cli_injected(pod)
    assert webhook.lines()[-1]["uid"] == uid


# ---------------------------------------------------------------------------------------------------------------
# Reviews


@pytest.mark.parametrize("case", KINDS)
async def test_every_kind_gets_the_pod_the_cli_makes(served: Served, case: str) -> None:
    pod = golden_pod(case)
    namespace = pod["metadata"]["namespace"]
    reply = await served.post(admission_review(pod, namespace=namespace, uid=f"uid-{case}"))
    assert (reply.status, reply.content_type) == (200, "application/json")
    review = reply.json()
    assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    response = review["response"]
    assert (response["uid"], response["allowed"], response["patchType"]) == (f"uid-{case}", True, "JSONPatch")
    after = patched(review, pod)
    assert after == cli_injected(pod)
    validate(after, f"webhook-patched {case} pod")
    check_pod_spec(after["spec"], f"webhook-patched {case} pod")
    (line,) = served.lines()
    assert line["uid"] == f"uid-{case}"
    assert line["decision"] == "inject" and line["reason"] == "injected" and line["status"] == "200"
    name = pod["metadata"].get("name") or pod["metadata"]["generateName"] + "*"
    assert line["pod"] == f"{namespace}/{name}"
    assert line["client"].startswith("127.0.0.1:")


async def test_many_reviews_on_one_kept_alive_connection(served: Served) -> None:
    pod = golden_pod("deployment")

    def several() -> list[int]:
        connection = _connection(served)
        try:
            statuses = []
            for index in range(5):
                body = json.dumps(admission_review(pod, uid=f"keep-{index}")).encode()
                connection.request(
                    "POST", "/inject?timeout=10s", body=body, headers={"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                assert json.loads(response.read())["response"]["uid"] == f"keep-{index}"
                statuses.append(response.status)
            return statuses
        finally:
            connection.close()

    assert await trio.to_thread.run_sync(several) == [200] * 5
    assert [line["uid"] for line in served.lines()] == [f"keep-{i}" for i in range(5)]
    assert len({line["client"] for line in served.lines()}) == 1


async def test_a_denial_reaches_the_client_with_its_message(served: Served) -> None:
    pod = golden_pod("pod")
    pod["spec"]["securityContext"] = {"runAsUser": 1337}
    reply = await served.post(admission_review(pod, namespace="shop", uid="deny"))
    assert reply.status == 200
    response = reply.json()["response"]
    assert (response["uid"], response["allowed"], response["status"]["code"]) == ("deny", False, 403)
    assert "runs as uid 1337, the proxy's uid" in response["status"]["message"]
    (line,) = served.lines()
    assert (line["uid"], line["pod"], line["decision"], line["reason"]) == ("deny", "shop/client", "deny", "refused")
    assert "runs as uid 1337" in line["detail"]
    await assert_good_request_served(served)


async def test_skips_and_other_resources_are_allowed_without_a_patch_and_logged(served: Served) -> None:
    pod = golden_pod("pod")
    once = patched((await served.post(admission_review(pod, namespace="shop"))).json(), pod)
    reply = await served.post(admission_review(once, namespace="shop", uid="twice"))
    assert reply.json()["response"] == {"uid": "twice", "allowed": True}
    reply = await served.post(admission_review(pod, namespace="shop", uid="update", operation="UPDATE"))
    assert reply.json()["response"] == {"uid": "update", "allowed": True}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {}}
    other = admission_review(deployment, uid="deploy", resource=("apps", "v1", "deployments"),
                             kind=("apps", "v1", "Deployment"))  # fmt: skip
    reply = await served.post(other)
    assert (reply.status, reply.json()["response"]) == (200, {"uid": "deploy", "allowed": True})
    assert [(line["uid"], line["decision"], line["reason"]) for line in served.lines()[1:]] == [
        ("twice", "skip", "already_injected"),
        ("update", "skip", "not_pod_create"),
        ("deploy", "skip", "not_pod_create"),
    ]
    assert served.lines()[-1]["detail"] == "apps/v1 deployments CREATE: not a Pod CREATE, left alone"
    await assert_good_request_served(served)


async def test_the_health_path_answers_and_is_not_logged(served: Served) -> None:
    reply = await served.post(b"", path="/healthz", method="GET", content_type=None)
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert served.lines() == []


# ---------------------------------------------------------------------------------------------------------------
# Bad requests: each its status, its message, one log line, and the next request is served


@pytest.mark.parametrize(
    ("request_args", "status", "reason", "message"),
    [
        ({"body": b"{not json"}, 400, "malformed", "the body is not JSON"),
        ({"body": b"[" * 200_000 + b"]" * 200_000}, 400, "malformed", "the body is not JSON: maximum recursion"),
        ({"body": {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}},
         400, "wrong_kind",
         "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion 'admission.k8s.io/v1beta1'"),
        ({"body": {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}},
         400, "no_uid", "the AdmissionReview's request has no uid to answer to"),
        ({"body": b"{}", "path": "/mutate"}, 404, "not_found", "no such path '/mutate'"),
        ({"body": b"", "method": "GET", "path": "/inject"}, 405, "method_not_allowed", "/inject takes POST, not GET"),
        ({"body": b"{}", "content_type": "text/plain"}, 415, "unsupported_media_type",
         "expected Content-Type: application/json, got text/plain"),
        ({"body": b"x" * (MAX_BODY + 1)}, 413, "too_large", f"the body is larger than {MAX_BODY} bytes"),
    ],
)  # fmt: skip
async def test_a_bad_request_gets_its_4xx_and_the_next_is_served(
    served: Served, request_args: dict[str, Any], status: int, reason: str, message: str
) -> None:
    reply = await served.post(**request_args)
    assert reply.status == status
    assert reply.content_type == "text/plain"
    assert reply.body.decode().startswith(message)
    (line,) = served.lines()
    assert (line["status"], line["decision"], line["reason"], line["uid"]) == (str(status), "reject", reason, "-")
    assert line["detail"].startswith(message)
    await assert_good_request_served(served)


async def test_a_header_too_large_is_a_431(served: Served) -> None:
    reply = await trio.to_thread.run_sync(
        lambda: _raw_exchange(served, b"POST /inject HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    )
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert reply.endswith(b"request header too large\n")
    (line,) = served.lines()
    assert (line["status"], line["reason"]) == ("431", "header_too_large")
    await assert_good_request_served(served)


async def test_what_is_not_http_is_a_400(served: Served) -> None:
    reply = await trio.to_thread.run_sync(lambda: _raw_exchange(served, b"\x00\x01 not http at all\r\n\r\n"))
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request" in reply
    (line,) = served.lines()
    assert (line["status"], line["decision"], line["reason"]) == ("400", "reject", "bad_http")
    await assert_good_request_served(served)


async def test_a_request_too_slow_is_a_408(nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    limits = http11.Limits(max_head=LIMITS.max_head, max_body=LIMITS.max_body, read_timeout=0.5)
    webhook, stop = await start(nursery, pki, caplog, limits=limits)
    reply = await trio.to_thread.run_sync(
        lambda: _raw_exchange(webhook, b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    )
    assert reply.startswith(b"HTTP/1.1 408 ")
    (line,) = webhook.lines()
    assert (line["status"], line["reason"]) == ("408", "timeout")
    await assert_good_request_served(webhook)
    stop.set()


async def test_a_client_that_is_not_tls_is_dropped_and_others_are_served(served: Served) -> None:
    def plain() -> bytes:
        with socket.create_connection(served.address, timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"POST /inject HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(4096)

    answer = await trio.to_thread.run_sync(plain)
    assert not answer.startswith(b"HTTP/")  # a TLS alert or nothing: never a plaintext answer
    assert any("event=handshake_failed" in r.getMessage() for r in served.caplog.records)
    await assert_good_request_served(served)


async def test_a_client_that_does_not_trust_the_bundle_fails_its_handshake(served: Served, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other_bundle = Path(other.issue("x").bundle)
    with pytest.raises(ssl.SSLCertVerificationError):
        await trio.to_thread.run_sync(lambda: post(served.address, other_bundle, admission_review(golden_pod("pod"))))
    await assert_good_request_served(served)


async def test_a_review_that_raises_is_a_500_and_the_server_goes_on(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> admission.Answer:
        raise RuntimeError("a bug")

    monkeypatch.setattr(admission, "answer", broken)
    reply = await served.post(admission_review(golden_pod("pod")))
    assert (reply.status, reply.body) == (500, b"RuntimeError: a bug\n")
    (line,) = served.lines()
    assert (line["status"], line["reason"]) == ("500", "internal_error")
    monkeypatch.undo()
    await assert_good_request_served(served)


# ---------------------------------------------------------------------------------------------------------------
# The serving certificate reloads


async def test_new_handshakes_get_the_reloaded_certificate(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    webhook, stop = await start(nursery, pki, caplog)
    first = await trio.to_thread.run_sync(lambda: _server_certificate(webhook))
    kept = _connection(webhook)  # opened on the old certificate, kept open across the reload
    await trio.to_thread.run_sync(kept.connect)
    webhook_files(pki)  # a new SVID in the same files, as a Secret update writes it
    with trio.fail_after(IO_TIMEOUT):
        while (second := await trio.to_thread.run_sync(lambda: _server_certificate(webhook))) == first:
            await trio.sleep(0.1)
    assert second.serial_number != first.serial_number
    assert any("event=credentials_reloaded" in r.getMessage() for r in caplog.records)
    await assert_good_request_served(webhook)

    def on_the_kept_connection() -> int:
        body = json.dumps(admission_review(golden_pod("pod"), uid="kept")).encode()
        kept.request("POST", "/inject", body=body, headers={"Content-Type": "application/json"})
        return kept.getresponse().status

    assert await trio.to_thread.run_sync(on_the_kept_connection) == 200
    kept.close()
    stop.set()


def _server_certificate(webhook: Served) -> x509.Certificate:
    with socket.create_connection(webhook.address, timeout=IO_TIMEOUT) as sock:
        context = client_context(webhook.bundle)
        with context.wrap_socket(sock, server_hostname=WEBHOOK_DNS) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "http/1.1"
            return x509.load_der_x509_certificate(der)


def _connection(webhook: Served) -> WebhookConnection:
    return WebhookConnection(webhook.address, context=client_context(webhook.bundle), timeout=IO_TIMEOUT)


def _raw_exchange(webhook: Served, data: bytes) -> bytes:
    """Bytes as they are, over TLS; everything the server sends until it closes."""
    context = client_context(webhook.bundle)
    with (
        socket.create_connection(webhook.address, timeout=IO_TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname=WEBHOOK_DNS) as tls,
    ):
        tls.sendall(data)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        return received


# ---------------------------------------------------------------------------------------------------------------
# As a process: `mtlsmesh webhook`


def test_a_real_mtlsmesh_webhook_process(tmp_path: Path) -> None:
    with webhook_process(tmp_path, "--image", "registry.example/mtlsmesh:7") as webhook:
        options = InjectOptions(image="registry.example/mtlsmesh:7")
        for case in KINDS:
            pod = golden_pod(case)
            review = admission_review(pod, namespace=pod["metadata"]["namespace"], uid=case)
            reply = post(webhook.address, webhook.bundle, review)
            assert reply.status == 200, reply.body
            after = patched(reply.json(), pod)
            assert after == cli_injected(pod, options)
            validate(after, f"{case} pod patched by the webhook process")
        assert post(webhook.address, webhook.bundle, b"{not json").status == 400
        last = post(webhook.address, webhook.bundle, admission_review(golden_pod("pod"), uid="last"))
        assert last.json()["response"]["uid"] == "last"
        records = webhook.stop()
    reviews = [r for r in records if "decision" in r]
    assert [r["uid"] for r in reviews] == [*KINDS, "-", "last"]
    assert [r["decision"] for r in reviews] == ["inject"] * len(KINDS) + ["reject", "inject"]
    assert [r.get("event") for r in records if "event" in r] == ["signal", "draining", "stopped"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--key", "k.pem"], "mtlsmesh: error: --cert: the webhook needs its serving certificate and key"),
        (
            ["--cert", "missing/cert.pem", "--key", "missing/key.pem"],
            "mtlsmesh: error: .*missing/cert.pem: no such file",
        ),
        (["--cert", "c", "--key", "k", "--listen", "nowhere"], "mtlsmesh: error: --listen: expected host:port"),
        (["--cert", "c", "--key", "k", "--image", " "], "mtlsmesh: error: --image: must not be empty"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "webhook", *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2
    assert re.match(message, done.stderr), done.stderr
    assert done.stderr.count("\n") == 1


def test_the_config_file_is_read_and_flags_beat_it(tmp_path: Path) -> None:
    config = tmp_path / "webhook.yaml"
    config.write_text(
        "listen: 127.0.0.1:9443\ncert: /certs/cert.pem\nkey: /certs/key.pem\nimage: a/b:1\n"
        "image_pull_policy: Always\nreload_interval: 5s\n"
    )
    args = build_parser(["webhook"]).parse_args(["webhook", "--config", str(config), "--image", "c/d:2"])
    settings = build_settings(args)
    assert settings.webhook.listen == ListenAddr("127.0.0.1", 9443)
    assert (settings.files.cert, settings.files.bundle, settings.files.reload_interval) == (
        "/certs/cert.pem",
        "/certs/bundle.pem",  # beside the cert, where `mtlsmesh ca issue` and its Secret put it
        5.0,
    )
    assert (settings.webhook.options.image, settings.webhook.options.image_pull_policy) == ("c/d:2", "Always")
    config.write_text("cert: c\nkey: k\nport: 1\n")
    with pytest.raises(Exception, match=r"unknown key 'port'"):
        build_settings(build_parser(["webhook"]).parse_args(["webhook", "--config", str(config)]))

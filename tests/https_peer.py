"""A real HTTPS server for the CA service's outbound calls: Python's own `http.server` with `ssl`, in a thread, on
127.0.0.1, with a server certificate from a CA the test makes in its temp dir.

`HttpsPeer` serves whatever its `answer` callable returns for each request and records every request it saw
(method, path, headers, body), so a test can check what the CA sent as well as what it did with the answer. It can
be stopped and started again on the same port (the server being down, then back). `ApiServer` plays the
Kubernetes API server for namespaced ConfigMaps: it checks the bearer token, the path, the method and the content
type the way the API server would, applies a JSON merge patch to the object it stores, and answers GET from it;
RBAC can be played per namespace (403 to writes there) and a slow API server per namespace (a delay before the
answer, in the handler's own thread, so other requests are not held up).

What this module does not do: anything a test asserts; it is the peer, the tests judge.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerPki:
    ca_file: Path  # what a client trusts
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path, name: str = "peer") -> ServerPki:
        """A root and a server certificate for 127.0.0.1 and localhost, written under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC) - timedelta(minutes=5)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        root = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOOPBACK))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pki = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key")
        pki.ca_file.write_bytes(root.public_bytes(serialization.Encoding.PEM))
        pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pki.key_file.chmod(0o600)
        return pki


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lowercase
    body: bytes


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


Answer = Callable[[Seen], Reply]


@dataclass
class HttpsPeer:
    pki: ServerPki
    answer: Answer
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> HttpsPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                peer.seen.append(seen)
                reply = peer.answer(seen)
                self.send_response(reply.status)
                self.send_header("content-type", reply.content_type)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_PUT = do_PATCH = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki.cert_file, self.pki.key_file)
        server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def url(self, path: str) -> str:
        return f"https://{LOOPBACK}:{self.port}{path}"


def status_reply(code: int, reason: str, message: str) -> Reply:
    """A Kubernetes `Status` object, as the API server answers a failure."""
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
    return Reply(code, json.dumps({**status, "code": code}).encode())


@dataclass
class ApiServer:
    """The API server's part for namespaced ConfigMaps; `namespace`/`name` is the one the arguments default to.
    `forbidden` answers 403 to any write, as RBAC would; `forbidden_in` only to writes in those namespaces; `slow_in`
    delays every answer in those namespaces by that many seconds."""

    token: str
    namespace: str
    name: str
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    forbidden: bool = False
    forbidden_in: set[str] = field(default_factory=set)
    slow_in: dict[str, float] = field(default_factory=dict)
    writes: int = 0
    writes_to: dict[str, int] = field(default_factory=dict)  # "namespace/name": successful writes
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def path(self) -> str:
        return self.path_of(self.namespace, self.name)

    @staticmethod
    def path_of(namespace: str, name: str) -> str:
        return f"/api/v1/namespaces/{namespace}/configmaps/{name}"

    def create(self, data: dict[str, str], namespace: str | None = None, name: str | None = None) -> None:
        namespace, name = namespace or self.namespace, name or self.name
        self.objects[self.path_of(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "data": data,
        }

    def data(self, namespace: str | None = None, name: str | None = None) -> dict[str, str]:
        with self.lock:
            stored = self.objects[self.path_of(namespace or self.namespace, name or self.name)]
            return dict(stored.get("data", {}))

    def __call__(self, seen: Seen) -> Reply:
        if seen.headers.get("authorization") != f"Bearer {self.token}":
            return status_reply(401, "Unauthorized", "Unauthorized")
        parts = seen.path.split("/")  # "", api, v1, namespaces, NS, configmaps, NAME
        if len(parts) != 7 or parts[:4] != ["", "api", "v1", "namespaces"] or parts[5] != "configmaps":
            return status_reply(404, "NotFound", f"{seen.path} is not what this test server serves")
        namespace, name = parts[4], parts[6]
        delay = self.slow_in.get(namespace)
        if delay:
            time.sleep(delay)
        with self.lock:
            stored = self.objects.get(seen.path)
            if stored is None:
                return status_reply(404, "NotFound", f"configmaps {name!r} not found")
            if seen.method == "GET":
                return Reply(200, json.dumps(stored).encode())
            if seen.method != "PATCH":
                return status_reply(405, "MethodNotAllowed", f"{seen.method} is not what this test server takes")
            if self.forbidden or namespace in self.forbidden_in:
                message = (
                    f'configmaps "{name}" is forbidden: User "system:serviceaccount:{self.namespace}:'
                    f'mtlsmesh-ca" cannot patch resource "configmaps" in API group "" in the namespace '
                    f'"{namespace}"'
                )
                return status_reply(403, "Forbidden", message)
            if seen.headers.get("content-type") != "application/merge-patch+json":
                return status_reply(415, "UnsupportedMediaType", f"content type {seen.headers.get('content-type')}")
            patch = json.loads(seen.body)
            data = stored.setdefault("data", {})
            for key, value in patch.get("data", {}).items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
            self.writes += 1
            where = f"{namespace}/{name}"
            self.writes_to[where] = self.writes_to.get(where, 0) + 1
            return Reply(200, json.dumps(stored).encode())

"""HTTPS calls to the Kubernetes API server (or any https URL): TLS verified against a CA file, an optional bearer
token, a bounded answer, a deadline.

What it does: `HttpsUrl.parse` accepts `https://host[:port]/path` only (a plain `http://` URL is a `ConfigError`
saying why). `Client.call` makes one request on a fresh connection: it reads the CA file and the token file anew
each time (the kubelet rotates both in place), verifies the server's chain and its name (DNS name or IP address
in the certificate, as any HTTPS client does: the API server is not a SPIFFE peer, so this is Python's `ssl`, not
`handshake`), sends `Authorization: Bearer` when it has a token, and reads at most `max_answer` bytes within
`timeout` seconds. Every failure is one `ApiError` line, with the HTTP status when there was an answer.
`in_cluster` finds the API server the way client-go does: `KUBERNETES_SERVICE_HOST`/`PORT` and the service
account's files under `SERVICE_ACCOUNT_DIR`.

What it does not: keep connections open, retry, follow redirects, or know any Kubernetes object (callers build
the paths and bodies).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.parse
from dataclasses import dataclass

import trio

from mtlsmesh import http11, netio
from mtlsmesh.addresses import host_port
from mtlsmesh.errors import ConfigError, MeshError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_CA_FILE = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
SA_TOKEN_FILE = os.path.join(SERVICE_ACCOUNT_DIR, "token")
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_ANSWER = 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024


class ApiError(MeshError):
    """A call that failed: `status` is the HTTP status of an answer, None when there was none."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.message = message
        self.status = status
        super().__init__(f"{status}: {message}" if status is not None else message)


@dataclass(frozen=True, slots=True)
class HttpsUrl:
    host: str
    port: int
    path: str  # with its query, if any

    @classmethod
    def parse(cls, text: str, flag: str) -> HttpsUrl:
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError as exc:
            raise ConfigError(flag, f"{text!r} is not a URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme == "http":
            raise ConfigError(flag, f"{text!r}: plain http is refused; use https (the answer must be authenticated)")
        if scheme != "https":
            raise ConfigError(flag, f"{text!r} is not an https:// URL")
        try:
            port = parts.port or 443
        except ValueError:
            raise ConfigError(flag, f"{text!r}: the port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ConfigError(flag, f"{text!r} names no host")
        if parts.username is not None or parts.fragment:
            raise ConfigError(flag, f"{text!r}: no user name or fragment, please")
        path = parts.path or "/"
        return cls(parts.hostname, port, f"{path}?{parts.query}" if parts.query else path)

    @property
    def authority(self) -> str:
        return host_port(self.host, self.port) if self.port != 443 else _bracketed(self.host)

    def with_path(self, path: str) -> HttpsUrl:
        return HttpsUrl(self.host, self.port, path)

    def __str__(self) -> str:
        return f"https://{self.authority}{self.path}"


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


@dataclass(frozen=True, slots=True)
class Client:
    """How to reach one server: whom to trust (None: the system's roots) and the token to show (None: none)."""

    ca_file: str | None = None
    token_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_answer: int = DEFAULT_MAX_ANSWER

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ApiError(f"cannot use the CA file {self.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            with open(self.token_file, "rb") as handle:
                data = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise ApiError(f"cannot read the token {self.token_file}: {exc.strerror or exc}") from None
        token = data.decode("ascii", "replace").strip()
        if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise ApiError(f"the token {self.token_file} is empty or not one line")
        return token

    async def call(
        self, method: str, url: HttpsUrl, *, body: bytes = b"", content_type: str | None = None
    ) -> http11.Answer:
        """One request and its whole answer, whatever its status; `ApiError` when there is no answer."""
        context, token = self._tls_context(), self._token()
        headers = [("accept", "application/json"), ("user-agent", "mtlsmesh")]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        if content_type is not None:
            headers.append(("content-type", content_type))
        try:
            with trio.fail_after(self.timeout):
                return await self._exchange(context, method, url, headers, body)
        except trio.TooSlowError:
            raise ApiError(f"{url.authority} did not answer within {self.timeout:g} s") from None

    async def _exchange(
        self, context: ssl.SSLContext, method: str, url: HttpsUrl, headers: list[tuple[str, str]], body: bytes
    ) -> http11.Answer:
        try:
            transport = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            raise ApiError(f"cannot connect to {url.authority}: {_connect_error(exc)}") from None
        stream = trio.SSLStream(transport, context, server_hostname=url.host, https_compatible=True)
        try:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise ApiError(f"TLS with {url.authority} failed: {_tls_error(exc)}") from None
            try:
                return await http11.request(
                    stream,
                    method,
                    url.path,
                    host=url.authority,
                    headers=headers,
                    body=body,
                    max_answer=self.max_answer,
                )
            except http11.HttpError as exc:
                raise ApiError(f"{url.authority}: {exc}") from None
            except trio.BrokenResourceError as exc:  # pragma: no cover - http11 turns these into HttpError
                raise ApiError(f"{url.authority}: the connection broke: {_tls_error(exc)}") from None
        finally:
            await trio.aclose_forcefully(stream)


def _connect_error(exc: OSError) -> str:
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if exc.errno is None and isinstance(cause, OSError):
        return netio.describe_error(cause)
    return netio.describe_error(exc)


def _tls_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the server's certificate does not verify: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    if isinstance(cause, OSError):
        return netio.describe_error(cause)
    return str(exc) or "the connection broke"


def in_cluster_url(flag: str) -> HttpsUrl:
    """The API server as a pod sees it (`KUBERNETES_SERVICE_HOST` and `_PORT`), or a `ConfigError` for `flag`."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError(flag, "not running in a cluster (no KUBERNETES_SERVICE_HOST); give the API server's URL")
    return HttpsUrl.parse(f"https://{_bracketed(host)}:{port}/", flag)


def default_file(path: str) -> str | None:
    """`path` when it exists (the in-cluster service account's files), else None."""
    return path if os.path.exists(path) else None

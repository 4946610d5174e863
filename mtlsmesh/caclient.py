"""The client side of the CA service: one TLS connection per call, and the CA known by its SPIFFE ID.

What it does: `open_ca` dials the CA and runs a TLS 1.3 handshake that offers ALPN `http/1.1`, verifies the CA's
chain against the roots we hold (OpenSSL) and then requires the CA's leaf to be a valid SVID whose ID is exactly the
expected one (`identity.ca_identity`): a certificate for any other workload of the mesh, however valid, is refused
before anything is sent. With `material` it presents our current SVID as client certificate (a renewal); without
it presents none (an enrollment with a token). `sign` and `fetch_bundle` make one request each and return the
parsed answer; every failure is a `CaError` carrying the HTTP status (None when the CA was never reached or did
not answer) and one line.

What it does not: decide when to renew, retry, or keep anything (see `agent`), or read the token file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio
from cryptography import x509

from mtlsmesh import caproto, handshake, http11, netio, svid, tls
from mtlsmesh.addresses import host_port
from mtlsmesh.errors import CertificateError, HandshakeError, MeshError
from mtlsmesh.identity import SpiffeId


class CaError(MeshError):
    """A call to the CA failed: `status` is the HTTP status of a refusal, None when there was no answer;
    `unreachable` when no connection could be made at all (trying another credential would not help)."""

    def __init__(self, message: str, status: int | None = None, *, unreachable: bool = False) -> None:
        self.message = message
        self.status = status
        self.unreachable = unreachable
        super().__init__(f"{status}: {message}" if status is not None else message)


def _connect_error(exc: OSError) -> str:
    """What went wrong dialing: trio reports "all attempts ... failed" and keeps each attempt's error underneath."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if exc.errno is None and isinstance(cause, OSError):
        return netio.describe_error(cause)
    return netio.describe_error(exc)


@dataclass(frozen=True, slots=True)
class CaEndpoint:
    """Where the CA is and who it must be."""

    host: str
    port: int
    identity: SpiffeId

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def _check_ca(stream: tls.TLSStream, expected: SpiffeId) -> None:
    der = stream.peer_certificate_der()
    if der is None:  # pragma: no cover - OpenSSL fails a TLS 1.3 client whose server sent no certificate
        raise HandshakeError(stream.peer, "the CA presented no certificate")
    try:
        found = svid.leaf_spiffe_id(x509.load_der_x509_certificate(der))
    except (CertificateError, ValueError) as exc:
        raise HandshakeError(stream.peer, f"the CA's certificate is not a valid SVID: {exc}") from None
    if found != expected:
        raise HandshakeError(stream.peer, f"the server is {found}, not the CA {expected}")


async def open_ca(
    endpoint: CaEndpoint,
    roots: Sequence[x509.Certificate],
    material: handshake.Material | None = None,
) -> tls.TLSStream:
    """A checked TLS connection to the CA (the caller bounds it in time and closes it). Raises `CaError`."""
    try:
        if material is not None:
            trusted = handshake.Material(material.chain, material.key, tuple(roots))
            context = handshake.build_context(trusted, handshake.Side.CLIENT, alpn=(caproto.ALPN,))
        else:
            context = handshake.build_context(None, handshake.Side.CLIENT, roots=roots, alpn=(caproto.ALPN,))
    except CertificateError as exc:
        raise CaError(f"cannot use our credential for the CA: {exc}") from None
    try:
        transport = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise CaError(f"cannot connect to the CA at {endpoint}: {_connect_error(exc)}", unreachable=True) from None
    stream = tls.TLSStream(transport, context, handshake.Side.CLIENT, str(endpoint))
    try:
        await stream.do_handshake(lambda: _check_ca(stream, endpoint.identity))
    except HandshakeError as exc:
        await trio.aclose_forcefully(stream)
        raise CaError(f"TLS with the CA at {endpoint} failed: {exc.reason}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _call(
    endpoint: CaEndpoint,
    roots: Sequence[x509.Certificate],
    material: handshake.Material | None,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    stream = await open_ca(endpoint, roots, material)
    try:
        answer = await http11.request(
            stream,
            method,
            path,
            host=caproto.CA_SERVICE_DNS,
            headers=[*headers, ("content-type", caproto.JSON_TYPE)] if body else headers,
            body=body,
            max_answer=caproto.MAX_ANSWER,
        )
    except http11.HttpError as exc:
        # A TLS 1.3 server refuses a client certificate after the client's handshake is done: the alert comes in
        # place of the answer, and says why (certificate expired, unknown ca).
        raise CaError(f"the CA at {endpoint} did not answer: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)
    if answer.status != 200:
        raise CaError(caproto.parse_error(answer.body), answer.status)
    return answer.body


async def sign(
    endpoint: CaEndpoint,
    roots: Sequence[x509.Certificate],
    request: caproto.SignRequest,
    *,
    token: str | None = None,
    material: handshake.Material | None = None,
) -> caproto.SignResponse:
    """Ask for an SVID, proving who we are with `token` or with `material` (our current SVID)."""
    headers = [("authorization", f"Bearer {token}")] if token is not None else []
    body = await _call(endpoint, roots, material, "POST", caproto.SIGN_PATH, headers=headers, body=request.encode())
    try:
        return caproto.parse_sign_response(body)
    except caproto.ProtocolError as exc:
        raise CaError(f"the CA's answer is unusable: {exc.message}") from None


async def fetch_bundle(endpoint: CaEndpoint, roots: Sequence[x509.Certificate]) -> caproto.TrustBundle:
    body = await _call(endpoint, roots, None, "GET", caproto.BUNDLE_PATH)
    try:
        return caproto.parse_bundle(body)
    except caproto.ProtocolError as exc:
        raise CaError(f"the CA's bundle is unusable: {exc.message}") from None

"""The CA service's wire format, shared by the server (`caserver`) and the sidecar's client (`agent`).

What it does: names the API (paths, the CA's own identity and port), and turns its messages into bytes and back,
checking every field on the way in:

    POST /v1/sign     {"csr": "<PEM PKCS#10>", "ttl_seconds": 86400}       ttl_seconds optional
                  200 {"spiffe_id": ..., "serial": "<hex>", "not_after": "<RFC 3339 UTC>",
                       "chain": ["<PEM leaf>", "<PEM intermediate>"...], "bundle": ["<PEM root>"...]}
    GET  /v1/bundle   200 the SPIFFE trust bundle: a JWK Set, per root {"use": "x509-svid", "kty": ..., the public
                      key's parameters, "x5c": ["<base64 DER>"]}, and "spiffe_sequence", "spiffe_refresh_hint"
    any refusal       4xx/5xx {"error": "<one line>"}

`Refusal` is the one error a request can earn: an HTTP status, a short reason (a metric label) and the line the
caller reads. `ProtocolError` is what a client raises for an answer it cannot use.

What it does not: sign, verify tokens or certificate chains, or touch the network; parsing the CSR is `pem`'s.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mtlsmesh import pem
from mtlsmesh.errors import CertificateError, IdentityError, MeshError
from mtlsmesh.identity import SpiffeId, TrustDomain, parse_workload_id, workload_id

# Where the CA lives in a cluster, and who it is: the sidecars check the CA's SVID against this ID.
CA_NAMESPACE = "mtlsmesh-system"
CA_SERVICE_ACCOUNT = "mtlsmesh-ca"
CA_SERVICE_DNS = f"{CA_SERVICE_ACCOUNT}.{CA_NAMESPACE}.svc"
CA_PORT = 15012
DEFAULT_AUDIENCE = "mtlsmesh-ca"  # what the projected service-account token must be minted for
ALPN = b"http/1.1"

SIGN_PATH = "/v1/sign"
BUNDLE_PATH = "/v1/bundle"
JSON_TYPE = "application/json"

MAX_BODY = 16 * 1024  # a sign request: a CSR of an RSA-4096 key is under 2 KiB
MAX_CSR = 8 * 1024
MAX_ANSWER = 1024 * 1024  # what a client reads of an answer: a chain and a bundle of a few roots
MAX_TTL_SECONDS = 100 * 365 * 86400
BUNDLE_USE = "x509-svid"

# HTTP statuses of refusals
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405
TOO_LARGE = 413
TOO_MANY = 429
UNAVAILABLE = 503


def ca_workload_id(trust_domain: TrustDomain) -> SpiffeId:
    """The CA's own SPIFFE ID: `spiffe://<td>/ns/mtlsmesh-system/sa/mtlsmesh-ca`."""
    return workload_id(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)


class ProtocolError(MeshError):
    """An answer from the CA that does not follow this format (or a refusal, with its status and line)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


class Refusal(MeshError):
    """Why the CA refuses a request: `status` (HTTP), `reason` (a short label for metrics), `message` (one line)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = " ".join(message.split())  # one line, whatever an underlying error said
        self.retry_after: int | None = None  # seconds, for a 429
        super().__init__(f"{status} {reason}: {self.message}")


# ---------------------------------------------------------------------------------------------------------------
# Times and JSON


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC, to the second: `2026-12-07T10:00:00Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ProtocolError(f"{what}: {text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ProtocolError(f"{what}: {text!r} has no time zone")
    return moment.astimezone(UTC)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _certificates(value: object, what: str) -> tuple[x509.Certificate, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"{what} must be a non-empty list of PEM strings")
    certs: list[x509.Certificate] = []
    for item in value:
        try:
            found = pem.parse_certificates(item.encode(), what)
        except CertificateError as exc:
            raise ProtocolError(str(exc)) from None
        if len(found) != 1:
            raise ProtocolError(f"{what}: each entry holds exactly one certificate, not {len(found)}")
        certs.append(found[0])
    return tuple(certs)


def _pem_strings(certs: Sequence[x509.Certificate]) -> list[str]:
    return [pem.render_certificates([cert]).decode() for cert in certs]


# ---------------------------------------------------------------------------------------------------------------
# POST /v1/sign


@dataclass(frozen=True, slots=True)
class SignRequest:
    """A certificate request in PEM, and the lifetime the caller would like (the CA may grant less)."""

    csr: str
    ttl_seconds: int | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"csr": self.csr}
        if self.ttl_seconds is not None:
            body["ttl_seconds"] = self.ttl_seconds
        return _dump(body)


def parse_sign_request(body: bytes) -> SignRequest:
    """The server's reading of a sign request; every problem is a `Refusal` (400, or 413 for a CSR too large)."""
    try:
        data = _json_object(body, "the request body")
    except ProtocolError as exc:
        raise Refusal(BAD_REQUEST, "malformed", f'{exc.message}; send {{"csr": "<PEM>"}}') from None
    unknown = sorted(set(data) - {"csr", "ttl_seconds"})
    if unknown:
        raise Refusal(BAD_REQUEST, "malformed", f"unknown field {unknown[0]!r} (expected csr, ttl_seconds)")
    csr = data.get("csr")
    if not isinstance(csr, str) or not csr:
        raise Refusal(BAD_REQUEST, "malformed", "the field 'csr' must be a PEM certificate request (a string)")
    if len(csr.encode()) > MAX_CSR:
        raise Refusal(TOO_LARGE, "too_large", f"the CSR is larger than {MAX_CSR} bytes")
    ttl = data.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL_SECONDS):
        raise Refusal(BAD_REQUEST, "malformed", f"ttl_seconds must be a whole number of seconds, 1-{MAX_TTL_SECONDS}")
    return SignRequest(csr, ttl)


def csr_public_key(csr: str) -> pem.PublicKey:
    """The key to certify: the CSR must parse, its signature verify, and it must not ask for a CA certificate.

    Whatever else the CSR asks for (subject, SANs, key usages) is ignored: the CA decides the identity."""
    data = csr.encode()
    try:
        public_key = pem.parse_csr_public_key(data, "csr")
        request = x509.load_pem_x509_csr(data)
        constraints = request.extensions.get_extension_for_class(x509.BasicConstraints)
    except CertificateError as exc:
        raise Refusal(BAD_REQUEST, "bad_csr", exc.message) from None
    except x509.ExtensionNotFound:
        return public_key
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise Refusal(BAD_REQUEST, "bad_csr", f"the CSR's extensions do not parse: {exc}") from None
    if constraints.value.ca:
        raise Refusal(BAD_REQUEST, "ca_csr", "the CSR asks for a CA certificate (basicConstraints CA:true)")
    return public_key


@dataclass(frozen=True, slots=True)
class SignResponse:
    """An issued SVID: its ID, serial, expiry, the chain (leaf first) and the trust bundle (every current root)."""

    spiffe_id: SpiffeId
    serial: int
    not_after: datetime
    chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]

    def encode(self) -> bytes:
        return _dump(
            {
                "spiffe_id": str(self.spiffe_id),
                "serial": format(self.serial, "x"),
                "not_after": format_time(self.not_after),
                "chain": _pem_strings(self.chain),
                "bundle": _pem_strings(self.bundle),
            }
        )


def parse_sign_response(body: bytes) -> SignResponse:
    """The client's reading of a 200 answer; `ProtocolError` for anything missing, mistyped or inconsistent."""
    data = _json_object(body, "the CA's answer")
    for key in ("spiffe_id", "serial", "not_after", "chain", "bundle"):
        if key not in data:
            raise ProtocolError(f"the CA's answer has no {key!r}")
    spiffe_text, serial_text, not_after = data["spiffe_id"], data["serial"], data["not_after"]
    if not isinstance(spiffe_text, str) or not isinstance(serial_text, str) or not isinstance(not_after, str):
        raise ProtocolError("the CA's answer: spiffe_id, serial and not_after must be strings")
    try:
        spiffe_id = parse_workload_id(spiffe_text)
    except IdentityError as exc:
        raise ProtocolError(f"the CA's answer: {exc}") from None
    try:
        serial = int(serial_text, 16)
    except ValueError:
        raise ProtocolError(f"the CA's answer: serial {serial_text!r} is not hexadecimal") from None
    chain = _certificates(data["chain"], "chain")
    answer = SignResponse(
        spiffe_id, serial, parse_time(not_after, "not_after"), chain, _certificates(data["bundle"], "bundle")
    )
    leaf = chain[0]
    if leaf.serial_number != serial or leaf.not_valid_after_utc != answer.not_after:
        raise ProtocolError("the CA's answer: serial or not_after differ from the leaf certificate's")
    return answer


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def encode_error(message: str) -> bytes:
    return _dump({"error": " ".join(message.split())})


def parse_error(body: bytes) -> str:
    """The line of a refusal; the body itself (shortened) when it is not our JSON."""
    try:
        data = _json_object(body, "the answer")
    except ProtocolError:
        data = {}
    message = data.get("error")
    if isinstance(message, str):
        return message
    text = body.decode("utf-8", "replace").strip()
    return " ".join(text.split())[:200] or "(no body)"


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header value; a `Refusal` (401) for any other scheme."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Refusal(UNAUTHORIZED, "bad_token", "the Authorization header must be 'Bearer <token>'")
    return token


# ---------------------------------------------------------------------------------------------------------------
# GET /v1/bundle: the SPIFFE trust bundle (SPIFFE Trust Domain and Bundle, section 4), X.509 roots only


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots every workload should trust; `sequence` grows with every change, `refresh_hint` in seconds."""

    roots: tuple[x509.Certificate, ...]
    sequence: int
    refresh_hint: int

    def encode(self) -> bytes:
        return _dump(
            {
                "keys": [_root_jwk(root) for root in self.roots],
                "spiffe_sequence": self.sequence,
                "spiffe_refresh_hint": self.refresh_hint,
            }
        )


def _b64url(number: int, size: int | None = None) -> str:
    raw = number.to_bytes(size if size is not None else max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _public_jwk(key: object) -> dict[str, str]:
    """The public parameters of a key as RFC 7517/7518/8037 write them."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers, size = key.public_numbers(), (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(key.curve.name, key.curve.name)
        return {"kty": "EC", "crv": crv, "x": _b64url(numbers.x, size), "y": _b64url(numbers.y, size)}
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url(rsa_numbers.n), "e": _b64url(rsa_numbers.e)}
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
    raise ProtocolError(f"a root with a {pem.key_type_name(key)} key cannot be written as a JWK")


def _root_jwk(root: x509.Certificate) -> dict[str, Any]:
    der = root.public_bytes(serialization.Encoding.DER)
    return {"use": BUNDLE_USE, **_public_jwk(root.public_key()), "x5c": [base64.b64encode(der).decode()]}


def parse_bundle(body: bytes) -> TrustBundle:
    """A SPIFFE bundle's X.509 roots; keys of other uses (jwt-svid) are skipped, as the format says to."""
    data = _json_object(body, "the trust bundle")
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise ProtocolError("the trust bundle has no 'keys' list")
    roots: list[x509.Certificate] = []
    for index, jwk in enumerate(keys):
        where = f"the trust bundle's keys[{index}]"
        if not isinstance(jwk, dict):
            raise ProtocolError(f"{where} is not a JSON object")
        if jwk.get("use") != BUNDLE_USE:
            continue
        x5c = jwk.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise ProtocolError(f"{where}: an x509-svid key holds exactly one certificate in x5c")
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except (ValueError, binascii.Error):
            raise ProtocolError(f"{where}: x5c is not a base64 DER certificate") from None
        try:
            expected = _public_jwk(cert.public_key())
        except (ValueError, ProtocolError):
            raise ProtocolError(f"{where}: the certificate's key is of a type the mesh does not use") from None
        if any(jwk.get(name) != value for name, value in expected.items()):
            raise ProtocolError(f"{where}: the key parameters do not match the certificate in x5c")
        roots.append(cert)
    if not roots:
        raise ProtocolError("the trust bundle holds no x509-svid root")
    sequence, hint = data.get("spiffe_sequence", 0), data.get("spiffe_refresh_hint", 0)
    for name, value in (("spiffe_sequence", sequence), ("spiffe_refresh_hint", hint)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"the trust bundle's {name} must be a whole number >= 0")
    return TrustBundle(tuple(roots), sequence, hint)

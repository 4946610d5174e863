"""The one seam to OpenSSL: TLS contexts, and a TLS 1.3 handshake over memory BIOs up to its hand-over to `records`.

What it does: `build_context` turns an SVID (chain + key) and a trust bundle into a TLS 1.3-only pyOpenSSL context
that presents the SVID, requires the peer's certificate and lets OpenSSL validate the peer's chain against the
bundle. Between sidecars that is all it is used for; its keyword arguments make the variants the CA service and its
clients need (ALPN `http/1.1` instead of `mtlsmesh`, a client certificate that is optional, a client that presents
none), each off by default. `Handshake` is one connection's handshake with no I/O of its own: the caller feeds it
the peer's ciphertext, calls `step` until it says the handshake is complete, and sends what `take_output` hands
back. `hand_over` then builds the `records.Session` that carries the connection on and frees OpenSSL's connection.

What it does not: read or write sockets (see `tls`, `sslstream`), judge the peer's SPIFFE ID (see `tls.judge_leaf`,
`svid`; a connection may hand it a check to run inside the handshake, `Handshake.check_leaf`), or speak any TLS
version but 1.3 unless asked (`min_version="1.2"`, for an explicit listener only).

An explicit listener may instead keep the records in OpenSSL (`record_layer: openssl`, and always for TLS 1.2,
which `records` does not speak): `Handshake.keep_records` then hands the connection on as `OpenSSLRecords`, the same
memory BIOs driven by `sslstream`. `build_context(min_version="1.2")` makes that listener's context (ECDHE with AEAD
suites only, no renegotiation, no compression, no resumption); between sidecars it is always TLS 1.3.

This is the only module that uses pyOpenSSL's private parts. It calls these bindings, each because the public API
has no equivalent, through pyOpenSSL's private handles (`Context._context`, `Connection._into_ssl`, the cffi `lib` and
`ffi`): the cffi binding's `SSL_CTX_set1_curves_list` (pyOpenSSL can set one elliptic curve, not a list of key
exchange groups with the hybrid post-quantum one first), `SSL_CTX_set1_sigalgs_list` (the signature algorithms we
offer, in the CertificateRequest too: only those our SVIDs can carry, see `SIGALGS`), `BIO_read` on the
connection's incoming memory BIO (to take back the ciphertext the peer sent right behind its last handshake flight,
which the record layer must read), and `SSL_set_verify` with our own certificate verify callback, on a connection
that checks the peer's leaf inside the handshake only (`_verify_leaf`:
pyOpenSSL's wrapper gives a callback no way to set the X509 error, and a refusal without one makes OpenSSL send
internal_error; with X509_V_ERR_CERT_REJECTED it sends bad_certificate), which reads the store context as
pyOpenSSL's wrapper does (`X509_STORE_CTX_*`, `X509_up_ref`, `Connection._reverse_mapping`,
`X509._from_raw_x509_ptr`), and `SSL_set_info_callback` on a connection whose records OpenSSL keeps (`_note_alert`:
which fatal alert it sent or read; pyOpenSSL sets info callbacks per context only).
Everything else goes through pyOpenSSL's public API; `REQUIRED` names what this module needs of pyOpenSSL and is
checked at import, so an unsupported pyOpenSSL fails with one line naming what is missing.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cryptography
import OpenSSL
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from OpenSSL import SSL, crypto

from mtlsmesh import conventions, records
from mtlsmesh.errors import CertificateError
from mtlsmesh.pem import PrivateKey

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - checked below, with a message that says what is missing
    _ffi = _lib = None

ALPN = conventions.MESH_ALPN.encode()  # what every sidecar offers and requires

# Key exchange groups offered between sidecars, most preferred first. X25519MLKEM768 is the hybrid post-quantum
# group (OpenSSL >= 3.5 names it so); older OpenSSL builds refuse the list and we fall back to the classic pair.
PQ_GROUPS = b"X25519MLKEM768:X25519:P-256"
CLASSIC_GROUPS = b"X25519:P-256"
# What `build_context(key_exchange=...)` takes: "hybrid" (the default) offers GROUPS, the hybrid group first where
# OpenSSL has it; "classic" offers and accepts CLASSIC_GROUPS only (the config's `key_exchange`).
KEY_EXCHANGES = ("hybrid", "classic")

HANDSHAKE_DRAIN = 16 * 1024  # ciphertext taken from OpenSSL's outgoing BIO per call

# The signature algorithms we offer (our CertificateVerify, and what a server's CertificateRequest asks a client to
# sign with): those the SVIDs `ca` makes can carry, ECDSA P-256/SHA-256 and P-384/SHA-384, Ed25519 and RSA
# (RSA-PSS for TLS 1.3's CertificateVerify; PKCS#1 v1.5 for certificate signatures and TLS 1.2). OpenSSL's default
# list would offer every algorithm its build knows (ML-DSA, SM2, brainpool, SHA-1, ...).
SIGALGS = (
    b"ecdsa_secp256r1_sha256:ecdsa_secp384r1_sha384:ed25519:rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:"
    b"rsa_pkcs1_sha256:rsa_pkcs1_sha384"
)
# TLS 1.2 for an explicit listener that allows it: ECDHE key exchange with an AEAD only (forward secrecy, no CBC).
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)
MIN_VERSIONS = ("1.2", "1.3")  # what `build_context(min_version=...)` takes

# ssl.h's SSL_MODE_NO_AUTO_CHAIN, which pyOpenSSL does not name (see build_context).
SSL_MODE_NO_AUTO_CHAIN = 0x8
# The key log lines that carry what the record layer needs once OpenSSL is done (see `_keylog`).
_CLIENT_SECRET = b"CLIENT_TRAFFIC_SECRET_0"
_SERVER_SECRET = b"SERVER_TRAFFIC_SECRET_0"
_MASTER_SECRET = b"CLIENT_RANDOM"  # TLS 1.2's line: the master secret (kept only for a refusal, see keep_records)
_TRAFFIC_PREFIXES = (_CLIENT_SECRET + b" ", _SERVER_SECRET + b" ", _MASTER_SECRET + b" ")

# What this module uses of pyOpenSSL, public and private: (where, name). Public methods newer than our lowest
# supported pyOpenSSL are listed too, so the message names them rather than failing at the first handshake.
REQUIRED = (
    ("OpenSSL._util.lib", "SSL_CTX_set1_curves_list"),
    ("OpenSSL._util.lib", "SSL_CTX_set1_sigalgs_list"),
    ("OpenSSL._util.lib", "BIO_read"),
    ("OpenSSL._util.lib", "SSL_set_verify"),
    ("OpenSSL._util.lib", "SSL_get_verify_mode"),
    ("OpenSSL._util.lib", "X509_STORE_CTX_set_error"),
    ("OpenSSL._util.lib", "X509_STORE_CTX_get_error_depth"),
    ("OpenSSL._util.lib", "X509_STORE_CTX_get_current_cert"),
    ("OpenSSL._util.lib", "X509_STORE_CTX_get_ex_data"),
    ("OpenSSL._util.lib", "SSL_get_ex_data_X509_STORE_CTX_idx"),
    ("OpenSSL._util.lib", "X509_up_ref"),
    ("OpenSSL._util.lib", "X509_V_ERR_CERT_REJECTED"),
    ("OpenSSL._util.lib", "SSL_set_info_callback"),
    ("OpenSSL._util.lib", "SSL_CB_ALERT"),
    ("OpenSSL._util.lib", "SSL_CB_READ"),
    ("OpenSSL._util.lib", "SSL_CB_WRITE"),
    ("OpenSSL.SSL.Connection", "_ssl"),
    ("OpenSSL.SSL.Connection", "_reverse_mapping"),
    ("OpenSSL.crypto.X509", "_from_raw_x509_ptr"),
    ("OpenSSL.SSL.Connection", "_into_ssl"),
    ("OpenSSL.SSL.Context", "set_tls13_ciphersuites"),
    ("OpenSSL.SSL.Context", "set_keylog_callback"),
    ("OpenSSL.SSL.Connection", "get_group_name"),
    ("OpenSSL.SSL.Connection", "bio_shutdown"),
    ("OpenSSL.SSL", "OP_NO_RENEGOTIATION"),  # defined only when cryptography's binding has it
)


def missing_bindings() -> list[str]:
    """What of `REQUIRED` this pyOpenSSL and cryptography lack, each named with the package that should have it."""
    probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    where: dict[str, tuple[object, str]] = {
        # pyOpenSSL's `_util.lib` is cryptography's cffi binding of OpenSSL.
        "OpenSSL._util.lib": (_lib, f"cryptography {cryptography.__version__}"),
        "OpenSSL.SSL.Connection": (probe, f"pyOpenSSL {OpenSSL.__version__}"),
        "OpenSSL.SSL.Context": (SSL.Context, f"pyOpenSSL {OpenSSL.__version__}"),
        "OpenSSL.SSL": (SSL, f"pyOpenSSL {OpenSSL.__version__}"),
        "OpenSSL.crypto.X509": (crypto.X509, f"pyOpenSSL {OpenSSL.__version__}"),
    }
    return [
        f"{place}.{name} (not in {where[place][1]})" for place, name in REQUIRED if not hasattr(where[place][0], name)
    ]


_MISSING = missing_bindings()
if _MISSING:  # pragma: no cover - only on versions pyproject.toml does not allow
    raise ImportError(
        f"mtlsmesh needs {', '.join(_MISSING)}: install the pyOpenSSL and cryptography versions pyproject.toml asks for"
    )


def _probe_groups() -> bytes | None:
    """The groups list this OpenSSL accepts, or None (then OpenSSL's defaults stand)."""
    probe = SSL.Context(SSL.TLS_METHOD)
    for groups in (PQ_GROUPS, CLASSIC_GROUPS):
        if _lib.SSL_CTX_set1_curves_list(probe._context, groups) == 1:  # "curves": OpenSSL's older name for groups
            return groups
    return None  # pragma: no cover


GROUPS = _probe_groups()  # what build_context sets; None: OpenSSL's defaults


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Material:
    """An SVID and a trust bundle, already parsed: `chain` is the leaf first, then intermediates."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    roots: tuple[x509.Certificate, ...]


class HandshakeFailure(Exception):
    """OpenSSL ended the handshake (the peer's message was wrong, its certificate did not verify, the transport
    ended). An alert telling the peer why may be waiting in `Handshake.take_output`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # A peer that does not offer our ALPN is not a sidecar. pyOpenSSL turns "no overlap" into "no ALPN" (the
    # handshake goes on without one), and `tls.check_peer` refuses such a peer before a byte flows.
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def _alpn_selector(accepted: tuple[bytes, ...]) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    """A server's ALPN choice among `accepted`, ours in order of preference. OpenSSL asks only a client that offers
    ALPN at all; for one that offers none of ours, pyOpenSSL turns NO_OVERLAPPING_PROTOCOLS into "no ALPN" and the
    handshake goes on without it."""
    if accepted == (ALPN,):
        return _select_alpn

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        chosen = next((protocol for protocol in accepted if protocol in offered), None)
        return chosen if chosen is not None else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    return select


_CONTEXTS: weakref.WeakSet[SSL.Context] = weakref.WeakSet()  # contexts that have our key log


def build_context(
    material: Material | None,
    side: Side,
    *,
    roots: Sequence[x509.Certificate] = (),
    alpn: Sequence[bytes] = (ALPN,),
    require_peer_certificate: bool = True,
    min_version: str = "1.3",
    key_exchange: str = "hybrid",
) -> SSL.Context:
    """A fresh TLS 1.3-only context (TLS 1.2 too with `min_version="1.2"`) presenting `material`'s SVID and
    trusting its roots.

    A new context per credential reload: adding roots to a live context's store only ever grows it.
    Raises `CertificateError` when OpenSSL refuses the key or a certificate.

    The keywords, for the CA service and its clients (the defaults are what two sidecars use):
    `material` None: a client that presents no certificate (a sidecar enrolling with a token) and trusts `roots`.
    `alpn`: the protocols a client offers, or a server accepts, in order of preference; a server accepts a client
    that offers no ALPN at all (or none of `alpn`: it then negotiates none), and `()` turns ALPN off.
    `require_peer_certificate=False`: a server asks for a client certificate but lets a client without one finish
    the handshake (one that is sent must still verify against the roots); a client always requires the server's.
    `min_version="1.2"` (an explicit listener for legacy peers): TLS 1.2 too, with `TLS12_CIPHERS` only, no
    renegotiation, no compression, no resumption; its records stay in OpenSSL (`Handshake.keep_records`).
    `key_exchange="classic"`: X25519 and P-256 only, without the hybrid post-quantum group (see `KEY_EXCHANGES`).
    """
    if min_version not in MIN_VERSIONS:
        raise ValueError(f"min_version must be one of {', '.join(MIN_VERSIONS)}")
    if key_exchange not in KEY_EXCHANGES:
        raise ValueError(f"key_exchange must be one of {', '.join(KEY_EXCHANGES)}")
    if material is None and side is Side.SERVER:
        raise ValueError("a TLS server must present a certificate")
    if material is not None and roots:
        raise ValueError("the roots come from the material when there is one")
    trusted = material.roots if material is not None else tuple(roots)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if side is Side.SERVER else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION if min_version == "1.2" else SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # No resumption: a resumed session would skip the client certificate check we rely on. OP_NO_TICKET turns off
    # stateless tickets and, with the session cache off, the stateful ones OpenSSL still writes after a TLS 1.3
    # handshake name nothing it could resume. pyOpenSSL and cryptography's binding cannot set their number to 0
    # (SSL_CTX_set_num_tickets), so `Handshake.hand_over` drops them before they leave (see there). Our clients
    # never offer one. No renegotiation (TLS 1.2; TLS 1.3 has none).
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    if min_version == "1.2":
        ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Released buffers: an idle connection hands its record buffers back to malloc instead of keeping them for the
    # next record. No auto chain: with no intermediates configured, OpenSSL would otherwise build the chain it sends
    # by verifying our own leaf against the trust store on every handshake (one signature check, a sixth of the
    # handshake's CPU) and then send the root as well. We send what the cert file holds: the leaf and its
    # intermediates. (OpenSSL never writes application data for us: after the handshake the records are ours.)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN)
    try:
        if material is not None:
            ctx.use_certificate(material.chain[0])
            for intermediate in material.chain[1:]:
                ctx.add_extra_chain_cert(intermediate)
            ctx.use_privatekey(material.key)
            ctx.check_privatekey()
        store = ctx.get_cert_store()
        if store is None:  # pragma: no cover - a fresh context always has a store
            raise CertificateError("", "OpenSSL gave no certificate store")
        for root in trusted:
            store.add_cert(crypto.X509.from_cryptography(root))
    except (SSL.Error, crypto.Error) as exc:
        raise CertificateError("", f"OpenSSL refused the credential: {openssl_reason(exc)}") from exc
    # OpenSSL validates the peer's chain against the bundle (its verdict stands); `_verify_leaf` then applies the
    # connection's SPIFFE check to a leaf that verified, when the connection has one (`Handshake.check_leaf`), so a
    # refused peer is refused inside the handshake, with OpenSSL's alert. `tls.check_peer` checks again after it.
    # A client's VERIFY_PEER alone already fails a server that sends no certificate (TLS 1.3 servers always send one).
    required = require_peer_certificate or side is Side.CLIENT
    mode = (SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT) if required else SSL.VERIFY_PEER
    # OpenSSL's own verification only; a connection with a leaf check adds our callback to itself (`check_leaf`),
    # so a handshake without one (a server on our own records) calls no Python per certificate.
    ctx.set_verify(mode)
    groups = GROUPS if key_exchange == "hybrid" else CLASSIC_GROUPS
    if groups is not None and _lib.SSL_CTX_set1_curves_list(ctx._context, groups) != 1:  # pragma: no cover
        raise CertificateError("", "OpenSSL refused the key exchange group list")
    if _lib.SSL_CTX_set1_sigalgs_list(ctx._context, SIGALGS) != 1:  # pragma: no cover - every OpenSSL 3 knows them
        raise CertificateError("", "OpenSSL refused the signature algorithm list")
    # Only suites our record layer carries on with after the handshake (OpenSSL's default TLS 1.3 list).
    ctx.set_tls13_ciphersuites(records.CIPHERSUITES.encode())
    ctx.set_keylog_callback(_keylog)
    if side is Side.SERVER:
        if alpn:
            ctx.set_alpn_select_callback(_alpn_selector(tuple(alpn)))
        ctx.set_session_id(b"mtlsmesh")
    elif alpn:
        ctx.set_alpn_protos(list(alpn))
    _CONTEXTS.add(ctx)
    return ctx


# A connection's check of the peer's leaf (DER), run inside the handshake: None to accept it, else the reason.
LeafCheck = Callable[[bytes], str | None]


def _verify_leaf(ok: int, store: Any) -> int:
    """OpenSSL's certificate verify callback (`SSL_set_verify`, set by `Handshake.check_leaf`): OpenSSL's own verdict
    on each certificate of the peer's chain stands; a leaf (depth 0) it accepted is also given to the connection's
    `Handshake.check_leaf`, if any. A refusal sets X509_V_ERR_CERT_REJECTED, for which OpenSSL fails the handshake
    with the alert bad_certificate (42), and leaves the reason for `Handshake.step` to raise. Never raises (an
    exception would be lost in OpenSSL): an unexpected one refuses, with its text as the reason."""
    if not ok or _lib.X509_STORE_CTX_get_error_depth(store) != 0:
        return ok
    conn = SSL.Connection._reverse_mapping.get(
        _lib.X509_STORE_CTX_get_ex_data(store, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
    )
    handshake = None if conn is None else conn.get_app_data()
    if not isinstance(handshake, Handshake) or handshake._leaf_check is None:
        return 1
    try:
        leaf = _lib.X509_STORE_CTX_get_current_cert(store)
        _lib.X509_up_ref(leaf)
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, crypto.X509._from_raw_x509_ptr(leaf))
        handshake._leaf_der = der
        reason = handshake._leaf_check(der)
    except Exception as exc:  # pragma: no cover - the check is pure; this only keeps OpenSSL's callback sound
        reason = f"the peer's leaf could not be checked: {exc!r}"
    if reason is None:
        return 1
    handshake._refusal = reason
    _lib.X509_STORE_CTX_set_error(store, _lib.X509_V_ERR_CERT_REJECTED)
    return 0


# One cffi callback for every context (it must outlive them: it is never freed).
_VERIFY_CALLBACK = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _verify_leaf)


def _keylog(conn: SSL.Connection, line: bytes) -> None:
    """OpenSSL's key log callback: keep the two application traffic secrets on the connection's `Handshake`, for
    the record layer. Nothing is written anywhere; the other lines (handshake and exporter secrets) are skipped."""
    if not line.startswith(_TRAFFIC_PREFIXES):
        return
    handshake = conn.get_app_data()
    if isinstance(handshake, Handshake):
        label, _, rest = line.partition(b" ")
        with contextlib.suppress(ValueError):  # OpenSSL writes hex; a bad line leaves the secret missing
            handshake._secrets[label] = bytes.fromhex(rest.partition(b" ")[2].decode("ascii"))


def openssl_reason(exc: BaseException) -> str:
    """The most useful line of an OpenSSL error: the last reason string of its error queue."""
    args = exc.args
    if args and isinstance(args[0], list) and args[0]:
        entry = args[0][-1]
        if isinstance(entry, tuple) and entry:
            return str(entry[-1])
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by peer"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class HandOver:
    """What carries a finished handshake on: the record layer's session, our last handshake records (not yet sent),
    the peer's ciphertext OpenSSL did not read, what was negotiated and the ALPN."""

    session: records.Session
    held: bytes
    unread: bytes
    negotiated: tuple[str | None, str | None, str | None]
    alpn: bytes | None


class Handshake:
    """One TLS 1.3 handshake over memory BIOs, driven by its caller: `feed` what the peer sent, `step` until it
    returns True, send `take_output` after every step. `context` comes from `build_context` (one made elsewhere
    gets the key log the hand-over needs, so it must not have made a connection yet)."""

    __slots__ = ("_conn", "_leaf_check", "_leaf_der", "_refusal", "_secrets", "_side", "_wrote")

    def __init__(self, context: SSL.Context, side: Side) -> None:
        if context not in _CONTEXTS:  # made elsewhere (tests, peers that are not sidecars): it needs our key log
            context.set_keylog_callback(_keylog)
            _CONTEXTS.add(context)
        conn = SSL.Connection(context, None)
        conn.set_app_data(self)  # for _keylog; undone by hand_over and free
        if side is Side.SERVER:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        self._conn: SSL.Connection | None = conn
        self._side = side
        self._secrets: dict[bytes, bytes] = {}  # filled by _keylog during the handshake, emptied by hand_over
        # A step ran since the output was last taken: only then can there be output (OpenSSL writes only when
        # stepped), so an empty BIO is not asked again (pyOpenSSL answers an empty read with an exception).
        self._wrote = False
        self._leaf_check: LeafCheck | None = None  # see check_leaf
        self._leaf_der: bytes | None = None  # the peer's leaf as _verify_leaf saw it (peer_certificate_der's answer)
        self._refusal: str | None = None  # why _leaf_check refused the peer's leaf

    def check_leaf(self, check: LeafCheck) -> None:
        """Check the peer's leaf inside the handshake, once OpenSSL has verified its chain: `check` gets the leaf's
        DER and returns None to accept it, or the reason it is refused. A refusal fails the handshake (`step`
        raises `HandshakeFailure` with that reason) and OpenSSL's alert, bad_certificate, goes to the peer in
        `take_output`. Per connection: our verify callback is set on this connection alone (the context has none)
        and finds the check through it."""
        self._leaf_check = check
        conn = self._conn
        assert conn is not None
        _lib.SSL_set_verify(conn._ssl, _lib.SSL_get_verify_mode(conn._ssl), _VERIFY_CALLBACK)

    def step(self) -> bool:
        """Let OpenSSL take the handshake as far as its input allows: True once it is complete, False while it needs
        more from the peer. Raises `HandshakeFailure`."""
        assert self._conn is not None
        self._wrote = True
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            raise HandshakeFailure(self._refusal or openssl_reason(exc)) from exc
        return True

    def take_output(self) -> bytes:
        """The ciphertext OpenSSL wrote for the peer since the last call, b"" when none."""
        conn = self._conn
        if conn is None or not self._wrote:
            return b""
        self._wrote = False
        parts: list[bytes] = []
        while True:
            try:
                part = conn.bio_read(HANDSHAKE_DRAIN)
            except SSL.WantReadError:
                break
            parts.append(part)
            if len(part) < HANDSHAKE_DRAIN:  # the BIO is empty now
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def feed(self, data: bytes) -> None:
        """Ciphertext from the peer, for the next `step`."""
        assert self._conn is not None
        self._conn.bio_write(data)

    def feed_eof(self) -> None:
        """The peer closed: the next `step` fails instead of waiting for more."""
        assert self._conn is not None
        self._conn.bio_shutdown()

    def negotiated(self) -> tuple[str | None, str | None, str | None]:
        """(protocol version, cipher suite, key exchange group) so far."""
        assert self._conn is not None
        conn = self._conn
        return (conn.get_protocol_version_name(), conn.get_cipher_name(), conn.get_group_name())

    def alpn(self) -> bytes | None:
        assert self._conn is not None
        return self._conn.get_alpn_proto_negotiated() or None

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf in DER, without parsing it (taken once: the verify callback's copy when it had one)."""
        assert self._conn is not None
        if self._leaf_der is not None:
            return self._leaf_der
        cert = self._conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def hand_over(self) -> HandOver:
        """Move the finished connection from OpenSSL to a `records.Session`, then free OpenSSL's connection.

        What carries over: the two application traffic secrets (from the key log), the cipher suite, the records
        OpenSSL wrote in its last step (a client's Certificate..Finished flight under handshake keys), and the
        ciphertext OpenSSL has not read (records the peer sent right behind its last flight; OpenSSL reads a memory
        BIO one record at a time, so nothing of them is inside it). Raises `HandshakeFailure`.

        A server's last step wrote only OpenSSL's NewSessionTickets (see `build_context`: their number cannot be set
        to 0 here), which name nothing we would resume: they are dropped, never sent, and our write sequence starts
        at 0. They were sealed under the same key and sequence numbers as our first records, but a nonce is spent
        only by a ciphertext that leaves: these never leave this process."""
        conn = self._conn
        assert conn is not None
        held = self.take_output()
        unread = _take_unread(conn)
        cipher = conn.get_cipher_name()
        suite = records.SUITES.get(cipher or "")
        client_secret = self._secrets.get(_CLIENT_SECRET)
        server_secret = self._secrets.get(_SERVER_SECRET)
        if suite is None or client_secret is None or server_secret is None:
            raise HandshakeFailure(f"no record layer for this connection (suite {cipher})")
        if conn.pending() > 0 or _has_pending(conn):
            raise HandshakeFailure("application data arrived inside the handshake")
        if self._side is Side.SERVER:
            if count_records(held) is None:
                raise HandshakeFailure("OpenSSL's last handshake output is not application records")
            held = b""  # the session tickets: never sent (see above)
            read_secret, write_secret = client_secret, server_secret
        else:
            read_secret, write_secret = server_secret, client_secret
        session = records.Session(suite, read_secret, write_secret, is_client=self._side is Side.CLIENT)
        handed = HandOver(session, held, unread, self.negotiated(), self.alpn())
        self.free()
        return handed

    def keep_records(self) -> OpenSSLRecords:
        """The finished connection, its records left to OpenSSL (`record_layer: openssl`, and TLS 1.2): what OpenSSL
        wrote last leaves with the next records. The key log's secrets are dropped, except that a server keeps
        what it needs to seal one alert (TLS 1.3: its two traffic secrets; TLS 1.2: the master secret and both
        randoms) until OpenSSL next seals or opens a record, so that a refusal right after the handshake can still
        be told with an alert (`OpenSSLRecords.refusal_alert`)."""
        conn = self._conn
        assert conn is not None
        held = b""
        refusal: _Refusal | _Refusal12 | None = None
        version = conn.get_protocol_version_name()
        if self._side is Side.SERVER and version == "TLSv1.3":
            held = self.take_output()  # the session tickets, under our application key: records 0..n-1
            suite = records.SUITES.get(conn.get_cipher_name() or "")
            client_secret = self._secrets.get(_CLIENT_SECRET)
            server_secret = self._secrets.get(_SERVER_SECRET)
            written = count_records(held)
            if suite is not None and client_secret is not None and server_secret is not None and written is not None:
                refusal = _Refusal(suite, client_secret, server_secret, written)
        elif self._side is Side.SERVER and version == "TLSv1.2":
            held = self.take_output()  # ChangeCipherSpec and Finished: records under our write key from there on
            master = self._secrets.get(_MASTER_SECRET)
            written = _records_after_ccs(held)
            cipher = TLS12_AEADS.get(conn.get_cipher_name() or "")
            if master is not None and written is not None and cipher is not None:
                randoms = (conn.client_random(), conn.server_random())
                if randoms[0] is not None and randoms[1] is not None:
                    refusal = _Refusal12(cipher, master, randoms[0], randoms[1], written)
        self._secrets.clear()
        conn.set_app_data(None)
        self._conn = None
        return OpenSSLRecords(conn, held=held, refusal=refusal)

    def free(self) -> None:
        """Let go of OpenSSL's connection and the secrets (after `hand_over`, or when the stream closes early)."""
        self._secrets.clear()
        self._leaf_der = None
        if self._conn is not None:
            self._conn.set_app_data(None)
            self._conn = None


class RecordFailure(Exception):
    """OpenSSL refused a record of the peer's, or the transport ended without close_notify. An alert telling the
    peer why may be waiting in `OpenSSLRecords.take`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Refusal:
    """What a TLS 1.3 server on OpenSSL's records needs to seal one alert of its own after the handshake: the suite,
    both traffic secrets, and how many records OpenSSL has written under its key (the session tickets)."""

    suite: records.Suite
    read_secret: bytes
    write_secret: bytes
    written: int


# TLS 1.2 suites of TLS12_CIPHERS (OpenSSL's names) → (AEAD, key length, fixed IV length, PRF hash), RFC 5288 and
# RFC 7905: what `_Refusal12` needs to seal the one record it seals.
TLS12_AEADS: dict[str, tuple[type[AESGCM] | type[ChaCha20Poly1305], int, int, type[hashes.HashAlgorithm]]] = {
    "ECDHE-ECDSA-AES256-GCM-SHA384": (AESGCM, 32, 4, hashes.SHA384),
    "ECDHE-RSA-AES256-GCM-SHA384": (AESGCM, 32, 4, hashes.SHA384),
    "ECDHE-ECDSA-AES128-GCM-SHA256": (AESGCM, 16, 4, hashes.SHA256),
    "ECDHE-RSA-AES128-GCM-SHA256": (AESGCM, 16, 4, hashes.SHA256),
    "ECDHE-ECDSA-CHACHA20-POLY1305": (ChaCha20Poly1305, 32, 12, hashes.SHA256),
    "ECDHE-RSA-CHACHA20-POLY1305": (ChaCha20Poly1305, 32, 12, hashes.SHA256),
}


def _tls12_prf(algorithm: type[hashes.HashAlgorithm], secret: bytes, seed: bytes, length: int) -> bytes:
    """RFC 5246 §5: P_hash(secret, seed), `length` bytes."""
    out, a = b"", seed
    while len(out) < length:
        mac = crypto_hmac.HMAC(secret, algorithm())
        mac.update(a)
        a = mac.finalize()
        mac = crypto_hmac.HMAC(secret, algorithm())
        mac.update(a + seed)
        out += mac.finalize()
    return out[:length]


@dataclass(frozen=True, slots=True)
class _Refusal12:
    """`_Refusal` for a TLS 1.2 server: the suite, the master secret, both randoms, and how many records OpenSSL has
    written under its write key (its Finished)."""

    cipher: tuple[type[AESGCM] | type[ChaCha20Poly1305], int, int, type[hashes.HashAlgorithm]]
    master: bytes
    client_random: bytes
    server_random: bytes
    written: int

    def alert(self, description: int) -> bytes:
        """The fatal alert `description` as the server's next record (RFC 5246 §6.2.3.3, RFC 5288 §3, RFC 7905 §2)."""
        aead, key_size, iv_size, algorithm = self.cipher
        block = _tls12_prf(
            algorithm, self.master, b"key expansion" + self.server_random + self.client_random, 2 * (key_size + iv_size)
        )
        key = block[key_size : 2 * key_size]  # client key, server key, client IV, server IV (no MAC keys: AEAD)
        iv = block[2 * key_size + iv_size :]
        seq = self.written.to_bytes(8, "big")
        plaintext = bytes((2, description))
        aad = seq + bytes((records.ALERT, 3, 3)) + len(plaintext).to_bytes(2, "big")
        if aead is AESGCM:
            explicit = seq  # the explicit nonce: any value unique under this key; OpenSSL starts from a random one
            body = explicit + AESGCM(key).encrypt(iv + explicit, plaintext, aad)
        else:
            nonce = bytes(a ^ b for a, b in zip(iv, bytes(4) + seq, strict=True))
            body = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
        return bytes((records.ALERT, 3, 3)) + len(body).to_bytes(2, "big") + body


def _records_after_ccs(data: bytes) -> int | None:
    """How many records follow the first ChangeCipherSpec in `data` (whole records only); None without one."""
    pos, seen, count = 0, False, 0
    while pos < len(data):
        if len(data) - pos < records.HEADER_SIZE:
            return None
        kind = data[pos]
        pos += records.HEADER_SIZE + ((data[pos + 3] << 8) | data[pos + 4])
        if seen:
            count += 1
        elif kind == _CHANGE_CIPHER_SPEC:
            seen = True
    return count if seen and pos == len(data) else None


_CHANGE_CIPHER_SPEC = 20


class OpenSSLRecords:
    """A finished connection whose records OpenSSL seals and opens, over memory BIOs like `Handshake`: `seal`
    plaintext and send what `take` hands back; `feed` the peer's ciphertext and `open` what it holds. KeyUpdate,
    session tickets a server sends us and alerts are OpenSSL's to follow (any answer is in `take`).

    `sent_alert` and `peer_alert` are the fatal alerts OpenSSL sent the peer (when it refused one of its records)
    and read from it, as OpenSSL's info callback reported them (`_note_alert`); None until then."""

    __slots__ = ("__weakref__", "_conn", "_held", "_negotiated", "_refusal", "peer_alert", "sent_alert")

    def __init__(
        self, conn: SSL.Connection, *, held: bytes = b"", refusal: _Refusal | _Refusal12 | None = None
    ) -> None:
        self._conn = conn
        self._negotiated = (conn.get_protocol_version_name(), conn.get_cipher_name(), conn.get_group_name())
        self._held = held  # what OpenSSL wrote last in the handshake, taken out of its BIO: sent first
        self._refusal = refusal  # see refusal_alert
        self.sent_alert: int | None = None
        self.peer_alert: int | None = None
        # The info callback finds this object through the connection (a weak reference: no cycle to collect).
        conn.set_app_data(weakref.ref(self))
        _lib.SSL_set_info_callback(conn._ssl, _INFO_CALLBACK)

    def refusal_alert(self, description: int) -> bytes | None:
        """The fatal alert `description` as the record that follows what OpenSSL has written, for a server that
        refuses its peer before it seals or opens anything (a policy denial right after the handshake); None
        otherwise (a client, or OpenSSL has moved on: it alone knows its record state then). OpenSSL itself writes
        no alert but its own; it must write nothing after this one."""
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            return None
        if isinstance(refusal, _Refusal12):
            return refusal.alert(description)
        session = records.Session(
            refusal.suite, refusal.read_secret, refusal.write_secret, is_client=False, write_seq=refusal.written
        )
        session.alert(description)
        out = bytes(session.take())
        session.wipe()
        return out

    def seal(self, data: bytes | bytearray | memoryview) -> None:
        """Plaintext to send: OpenSSL seals it into records in its outgoing BIO (which always has room)."""
        self._refusal = None
        conn = self._conn
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = conn.send(view)
            except SSL.Error as exc:  # e.g. after a fatal alert: OpenSSL refuses to write
                raise RecordFailure(openssl_reason(exc)) from exc
            view = view[sent:]

    def take(self) -> bytes:
        """The ciphertext OpenSSL wrote since the last call, b"" when none."""
        parts: list[bytes] = []
        if self._held:
            parts.append(self._held)
            self._held = b""
        while True:
            try:
                parts.append(self._conn.bio_read(HANDSHAKE_DRAIN * 4))
            except SSL.WantReadError:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def feed(self, data: bytes | bytearray) -> None:
        self._conn.bio_write(bytes(data))

    def feed_eof(self) -> None:
        self._conn.bio_shutdown()

    def open(self, max_bytes: int) -> bytes | None:
        """Up to `max_bytes` of plaintext; b"" at the peer's close_notify; None when OpenSSL needs more ciphertext.
        Raises `RecordFailure` (a record OpenSSL refused, or the transport's end without close_notify); a fatal
        alert from the peer is named as `records` names it ("peer sent alert ...")."""
        self._refusal = None
        try:
            return self._conn.recv(max_bytes)
        except SSL.WantReadError:
            return None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            raise RecordFailure("connection closed by peer") from exc
        except SSL.Error as exc:
            if self.peer_alert is not None:
                raise RecordFailure(str(records.PeerAlert(self.peer_alert))) from exc
            reason = openssl_reason(exc)
            if "unexpected eof" in reason:
                reason = "connection closed by peer"
            raise RecordFailure(reason) from exc

    def close_notify(self) -> None:
        """Write our close_notify (the peer may go on sending: `open` still works)."""
        self._refusal = None
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()

    @property
    def negotiated(self) -> tuple[str | None, str | None, str | None]:
        return self._negotiated

    def alpn(self) -> bytes | None:
        return self._conn.get_alpn_proto_negotiated() or None

    def peer_certificate_der(self) -> bytes | None:
        cert = self._conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def _note_alert(ssl: Any, where: int, value: int) -> None:
    """OpenSSL's info callback on a connection whose records it keeps (set by `OpenSSLRecords`): note the first
    fatal alert it sends and the one it reads (`value` is level << 8 | description). Never raises (an exception
    would be lost in OpenSSL)."""
    if not where & _lib.SSL_CB_ALERT or value >> 8 != 2:  # only alerts, and of those the fatal ones
        return
    try:
        conn = SSL.Connection._reverse_mapping.get(ssl)
        ref = None if conn is None else conn.get_app_data()
        kept = ref() if isinstance(ref, weakref.ref) else None
        if not isinstance(kept, OpenSSLRecords):
            return
        if where & _lib.SSL_CB_WRITE:
            if kept.sent_alert is None:
                kept.sent_alert = value & 0xFF
        elif where & _lib.SSL_CB_READ:
            kept.peer_alert = value & 0xFF
    except Exception:  # pragma: no cover - nothing above raises; this only keeps OpenSSL's callback sound
        return


_INFO_CALLBACK = _ffi.callback("void (*)(const SSL *, int, int)", _note_alert)


# Contexts for the explicit listeners that allow TLS 1.2 and for `key_exchange: classic`, per credential generation
# (keyed by that generation's own context, so they go when it goes), then by (min_version, key_exchange).
_VARIANTS: weakref.WeakKeyDictionary[SSL.Context, dict[tuple[str, str], SSL.Context]] = weakref.WeakKeyDictionary()


def variant_context(
    generation: SSL.Context, material: Material, side: Side, *, min_version: str = "1.3", key_exchange: str = "hybrid"
) -> SSL.Context:
    """`generation` (a context `build_context` made from `material` for `side` with its defaults) itself, or its twin
    with another `min_version` or `key_exchange`, made on first use and kept as long as `generation` is."""
    if min_version == "1.3" and key_exchange == "hybrid":
        return generation
    twins = _VARIANTS.get(generation)
    if twins is None:
        twins = _VARIANTS[generation] = {}
    twin = twins.get((min_version, key_exchange))
    if twin is None:
        twin = twins[min_version, key_exchange] = build_context(
            material, side, min_version=min_version, key_exchange=key_exchange
        )
    return twin


def tls12_context(generation: SSL.Context, material: Material, side: Side) -> SSL.Context:
    """The `min_version="1.2"` twin of `generation` (see `variant_context`)."""
    return variant_context(generation, material, side, min_version="1.2")


class _Drain(threading.local):
    """One buffer per thread for `_take_unread`, instead of a zeroed 16 KiB allocation per connection (each use is
    synchronous, so the connections of a thread can share it)."""

    def __init__(self) -> None:
        self.buffer = _ffi.new("char[]", HANDSHAKE_DRAIN)


_DRAIN = _Drain()


def _has_pending(conn: SSL.Connection) -> bool:
    """SSL_has_pending: whether OpenSSL holds records it has read but not processed (SSL_pending counts only the
    processed application data): bytes that would be lost to the record layer. cryptography's binding has no
    SSL_has_pending up to 50 at least; without it the check rests on read-ahead being off (OpenSSL's default, never
    changed here), under which OpenSSL reads one record at a time from the memory BIO and holds no unprocessed
    record after a step, so what it has not processed is still in the BIO, where `_take_unread` finds it."""
    has_pending = getattr(_lib, "SSL_has_pending", None)
    return has_pending is not None and bool(has_pending(conn._ssl))


def _take_unread(conn: SSL.Connection) -> bytes:
    """Everything in the connection's incoming memory BIO that OpenSSL has not read (private: see the module
    docstring)."""
    bio: Any = conn._into_ssl
    buffer = _DRAIN.buffer
    parts: list[bytes] = []
    while True:
        n = _lib.BIO_read(bio, buffer, HANDSHAKE_DRAIN)
        if n <= 0:
            return b"".join(parts)
        parts.append(_ffi.buffer(buffer, n)[:])


def count_records(data: bytes) -> int | None:
    """How many application-data records `data` is, exactly; None when it is anything else."""
    pos = count = 0
    while pos < len(data):
        if len(data) - pos < records.HEADER_SIZE or data[pos] != records.APPLICATION_DATA:
            return None
        pos += records.HEADER_SIZE + ((data[pos + 3] << 8) | data[pos + 4])
        count += 1
    return count if pos == len(data) else None

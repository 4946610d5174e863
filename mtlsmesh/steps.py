"""The steps both handlers take on a connection: refuse it, dial its upstream, run the mTLS handshake, and tell
whether its original destination is the listener itself.

What it does: each step that can fail ends the connection's outcome with a `Reason` and a detail (`refuse`,
`dial_or_refuse`) or answers a typed `Failure` for the caller to refuse with once it has closed what it opened
(`open_mtls_or_failure`, which also times the handshake for `mtlsmesh_handshake_duration_seconds`). None of them
touches the decision: that is the handler's to set, once (see `outcome`), so a step fails the same way whichever
direction takes it.

What it does not: decide how a connection is carried (see `outbound`, `inbound`), or accept, count and log
connections (see `runtime`).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from mtlsmesh import handshake, netio, policy, records, sslstream, tls
from mtlsmesh.addresses import IPAddress, unmapped
from mtlsmesh.config import KeyExchange, RecordLayer
from mtlsmesh.errors import HandshakeError
from mtlsmesh.identity import SpiffeId
from mtlsmesh.outcome import Failure, Outcome, Reason
from mtlsmesh.runtime import Runtime

if TYPE_CHECKING:
    from OpenSSL import SSL

# Failures without a varying detail, made once rather than per connection.
HANDSHAKE_TIMEOUT = Failure(Reason.HANDSHAKE_TIMEOUT)
LOOP_TO_LISTENER = Failure(Reason.LOOP, "the original destination is this listener")


async def refuse(stream: trio.abc.Stream, rec: Outcome, reason: Reason, detail: str = "") -> None:
    """End the connection with `reason` and an RST (its connect() succeeded against us; a reset is the honest
    answer). The decision stays what it was. A TLS peer denied after its handshake is told so first: the fatal alert
    access_denied, then our FIN and a short linger so that it reads the alert before any reset
    (`tls.TLSStream.refuse`; with OpenSSL's record layer `sslstream.OpenSSLStream.refuse`)."""
    rec.reason = reason
    rec.detail = detail
    if reason is Reason.DENIED and (type(stream) is tls.TLSStream or type(stream) is sslstream.OpenSSLStream):
        with trio.CancelScope(deadline=trio.current_time() + 2 * tls.REFUSE_LINGER, shield=True):
            await stream.refuse(records.ACCESS_DENIED)
    await netio.abort_close(stream)


async def dial_or_refuse(
    rt: Runtime,
    host: str,
    port: int,
    downstream: trio.abc.Stream,
    rec: Outcome,
    *,
    source: IPAddress | netio.TransparentSource | None = None,
) -> trio.abc.HalfCloseableStream | None:
    """Dial the upstream within `timeouts.connect`. On failure refuse `downstream` with CONNECT_TIMEOUT or
    CONNECT_FAILED (the errno's text as detail) and return None."""
    try:
        return await rt.dial(host, port, timeout=rt.config.timeouts.connect, source=source)
    except trio.TooSlowError:
        await refuse(downstream, rec, Reason.CONNECT_TIMEOUT)
    except OSError as exc:
        await refuse(downstream, rec, Reason.CONNECT_FAILED, netio.describe_error(exc))
    return None


async def open_mtls_or_failure(
    rt: Runtime,
    transport: trio.abc.Stream,
    side: tls.Side,
    *,
    peer: str,
    expected: tuple[SpiffeId, ...] = (),
    prefix: bytes = b"",
    record_layer: RecordLayer = RecordLayer.OWN,
    min_tls_version: str = "1.3",
    require_alpn: bool = True,
) -> tls.TLSStream | sslstream.OpenSSLStream | Failure:
    """The mTLS handshake over `transport` with the current SVID, within `timeouts.handshake`. Returns the checked
    TLS stream, or the failure to refuse with (HANDSHAKE_FAILED with the handshake's error, or HANDSHAKE_TIMEOUT);
    the caller closes what it opened. `prefix`: what the inbound sniffer already read of the peer's first flight.
    An explicit listener's options: `record_layer` (OPENSSL: `sslstream`), `min_tls_version` ("1.2": this
    generation's TLS 1.2 context) and `require_alpn=False` (any standard TLS peer, see `tls.check_peer`). The
    config's `key_exchange: classic` takes the generation's classic twin (`handshake.variant_context`)."""
    current = rt.credentials.current
    context = current.server_context if side is tls.Side.SERVER else current.client_context
    key_exchange = rt.config.key_exchange
    if min_tls_version != "1.3" or key_exchange is not KeyExchange.HYBRID:
        context = handshake.variant_context(
            context, current.material, side, min_version=min_tls_version, key_exchange=key_exchange.value
        )
    opener = sslstream.open_mtls if record_layer is RecordLayer.OPENSSL else tls.open_mtls
    started = trio.current_time()
    result = await _handshake(
        rt, transport, context, side, opener, peer=peer, expected=expected, prefix=prefix, require_alpn=require_alpn
    )
    direction = "inbound" if side is tls.Side.SERVER else "outbound"
    failure = result.reason if isinstance(result, Failure) else None
    rt.stats.count_handshake(direction, trio.current_time() - started, failure)
    return result


async def _handshake(
    rt: Runtime,
    transport: trio.abc.Stream,
    context: SSL.Context,
    side: tls.Side,
    opener: Callable[..., Awaitable[tls.TLSStream | sslstream.OpenSSLStream]],
    *,
    peer: str,
    expected: tuple[SpiffeId, ...],
    prefix: bytes,
    require_alpn: bool,
) -> tls.TLSStream | sslstream.OpenSSLStream | Failure:
    # What trio.fail_after does, without its generator-based context manager (once per connection).
    with trio.CancelScope(deadline=trio.current_time() + rt.config.timeouts.handshake):
        try:
            # send_last=False: our client's Finished leaves with the first request bytes (or as soon as it waits
            # for the server). A server on our records sends no session ticket; on OpenSSL's, its two leave at once.
            return await opener(
                transport,
                context,
                side,
                rt.config.trust_domain,
                expected=expected,
                peer=peer,
                send_last=False,
                prefix=prefix,
                require_alpn=require_alpn,
            )
        except HandshakeError as exc:
            return Failure(Reason.HANDSHAKE_FAILED, exc.reason)
    return HANDSHAKE_TIMEOUT  # the scope can only have ended early by its deadline


def is_own_listener(sock: trio.socket.SocketType, ip: IPAddress, port: int) -> bool:
    """Whether `ip`:`port`, the original destination of a connection accepted on `sock`, is the listener itself:
    dialing it would come back to us, and again. So it is when the port is the listener's and the address is this
    namespace's own: the one the connection arrived on, loopback, unspecified, or any other address bound here (a
    client dialing pod-IP:15006)."""
    listen_port = int(sock.getsockname()[1])
    if port != listen_port:
        return False
    ip = unmapped(ip)
    local = ip == netio.local_ip(sock) or (not ip.is_loopback and not ip.is_unspecified and _is_local_address(ip))
    return policy.loops_to_listener(listen_port, ip, port, local=local)  # what `explain` asks too


def _is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` is one of this namespace's own addresses: binding to it (port 0, no FREEBIND) succeeds only then."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True

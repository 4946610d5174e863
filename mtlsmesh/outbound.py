"""The outbound handler (DESIGN.md §4): an app's captured connection, wrapped in mutual TLS or passed through.

What it does, per accepted connection: find where the app was going (the original destination, or an explicit
listener's `forward_to`); refuse a loop back into this listener; ask `policy.route_outbound` whether the destination
is in the mesh (mTLS), outside it (passthrough under ALLOW_ANY) or refused (REGISTRY_ONLY, reset); dial it with the
connect timeout (failure: reset the app, whose connect() already succeeded against us); for mTLS run the TLS 1.3
client, present our SVID and check the server's SPIFFE ID (secure naming) before any app byte flows; then relay.

What it does not: accept connections or log them (see `runtime`), or know anything about the inbound side.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import trio

from mtlsmesh import netio, policy, tls
from mtlsmesh.errors import HandshakeError
from mtlsmesh.identity import SpiffeId
from mtlsmesh.relay import relay
from mtlsmesh.runtime import DECISION_MTLS, DECISION_PASSTHROUGH, ConnRecord, Runtime, format_addr, refuse


@dataclass(frozen=True, slots=True)
class Target:
    """An explicit listener's fixed destination (originate mode): no original destination, always mTLS."""

    host: str
    port: int
    identities: tuple[SpiffeId, ...] = ()


def _is_loop(app: trio.SocketStream, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    """The original destination is this listener itself: dialing it would come straight back to us."""
    local = netio.local_ip(app.socket)
    local_port = int(app.socket.getsockname()[1])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return port == local_port and (ip == local or ip.is_loopback or ip.is_unspecified)


async def handle_outbound(rt: Runtime, app: trio.SocketStream, rec: ConnRecord, target: Target | None = None) -> None:
    cfg = rt.config
    if target is None:
        try:
            ip, port = rt.orig_dst(app)
        except OSError as exc:
            await refuse(app, rec, f"no_orig_dst: {netio.describe_error(exc)}")
            return
        rec.orig_dst = format_addr(ip, port)
        if _is_loop(app, ip, port):
            await refuse(app, rec, "loop: the original destination is this listener")
            return
        route = policy.route_outbound(cfg.outbound, ip, port)
        if route.kind is policy.RouteKind.REFUSE:
            await refuse(app, rec, f"registry_only: {route.reason}")
            return
        host, identities, mtls = str(ip), route.identities, route.kind is policy.RouteKind.MTLS
    else:
        host, port, identities, mtls = target.host, target.port, target.identities, True
        rec.orig_dst = format_addr(host, port)
    rec.decision = DECISION_MTLS if mtls else DECISION_PASSTHROUGH

    try:
        upstream = await rt.dial(host, port, timeout=cfg.timeouts.connect)
    except trio.TooSlowError:
        await refuse(app, rec, "connect_timeout", decision=rec.decision)
        return
    except OSError as exc:
        await refuse(app, rec, f"connect_failed: {netio.describe_error(exc)}", decision=rec.decision)
        return

    peer: trio.abc.HalfCloseableStream = upstream
    if mtls:
        try:
            with trio.fail_after(cfg.timeouts.handshake):
                peer = await tls.open_mtls(
                    upstream,
                    rt.credentials.current.client_context,
                    tls.Side.CLIENT,
                    cfg.trust_domain,
                    expected=identities,
                    peer=rec.orig_dst,
                )
        except (HandshakeError, trio.TooSlowError) as exc:
            reason = f"handshake: {exc.reason}" if isinstance(exc, HandshakeError) else "handshake_timeout"
            await netio.abort_close(upstream)
            await refuse(app, rec, reason, decision=rec.decision)
            return
        assert isinstance(peer, tls.TLSStream)
        rec.peer_id = str(peer.peer_id)
    result = await relay(app, peer, idle_timeout=cfg.timeouts.idle, downstream_name="app", upstream_name="peer")
    rec.bytes_in, rec.bytes_out = result.downstream_to_upstream, result.upstream_to_downstream
    rec.reason = result.reason

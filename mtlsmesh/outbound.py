"""The outbound handler (DESIGN.md §4): an app's captured connection, wrapped in mutual TLS or passed through.

What it does, per accepted connection: find where the app was going (the original destination, or an explicit
listener's `forward_to`); refuse a loop back into this listener; ask `policy.route_outbound` whether the destination
is in the mesh (mTLS), outside it (passthrough under ALLOW_ANY) or refused (REGISTRY_ONLY, reset); dial it with the
connect timeout (failure: reset the app, whose connect() already succeeded against us); for mTLS run the TLS 1.3
client, present our SVID and check the server's SPIFFE ID (secure naming) before any app byte flows; then relay.

What it does not: accept connections or log them (see `runtime`), or know anything about the inbound side.
"""

from __future__ import annotations

import trio

from mtlsmesh import netio, policy, tls
from mtlsmesh.addresses import IPAddress, host_port, unmapped
from mtlsmesh.config import ExplicitListener
from mtlsmesh.relay import relay
from mtlsmesh.runtime import (
    DECISION_MTLS,
    DECISION_PASSTHROUGH,
    ConnRecord,
    Runtime,
    dial_or_refuse,
    open_mtls_or_reason,
    refuse,
)


def _is_loop(app: trio.SocketStream, ip: IPAddress, port: int) -> bool:
    """The original destination is this listener itself: dialing it would come straight back to us."""
    local = netio.local_ip(app.socket)
    local_port = int(app.socket.getsockname()[1])
    ip = unmapped(ip)
    return port == local_port and (ip == local or ip.is_loopback or ip.is_unspecified)


async def handle_outbound(
    rt: Runtime, app: trio.SocketStream, rec: ConnRecord, explicit: ExplicitListener | None = None
) -> None:
    """Handle one captured connection, or with `explicit` one accepted by that originate listener: no original
    destination (the peer is its `forward_to`), always mTLS, expecting its `identities` (when any)."""
    cfg = rt.config
    if explicit is None:
        try:
            ip, port = rt.orig_dst(app)
        except OSError as exc:
            await refuse(app, rec, f"no_orig_dst: {netio.describe_error(exc)}")
            return
        rec.orig_dst = host_port(ip, port)
        if _is_loop(app, ip, port):
            await refuse(app, rec, "loop: the original destination is this listener")
            return
        route = policy.route_outbound(cfg.outbound, ip, port)
        if route.kind is policy.RouteKind.REFUSE:
            await refuse(app, rec, f"registry_only: {route.reason}")
            return
        host, identities, mtls = str(ip), route.identities, route.kind is policy.RouteKind.MTLS
    else:
        host, port = explicit.forward_to.host, explicit.forward_to.port
        identities, mtls = explicit.identities, True
        rec.orig_dst = host_port(host, port)
    rec.decision = DECISION_MTLS if mtls else DECISION_PASSTHROUGH

    upstream = await dial_or_refuse(rt, host, port, app, rec)
    if upstream is None:
        return

    peer: trio.abc.HalfCloseableStream = upstream
    if mtls:
        opened = await open_mtls_or_reason(rt, upstream, tls.Side.CLIENT, peer=rec.orig_dst, expected=identities)
        if isinstance(opened, str):
            await netio.abort_close(upstream)
            await refuse(app, rec, opened, decision=rec.decision)
            return
        rec.peer_id = str(opened.peer_id)
        peer = opened
    result = await relay(app, peer, idle_timeout=cfg.timeouts.idle, downstream_name="app", upstream_name="peer")
    rec.bytes_in, rec.bytes_out = result.downstream_to_upstream, result.upstream_to_downstream
    rec.reason = result.reason

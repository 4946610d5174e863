"""The outbound handler (docs/ARCHITECTURE.md §4): an app's captured connection, in mutual TLS or passed through.

What it does, per accepted connection: find where the app was going (the original destination, or an explicit
listener's `forward_to`); refuse a loop back into this listener; ask `policy.route_outbound` whether the destination
is in the mesh (mTLS), outside it (passthrough under ALLOW_ANY) or refused (REGISTRY_ONLY, reset); dial it with the
connect timeout (failure: reset the app, whose connect() already succeeded against us); for mTLS run the TLS 1.3
client, present our SVID and check the server's SPIFFE ID (secure naming) before any app byte flows; then relay.
The decision (mtls or passthrough) is recorded once the route is known, before the dial (see `outcome`).

What it does not: accept connections or log them (see `runtime`), or know anything about the inbound side.
"""

from __future__ import annotations

import trio

from mtlsmesh import netio, policy, tls
from mtlsmesh.addresses import host_port
from mtlsmesh.config import ExplicitListener
from mtlsmesh.outcome import Decision, Failure, Reason
from mtlsmesh.relay import relay
from mtlsmesh.runtime import ConnRecord, Runtime, count_carried
from mtlsmesh.steps import LOOP_TO_LISTENER, dial_or_refuse, is_own_listener, open_mtls_or_failure, refuse


async def handle_outbound(
    rt: Runtime, app: trio.SocketStream, rec: ConnRecord, explicit: ExplicitListener | None = None
) -> None:
    """Handle one captured connection, or with `explicit` one accepted by that originate listener: no original
    destination (the peer is its `forward_to`), always mTLS, expecting its `identities` (when any), to any standard
    mTLS server (it offers ALPN mtlsmesh, for a sidecar's capture listener, and accepts any answer or none)."""
    cfg = rt.config
    if explicit is None:
        try:
            ip, port = rt.orig_dst(app)
        except OSError as exc:
            await refuse(app, rec, Reason.NO_ORIG_DST, netio.describe_error(exc))
            return
        rec.orig_dst = host_port(ip, port)
        if is_own_listener(app.socket, ip, port):
            await refuse(app, rec, LOOP_TO_LISTENER.reason, LOOP_TO_LISTENER.detail)
            return
        route = policy.route_outbound(cfg.outbound, ip, port)
        if route.kind is policy.RouteKind.REFUSE:
            await refuse(app, rec, Reason.REGISTRY_ONLY, route.reason)
            return
        host, identities, mtls = str(ip), route.identities, route.kind is policy.RouteKind.MTLS
    else:
        host, port = explicit.forward_to.host, explicit.forward_to.port
        identities, mtls = explicit.identities, True
        rec.orig_dst = host_port(host, port)
    rec.decision = Decision.MTLS if mtls else Decision.PASSTHROUGH

    upstream = await dial_or_refuse(rt, host, port, app, rec)
    if upstream is None:
        return

    peer: trio.abc.HalfCloseableStream = upstream
    if mtls:
        opened = await open_mtls_or_failure(
            rt,
            upstream,
            tls.Side.CLIENT,
            peer=rec.orig_dst,
            expected=identities,
            record_layer=cfg.record_layer if explicit is None else explicit.records(cfg.record_layer),
            min_tls_version="1.3" if explicit is None else explicit.min_tls_version,
            require_alpn=explicit is None,  # an explicit listener's server may be any mTLS server
        )
        if isinstance(opened, Failure):
            await netio.abort_close(upstream)
            await refuse(app, rec, opened.reason, opened.detail)
            return
        rec.peer_id = opened.peer_id
        peer = opened
    count_carried(rt, rec)
    result = await relay(
        app,
        peer,
        idle_timeout=cfg.timeouts.idle,
        downstream_reset=Reason.RESET_BY_APP,
        upstream_reset=Reason.RESET_BY_PEER,
    )
    rec.bytes_in, rec.bytes_out = result.downstream_to_upstream, result.upstream_to_downstream
    rec.reason, rec.detail = result.reason, result.detail

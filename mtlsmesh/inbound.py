"""The inbound handler (docs/ARCHITECTURE.md §5): a captured connection to a local app, authenticated and authorized.

What it does, per accepted connection: find the app's address (the original destination, or an explicit listener's
`forward_to`); unless the port is server-first or its mode is DISABLE, sniff the first bytes (up to
`sniff.MAX_CLIENT_HELLO`, within `sniff_timeout`) and keep them, so nothing is lost whichever way it goes; a
ClientHello offering ALPN `mtlsmesh` is mesh traffic: the bytes are handed to a TLS 1.3 server that requires the
caller's SVID (which reads them first); anything else is passed through in PERMISSIVE (the app gets them first) and
refused in STRICT. Then the authorization policy decides on (caller, port) (a plaintext caller is None), the app is
dialed from `inbound.app_source` (127.0.0.6) so the dial is not captured again, and the two are relayed. With
`inbound.interception_mode: TPROXY` the original destination is the accepted socket's own address and the app is
dialed from the caller's own address (transparent and marked, docs/ARCHITECTURE.md §3), so the app sees the caller. The
decision (mtls or passthrough) is recorded once the sniff or the port's mode has told which it is, before the
handshake (see `outcome`).

What it does not: accept connections or log them (see `runtime`), or know anything about the outbound side.
A server-first port is never sniffed and carries mesh mTLS only, in PERMISSIVE as in STRICT (`policy.route_inbound`
says why); a plaintext caller of it sends no ClientHello and is reset at `timeouts.handshake`.
An explicit terminate listener is never sniffed: its socket goes straight to the TLS server, which takes any ALPN
(or none) and the listener's `min_tls_version` and `record_layer`.
"""

from __future__ import annotations

import ipaddress

import trio

from mtlsmesh import netio, policy, sniff, tls
from mtlsmesh.addresses import IPAddress, host_port, ipv6_twin, unmapped
from mtlsmesh.config import ExplicitListener, Mode, RecordLayer
from mtlsmesh.conventions import MESH_ALPN, TPROXY_MARK, InterceptionMode
from mtlsmesh.outcome import Decision, Failure, Reason
from mtlsmesh.relay import relay
from mtlsmesh.runtime import ConnRecord, Runtime, count_carried
from mtlsmesh.steps import LOOP_TO_LISTENER, dial_or_refuse, is_own_listener, open_mtls_or_failure, refuse

SNIFF_READ = 4096  # bytes per read while sniffing; a typical mesh ClientHello (with an ML-KEM share) is ~1.4 KB
LOOP_FROM_APP_SOURCE = Failure(Reason.LOOP, "connection from the app source address")


def loop_reason(
    downstream: trio.SocketStream, app_source: IPAddress | None, ip: IPAddress, port: int, *, tproxied: bool = False
) -> Failure | None:
    """Why a captured inbound connection would loop back into this listener (a LOOP failure), or None.

    Two ways, both seen under the capture rules (docs/ARCHITECTURE.md §3): the peer is `app_source` (our own dial to
    the app is exempt from capture only from that address, so a connection from it that reached the inbound listener
    is one of ours coming back: legitimate callers never use it); or the original destination is this listener itself
    on a local address (a client dialing pod-IP:15006: passing it through would dial 15006 again, and again).
    `tproxied`: TPROXY handed the connection over unchanged, so the accepted socket's own address is the app's and
    says nothing about this listener."""
    try:
        peer: IPAddress | None = unmapped(ipaddress.ip_address(downstream.socket.getpeername()[0]))
    except (OSError, ValueError):
        peer = None
    # netio dials an IPv6 app from the IPv6 twin of the app source (::6 for 127.0.0.6, docs/ARCHITECTURE.md §3).
    if peer is not None and app_source is not None and peer in (app_source, ipv6_twin(app_source)):
        return LOOP_FROM_APP_SOURCE
    return LOOP_TO_LISTENER if not tproxied and is_own_listener(downstream.socket, ip, port) else None


def _destination(rt: Runtime, downstream: trio.SocketStream) -> tuple[IPAddress, int]:
    """TPROXY: the accepted socket's own address is where the client was going; a connection REDIRECTed to the
    listener by the nat rules (the outbound sidecar calling its own pod: its local port is the listener's) has its
    original destination in conntrack, as in REDIRECT mode."""
    ip, port = netio.transparent_dst(downstream)
    return rt.orig_dst(downstream) if port == rt.config.inbound.listen.port else (ip, port)


def _app_source(rt: Runtime, downstream: trio.SocketStream) -> IPAddress | netio.TransparentSource | None:
    """TPROXY: dial the app from the caller's own address (transparent, marked: the rules bring the replies back).
    A caller inside the pod (the outbound sidecar's REDIRECTed call to its own pod, from a local address) has no
    foreign address to keep: it is dialed from the app source, as in REDIRECT mode."""
    try:
        peer = unmapped(ipaddress.ip_address(downstream.socket.getpeername()[0]))
        local = netio.local_ip(downstream.socket)
    except (OSError, ValueError):
        return rt.config.inbound.app_source
    if local.is_loopback or peer.is_loopback or peer == local:
        return rt.config.inbound.app_source
    return netio.TransparentSource(peer, TPROXY_MARK)


async def sniff_stream(stream: trio.SocketStream, timeout: float) -> tuple[bytes, sniff.Sniff | None, Reason | None]:
    """Read until the sniffer decides. Returns the bytes read (to hand on), the verdict, and when there is none,
    why: SNIFF_TIMEOUT (the peer went quiet, or took longer than `timeout` in all), CLOSED_DURING_SNIFF (EOF) or
    CLIENT_HELLO_TOO_LARGE. `timeout` is a hard limit on the whole sniff: a read that did not wait takes a
    checkpoint, where the deadline is enforced, so a peer that dribbles bytes can neither outlive it nor hold the
    loop (and the sniffer is incremental: each byte is looked at once)."""
    buffer = bytearray()
    sniffer = sniff.Sniffer()
    # What has arrived by now is judged before the timer is set: a mesh client sends its ClientHello right after
    # connecting, so under load the whole of it is nearly always there already (no wait, no timer).
    first = netio.read_ready(stream, SNIFF_READ)
    if first is not None:
        judged = _judge(sniffer, buffer, first)
        if judged is not None:
            return judged
    with trio.CancelScope(deadline=trio.current_time() + timeout):  # move_on_after, minus its wrapper
        while len(buffer) < sniff.MAX_CLIENT_HELLO:
            want = min(SNIFF_READ, sniff.MAX_CLIENT_HELLO - len(buffer))
            data, waited = await netio.receive_raw(stream, want)  # no checkpoint when the bytes are there
            judged = _judge(sniffer, buffer, data)
            if judged is not None:
                return judged
            if not waited:
                await trio.lowlevel.checkpoint()  # fairness, and where the deadline cancels a steady dribble
        return bytes(buffer), None, Reason.CLIENT_HELLO_TOO_LARGE
    return bytes(buffer), None, Reason.SNIFF_TIMEOUT


def _judge(
    sniffer: sniff.Sniffer, buffer: bytearray, data: bytes | bytearray
) -> tuple[bytes, sniff.Sniff | None, Reason | None] | None:
    """Add `data` (b"": EOF) to what was sniffed so far; the answer of `sniff_stream` once there is one."""
    if not data:
        return bytes(buffer), None, Reason.CLOSED_DURING_SNIFF
    buffer += data
    verdict = sniffer.feed(data)
    if verdict.state is not sniff.SniffState.NEED_MORE:
        return bytes(buffer), verdict, None
    return None


async def handle_inbound(
    rt: Runtime, downstream: trio.SocketStream, rec: ConnRecord, explicit: ExplicitListener | None = None
) -> None:
    """Handle one captured connection, or with `explicit` one accepted by that terminate listener: no original
    destination (the app is its `forward_to`), always STRICT mTLS with no sniffing (any standard TLS client with a
    valid SVID, whatever ALPN it offers), only its `identities` let through (when any)."""
    cfg = rt.config
    tproxy = explicit is None and cfg.inbound.interception_mode is InterceptionMode.TPROXY
    if explicit is None:
        try:
            ip, port = _destination(rt, downstream) if tproxy else rt.orig_dst(downstream)
        except OSError as exc:
            await refuse(downstream, rec, Reason.NO_ORIG_DST, netio.describe_error(exc))
            return
        app_host = str(ip)
        tproxied = tproxy and netio.transparent_dst(downstream)[1] != cfg.inbound.listen.port
        looping = loop_reason(downstream, cfg.inbound.app_source, ip, port, tproxied=tproxied)
        if looping is not None:
            rec.orig_dst = host_port(app_host, port)
            await refuse(downstream, rec, looping.reason, looping.detail)
            return
        mode, server_first = cfg.inbound.port_mode(port), cfg.inbound.is_server_first(port)
    else:
        app_host, port = explicit.forward_to.host, explicit.forward_to.port
        mode, server_first = Mode.STRICT, False
    rec.orig_dst = host_port(app_host, port)

    prefix = b""
    hello: bool | None = None  # not sniffed: DISABLE, or server-first (it must be mTLS, the handshake tells)
    verdict: sniff.Sniff | None = None
    no_verdict: Reason | None = None
    if explicit is not None:
        hello = True  # nothing between the socket and OpenSSL: any TLS client, and OpenSSL's alert for a bad one
    elif policy.sniffs(mode, server_first):
        try:
            prefix, verdict, no_verdict = await sniff_stream(downstream, cfg.inbound.sniff_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await refuse(downstream, rec, Reason.RESET_BY_PEER, f"during sniff: {exc}")
            return
        hello = verdict is not None and sniff.is_mesh(verdict)
    route = policy.route_inbound(mode, server_first, hello)
    if route.kind is policy.InboundKind.REFUSE:  # STRICT and not mesh mTLS: say what it was instead
        if verdict is None:
            assert no_verdict is not None
            await refuse(downstream, rec, no_verdict, f"{len(prefix)} bytes, no complete ClientHello")
        elif verdict.state is sniff.SniffState.CLIENT_HELLO:
            alpn = ",".join(verdict.alpn) or "none"
            await refuse(downstream, rec, Reason.NOT_MESH, f"TLS without ALPN {MESH_ALPN} (alpn={alpn})")
        else:
            await refuse(downstream, rec, Reason.NOT_MESH, verdict.reason or "not TLS")
        return
    mesh = route.kind is policy.InboundKind.MTLS
    rec.decision = Decision.MTLS if mesh else Decision.PASSTHROUGH
    front: trio.abc.HalfCloseableStream = downstream
    caller = None
    if mesh:
        records = cfg.record_layer if explicit is None else explicit.records(cfg.record_layer)
        # With OpenSSL's record layer a listener's `identities` are checked inside the handshake (the verify callback
        # refuses with bad_certificate, on TLS 1.3 and 1.2 alike). Our own records check them after it and say
        # access_denied (below).
        inside = explicit is not None and records is RecordLayer.OPENSSL
        opened = await open_mtls_or_failure(
            rt,
            downstream,
            tls.Side.SERVER,
            peer=rec.client_addr,
            expected=explicit.identities if inside and explicit is not None else (),
            prefix=prefix,
            record_layer=records,
            min_tls_version="1.3" if explicit is None else explicit.min_tls_version,
            require_alpn=explicit is None,
        )
        prefix = b""  # the handshake has it; this frame lives as long as the connection
        if isinstance(opened, Failure):
            await refuse(downstream, rec, opened.reason, opened.detail)
            return
        caller = rec.peer_id = opened.peer_id
        front = opened
        admitted = policy.listener_admits(explicit.identities, caller) if explicit is not None else None
        if admitted is not None and not admitted.allowed:  # what `explain --listener` asks too
            await refuse(front, rec, Reason.DENIED, admitted.reason)
            return

    authz = policy.authorize(cfg.authorization, caller, port)
    if not authz.allowed:
        await refuse(front, rec, Reason.DENIED, authz.reason)
        return

    source = _app_source(rt, downstream) if tproxy else cfg.inbound.app_source if explicit is None else None
    app = await dial_or_refuse(rt, app_host, port, front, rec, source=source)
    if app is None:
        return
    if prefix:  # passthrough: what the sniffer read goes to the app before anything else
        try:
            await app.send_all(prefix)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await netio.abort_close(app)
            await refuse(front, rec, Reason.RESET_BY_APP, str(exc))
            return
    count_carried(rt, rec)
    result = await relay(
        front,
        app,
        idle_timeout=cfg.timeouts.idle,
        downstream_reset=Reason.RESET_BY_PEER,
        upstream_reset=Reason.RESET_BY_APP,
    )
    rec.bytes_in = len(prefix) + result.downstream_to_upstream
    rec.bytes_out = result.upstream_to_downstream
    rec.reason, rec.detail = result.reason, result.detail

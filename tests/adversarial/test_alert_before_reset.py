"""A refused peer reads why before the connection ends: the alert, then our FIN, then (only if it keeps talking past
a short linger, or stays) a reset. The peer is Python's `ssl` (OpenSSL, driven by code we did not write), which,
like many clients, writes before it reads: if our reset came straight after the alert, its write would fail with a
reset and it would never read the alert.

Each case: the client completes its handshake, is refused (a record the network corrupted, its identity, the
authorization policy), goes on writing for a while as a client with a request to send does, then reads: it must
see the alert named, not a reset.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import pytest
import trio

from mtlsmesh import handshake, tls
from mtlsmesh.config import Action, AuthzRule, RecordLayer
from mtlsmesh.identity import TrustDomain
from tests.adversarial.peer import sidecar_in_front_of_an_app
from tests.integration.mesh import LOOPBACK, conn_lines
from tests.integration.test_record_interop import Corrupter, forward, stdlib_context
from tests.pki import TD, Pki, material_for

IO = 20.0
TALK = 20  # writes of 1 KiB the client makes after it was refused, 10 ms apart: well inside the linger's budget


def _unarmed() -> None:
    pass


def client_script(refused_after: bytes, armed: Callable[[], None] = _unarmed) -> Callable[[ssl.SSLSocket], str]:
    """Send `refused_after` (after `armed()`), keep writing, then read: the SSL error's reason, or what happened."""

    def script(conn: ssl.SSLSocket) -> str:
        if armed is not _unarmed:  # a round trip first: the record to corrupt is well behind the handshake
            conn.sendall(b"first")
            assert conn.recv(5) == b"first"
        armed()
        conn.sendall(refused_after)
        try:
            for _ in range(TALK):
                conn.sendall(bytes(1024))
                time.sleep(0.01)
            while conn.recv(65536):
                pass
        except ssl.SSLError as exc:
            return str(exc.reason)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "end of stream without an alert"

    return script


def run_client(port: int, ctx: ssl.SSLContext, script: Callable[[ssl.SSLSocket], str]) -> str:
    with socket.create_connection((LOOPBACK, port), timeout=IO / 2) as raw, ctx.wrap_socket(raw) as conn:
        assert conn.version() == "TLSv1.3"  # wrap_socket has done the handshake
        return script(conn)


async def test_a_corrupted_record_is_answered_with_bad_record_mac_and_the_client_reads_it(pki: Pki) -> None:
    ctx = stdlib_context(pki.issue("alice"), server=False)
    corrupter = Corrupter()
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki) as target, trio.open_nursery() as nursery:
            # A TCP relay between the client and the sidecar that flips a bit of the client's next record once armed.
            listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
            proxy_port = listener.socket.getsockname()[1]

            async def proxy() -> None:
                down = await listener.accept()
                up = await trio.open_tcp_stream(LOOPBACK, target.port)
                async with trio.open_nursery() as inner:
                    inner.start_soon(forward, down, up, corrupter)
                    inner.start_soon(forward, up, down, None)
                await down.aclose()
                await up.aclose()

            nursery.start_soon(proxy)

            def arm() -> None:
                corrupter.armed = True

            said = await trio.to_thread.run_sync(run_client, proxy_port, ctx, client_script(b"corrupted", arm))
            await listener.aclose()
    assert corrupter.flipped == 1
    assert said == "SSLV3_ALERT_BAD_RECORD_MAC", said
    assert target.received == [b"first"]  # and nothing after the corrupted record


@pytest.mark.parametrize("layer", list(RecordLayer), ids=lambda layer: layer.value)
async def test_a_caller_the_policy_denies_reads_access_denied(
    pki: Pki, caplog: pytest.LogCaptureFixture, layer: RecordLayer
) -> None:
    ctx = stdlib_context(pki.issue("alice"), server=False)
    deny = (AuthzRule(Action.DENY, (str(pki.id_of("alice")),)),)
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki, authorization=deny, record_layer=layer) as target:
            said = await trio.to_thread.run_sync(run_client, target.port, ctx, client_script(b"request"))
            await trio.sleep(0.2)  # the connection's log line
    assert said == "TLSV1_ALERT_ACCESS_DENIED", said
    assert target.received == []
    lines = conn_lines(caplog.records, "inbound")
    assert len(lines) == 1 and " reason=denied " in lines[0], lines


@pytest.mark.parametrize(
    ("case", "trust_domain", "expected", "alert"),
    [
        ("not an expected identity", TD, "bob", "TLSV1_ALERT_ACCESS_DENIED"),
        ("not in our trust domain", TrustDomain("other.example"), None, "SSLV3_ALERT_BAD_CERTIFICATE"),
    ],
)
async def test_a_client_refused_after_its_handshake_reads_why(
    pki: Pki, case: str, trust_domain: TrustDomain, expected: str | None, alert: str
) -> None:
    ctx = stdlib_context(pki.issue("alice"), server=False)
    server_ctx = handshake.build_context(material_for(pki.authority, pki.id_of("server")), tls.Side.SERVER)
    refusals: list[str] = []
    with trio.fail_after(IO):
        listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
        port = listener.socket.getsockname()[1]

        async def serve() -> None:
            transport = await listener.accept()
            try:
                await tls.open_mtls(
                    transport,
                    server_ctx,
                    tls.Side.SERVER,
                    trust_domain,
                    expected=() if expected is None else (pki.id_of(expected),),
                )
            except tls.PeerRefused as exc:
                refusals.append(exc.reason)
            finally:
                await trio.aclose_forcefully(transport)  # what the sidecar does after a refusal: a reset if need be

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            said = await trio.to_thread.run_sync(run_client, port, ctx, client_script(b"request"))
        await listener.aclose()
    assert len(refusals) == 1, refusals
    assert said == alert, f"{case}: {said}"

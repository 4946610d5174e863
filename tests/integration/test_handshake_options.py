"""`handshake.build_context`'s keywords for the CA service: ALPN http/1.1, an optional client certificate, a client
that presents none. Real handshakes between two TLS streams; the defaults keep what the sidecars negotiate.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
from OpenSSL import SSL
from trio.testing import memory_stream_pair

from mtlsmesh import ca, handshake, tls
from mtlsmesh.errors import HandshakeError
from mtlsmesh.identity import workload_id
from tests.pki import TD, material_for

NOW = datetime.now(UTC)
IO = 10.0
HTTP = b"http/1.1"


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.create_ca(TD, now=NOW - timedelta(days=1))


@pytest.fixture(scope="module")
def server_material(authority: ca.Authority) -> handshake.Material:
    return material_for(authority, workload_id(TD, "mtlsmesh-system", "mtlsmesh-ca"))


async def run_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[tls.TLSStream, tls.TLSStream, str]:
    """Handshake both ends and move one request and one answer (a refusal by the server reaches a TLS 1.3 client
    at its first read). Returns the two streams and the client's error ("" when the exchange worked)."""
    a, b = memory_stream_pair()
    client = tls.TLSStream(a, client_ctx, tls.Side.CLIENT, "server")
    server = tls.TLSStream(b, server_ctx, tls.Side.SERVER, "client")
    error = ""
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                try:
                    await server.do_handshake()
                    assert await server.receive_some() == b"ping"
                    await server.send_all(b"pong")
                except (HandshakeError, trio.BrokenResourceError):
                    await server.aclose()

            nursery.start_soon(serve)
            try:
                await client.send_all(b"ping")
                assert await client.receive_some() == b"pong"
            except (HandshakeError, trio.BrokenResourceError) as exc:
                error = str(exc)
    return client, server, error


def ca_server(material: handshake.Material) -> SSL.Context:
    return handshake.build_context(material, tls.Side.SERVER, alpn=(HTTP,), require_peer_certificate=False)


async def test_a_client_without_a_certificate_and_without_alpn_is_served(
    authority: ca.Authority, server_material: handshake.Material
) -> None:
    client_ctx = handshake.build_context(None, tls.Side.CLIENT, roots=authority.roots, alpn=())
    client, server, error = await run_pair(client_ctx, ca_server(server_material))
    assert error == ""
    assert client.alpn() is None and server.alpn() is None


async def test_http11_is_chosen_among_what_the_client_offers(
    authority: ca.Authority, server_material: handshake.Material
) -> None:
    client_ctx = handshake.build_context(None, tls.Side.CLIENT, roots=authority.roots, alpn=(b"h2", HTTP))
    client, _, error = await run_pair(client_ctx, ca_server(server_material))
    assert error == ""
    assert client.alpn() == HTTP


async def test_a_client_offering_only_other_protocols_gets_no_alpn(
    authority: ca.Authority, server_material: handshake.Material
) -> None:
    # pyOpenSSL answers "no overlap" with SSL_TLSEXT_ERR_NOACK: the handshake goes on without ALPN, which the CA
    # serves as HTTP/1.1 like a client that offers none (the sidecars refuse it after the handshake instead).
    client_ctx = handshake.build_context(None, tls.Side.CLIENT, roots=authority.roots, alpn=(b"h2",))
    client, server, error = await run_pair(client_ctx, ca_server(server_material))
    assert error == ""
    assert client.alpn() is None and server.alpn() is None


async def test_an_optional_client_certificate_is_still_verified(
    authority: ca.Authority, server_material: handshake.Material
) -> None:
    good = material_for(authority, workload_id(TD, "default", "reviews"))
    client_ctx = handshake.build_context(good, tls.Side.CLIENT, alpn=(HTTP,))
    seen: list[bytes | None] = []
    a, b = memory_stream_pair()
    client = tls.TLSStream(a, client_ctx, tls.Side.CLIENT)
    server = tls.TLSStream(b, ca_server(server_material), tls.Side.SERVER)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server.do_handshake(lambda: seen.append(server.peer_certificate_der()))
    assert seen and seen[0] is not None and seen[0] == good.chain[0].public_bytes(ca.pem.serialization.Encoding.DER)

    stranger = ca.create_ca(TD, now=NOW - timedelta(days=1))
    theirs = material_for(stranger, workload_id(TD, "default", "reviews"))
    forged = handshake.Material(theirs.chain, theirs.key, authority.roots)  # trusts the server, is not trusted by it
    forged_ctx = handshake.build_context(forged, tls.Side.CLIENT, alpn=(HTTP,))
    *_, error = await run_pair(forged_ctx, ca_server(server_material))
    assert "unknown ca" in error


async def test_the_default_server_still_requires_a_client_certificate(
    authority: ca.Authority, server_material: handshake.Material
) -> None:
    server_ctx = handshake.build_context(server_material, tls.Side.SERVER)
    client_ctx = handshake.build_context(None, tls.Side.CLIENT, roots=authority.roots)
    *_, error = await run_pair(client_ctx, server_ctx)
    assert "certificate required" in error


def test_a_server_needs_a_certificate_and_roots_come_from_one_place(server_material: handshake.Material) -> None:
    with pytest.raises(ValueError, match="must present a certificate"):
        handshake.build_context(None, tls.Side.SERVER)
    with pytest.raises(ValueError, match="roots come from the material"):
        handshake.build_context(server_material, tls.Side.CLIENT, roots=server_material.roots)

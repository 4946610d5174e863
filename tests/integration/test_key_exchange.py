"""`key_exchange: hybrid | classic`: which group real handshakes negotiate, between two contexts and through a
sidecar's listener. The hybrid post-quantum group is the default wherever this OpenSSL has it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
from OpenSSL import SSL
from trio.testing import memory_stream_pair

from mtlsmesh import ca, handshake, tls
from mtlsmesh.config import ExplicitListener, ExplicitMode, KeyExchange, ListenAddr
from mtlsmesh.credentials import load_credentials
from mtlsmesh.identity import workload_id
from tests.integration.mesh import ANY_PORT, LOOPBACK, app_server, base_config, connect, echo, running_sidecar
from tests.pki import TD, Pki, material_for

NOW = datetime.now(UTC)
IO = 10.0
HAS_HYBRID = handshake.GROUPS == handshake.PQ_GROUPS
CLASSIC = "x25519"  # what a classic-only handshake picks (first in CLASSIC_GROUPS), as OpenSSL names it
HYBRID = "X25519MLKEM768"  # the hybrid group, as OpenSSL names it


@pytest.fixture(scope="module")
def materials() -> tuple[handshake.Material, handshake.Material]:
    authority = ca.create_ca(TD, now=NOW - timedelta(days=1))
    return (
        material_for(authority, workload_id(TD, "default", "client")),
        material_for(authority, workload_id(TD, "default", "server")),
    )


async def negotiated_group(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[str | None, str | None]:
    """Both ends' view of the group after a full handshake and one byte each way."""
    a, b = memory_stream_pair()
    client = tls.TLSStream(a, client_ctx, tls.Side.CLIENT)
    server = tls.TLSStream(b, server_ctx, tls.Side.SERVER)
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                assert await server.receive_some() == b"?"
                await server.send_all(b"!")

            nursery.start_soon(serve)
            await client.send_all(b"?")
            assert await client.receive_some() == b"!"
    return client.negotiated[2], server.negotiated[2]


@pytest.mark.parametrize(
    ("client_kx", "server_kx", "group"),
    [
        ("hybrid", "hybrid", HYBRID if HAS_HYBRID else CLASSIC),  # without the hybrid group, X25519 comes first
        ("classic", "classic", CLASSIC),
        ("classic", "hybrid", CLASSIC),  # the server takes what the client offers
        ("hybrid", "classic", CLASSIC),  # the server asks for X25519 (HelloRetryRequest when the hybrid came first)
    ],
)
async def test_the_negotiated_group_follows_the_key_exchange(
    materials: tuple[handshake.Material, handshake.Material], client_kx: str, server_kx: str, group: str | None
) -> None:
    client_material, server_material = materials
    client_ctx = handshake.build_context(client_material, tls.Side.CLIENT, key_exchange=client_kx)
    server_ctx = handshake.build_context(server_material, tls.Side.SERVER, key_exchange=server_kx)
    assert await negotiated_group(client_ctx, server_ctx) == (group, group)


async def test_the_hybrid_group_is_the_default_where_openssl_has_it(
    materials: tuple[handshake.Material, handshake.Material],
) -> None:
    if not HAS_HYBRID:
        pytest.skip("this OpenSSL has no X25519MLKEM768")
    client_material, server_material = materials
    contexts = (  # no key_exchange given: the default
        handshake.build_context(client_material, tls.Side.CLIENT),
        handshake.build_context(server_material, tls.Side.SERVER),
    )
    assert await negotiated_group(*contexts) == (HYBRID, HYBRID)


def test_a_bad_key_exchange_is_refused(materials: tuple[handshake.Material, handshake.Material]) -> None:
    with pytest.raises(ValueError, match="key_exchange must be one of hybrid, classic"):
        handshake.build_context(materials[0], tls.Side.CLIENT, key_exchange="kyber")


def test_variants_are_made_once_per_generation(materials: tuple[handshake.Material, handshake.Material]) -> None:
    material = materials[1]
    generation = handshake.build_context(material, tls.Side.SERVER)
    assert handshake.variant_context(generation, material, tls.Side.SERVER) is generation
    classic = handshake.variant_context(generation, material, tls.Side.SERVER, key_exchange="classic")
    assert classic is not generation
    assert handshake.variant_context(generation, material, tls.Side.SERVER, key_exchange="classic") is classic
    tls12 = handshake.variant_context(generation, material, tls.Side.SERVER, min_version="1.2", key_exchange="classic")
    assert tls12 is not classic and handshake.tls12_context(generation, material, tls.Side.SERVER) is not tls12


@pytest.mark.parametrize("key_exchange", list(KeyExchange), ids=lambda k: k.value)
async def test_a_sidecar_listener_negotiates_its_configured_key_exchange(pki: Pki, key_exchange: KeyExchange) -> None:
    """A terminate listener of a real sidecar, called by a client that offers the hybrid group first: the group the
    client ends up with is the sidecar's choice."""
    client_ctx = load_credentials(pki.issue("api"), TD).client_context  # the default: hybrid first
    async with app_server(echo) as (app_port, _):
        terminate = ExplicitListener("db", ANY_PORT, ListenAddr(LOOPBACK, app_port), ExplicitMode.TERMINATE)
        cfg = base_config(pki.issue("db"), explicit=(terminate,), key_exchange=key_exchange)
        with trio.fail_after(IO):
            async with running_sidecar(cfg) as (_rt, state):
                transport = await connect(state.bound["db"][1])
                stream = await tls.open_mtls(transport, client_ctx, tls.Side.CLIENT, TD, require_alpn=False)
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
                await stream.aclose()
    group = stream.negotiated[2]
    if key_exchange is KeyExchange.CLASSIC:
        assert group == CLASSIC
    elif HAS_HYBRID:
        assert group == "X25519MLKEM768"
    else:
        assert group == CLASSIC

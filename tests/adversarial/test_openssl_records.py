"""`record_layer: openssl` refuses and names what a peer got wrong as our own record layer does.

The peer is real: a TLS 1.3 client that completes its handshake with the sidecar and then sends crafted records
(`peer.Peer`). A record OpenSSL refuses is answered with OpenSSL's alert, and the connection's log line names its
end after that alert (`bad_record_mac`, ...), not `reset_by_peer`; a fatal alert the peer sends ends it as
`reset_by_peer` with the detail our own records give ("peer sent alert ..."), on both record paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import trio

from mtlsmesh import records
from mtlsmesh.config import RecordLayer
from tests.adversarial.peer import Peer, header, open_peer, round_trip, sidecar_in_front_of_an_app
from tests.adversarial.test_records_attack import flipped_tag
from tests.integration.mesh import conn_lines
from tests.pki import Pki

IO = 20.0

# What OpenSSL's record layer refuses, with the alert it answers (the same as ours for each of these).
VIOLATIONS: list[tuple[str, Callable[[Peer], bytes], int, str]] = [
    ("bad tag", flipped_tag, records.BAD_RECORD_MAC, "bad_record_mac"),
    ("replayed record", lambda p: (lambda r: r + r)(p.seal(b"\x17")), records.BAD_RECORD_MAC, "bad_record_mac"),
    ("oversized record", lambda p: header(records.MAX_CIPHERTEXT + 1) + bytes(100), 22, "record_overflow"),
    ("ClientHello after the handshake", lambda p: p.seal(b"\x01\x00\x00\x00\x16"), 10, "unexpected_message"),
    ("KeyUpdate value 2", lambda p: p.seal(b"\x18\x00\x00\x01\x02\x16"), 47, "illegal_parameter"),
]


@pytest.mark.parametrize(("case", "make", "alert", "reason"), VIOLATIONS, ids=[c[0] for c in VIOLATIONS])
async def test_a_record_openssl_refuses_is_named_after_its_alert(
    pki: Pki, caplog: pytest.LogCaptureFixture, case: str, make: Callable[[Peer], bytes], alert: int, reason: str
) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki, record_layer=RecordLayer.OPENSSL) as target:
            peer = await open_peer(pki, target.port)
            await peer.send(peer.data(b"first"))
            await peer.send(make(peer))
            got, how = await peer.alert_then_end()
            assert got == alert, f"{case}: alert {got}, ended by {how}"
            assert how == "eof", how  # our FIN after the alert, not a reset: the peer stayed quiet
            await peer.stream.aclose()
            assert await round_trip(pki, target.port, b"still served") == b"still served"
            await trio.sleep(0.2)  # the hostile connection's log line
    assert target.received[-1] == b"still served"
    lines = [line for line in conn_lines(caplog.records, "inbound") if "mallory" in line]
    assert len(lines) == 1 and re.search(rf" reason={reason}( |$)", lines[0]), lines


@pytest.mark.parametrize("layer", list(RecordLayer), ids=lambda layer: layer.value)
async def test_a_fatal_alert_from_the_peer_is_a_reset_by_peer_that_names_the_alert(
    pki: Pki, caplog: pytest.LogCaptureFixture, layer: RecordLayer
) -> None:
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki, record_layer=layer) as target:
            peer = await open_peer(pki, target.port)
            await peer.send(peer.data(b"first") + peer.seal(bytes((2, records.ACCESS_DENIED, 21))))
            await peer.read_to_end()
            await peer.stream.aclose()
            await trio.sleep(0.2)  # the connection's log line
    assert target.received == [b"first"]
    lines = [line for line in conn_lines(caplog.records, "inbound") if "mallory" in line]
    assert len(lines) == 1, lines
    assert ' reason=reset_by_peer detail="peer sent alert access denied"' in lines[0], lines

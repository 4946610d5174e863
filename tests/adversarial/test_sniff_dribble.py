"""An unauthenticated caller that dribbles its ClientHello, one byte per segment, against a real sidecar's sniffer.

Two ways: a 32 KB ClientHello in one-byte records (refused once it takes more than `sniff.MAX_RECORDS` records),
and a ClientHello whose records are fine but whose bytes come one at a time for longer than `sniff_timeout` (ended
at the deadline, a hard wall-clock limit: a sniff that keeps finding bytes must not outlive it). Both must cost the
event loop little CPU (the sniffer looks at each byte once) and leave other connections served meanwhile.
The dribble comes from a thread (TCP_NODELAY, one send per byte), bounded in bytes and in time.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time

import pytest
import trio

from tests.adversarial.peer import round_trip, sidecar_in_front_of_an_app
from tests.integration.mesh import LOOPBACK
from tests.pki import Pki
from tests.unit.test_sniff import ext, handshake, hello_body, records

IO = 30.0
SNIFF_TIMEOUT = 1.0  # what sidecar_in_front_of_an_app configures
DRIBBLE_TIME = 4.0  # seconds the dribbling thread goes on at most
CPU = 1.0  # seconds of the event loop's CPU the whole dribble may cost
BOUND = 0.05  # seconds: the median round trip of another connection meanwhile


class Dribble(threading.Thread):
    """Sends `data` one byte per segment until refused, done, or DRIBBLE_TIME; `ended` is when the sidecar ended it."""

    def __init__(self, port: int, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((LOOPBACK, port), timeout=DRIBBLE_TIME)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.data = data
        self.started = time.monotonic()
        self.ended: float | None = None
        self.sent = 0

    def run(self) -> None:
        reader = threading.Thread(target=self._watch, daemon=True)
        reader.start()
        try:
            for i in range(len(self.data)):
                if self.ended is not None or time.monotonic() - self.started > DRIBBLE_TIME:
                    break
                self.sock.send(self.data[i : i + 1])
                self.sent += 1
                time.sleep(0.0001)
        except OSError:
            pass
        reader.join(DRIBBLE_TIME)
        self.sock.close()

    def _watch(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.recv(1)  # the sidecar never answers a sniff: this ends with its close or reset
        self.ended = time.monotonic()


def one_byte_records() -> bytes:
    return records(handshake(hello_body(extensions=ext(21, bytes(5400)))), [1])


def slow_but_well_formed() -> bytes:
    return records(handshake(hello_body(extensions=ext(21, bytes(20000)))), [16384])


@pytest.mark.parametrize(
    ("make", "ends_by"),
    [(one_byte_records, SNIFF_TIMEOUT / 2), (slow_but_well_formed, SNIFF_TIMEOUT + 0.5)],
    ids=["one-byte records", "one byte at a time"],
)
async def test_a_dribbled_client_hello_is_cheap_bounded_and_starves_nobody(
    pki: Pki, make: object, ends_by: float
) -> None:
    data = make()  # type: ignore[operator]
    assert len(data) > 20000
    with trio.fail_after(IO):
        async with sidecar_in_front_of_an_app(pki) as target:
            assert await round_trip(pki, target.port) == b"x"
            cpu = time.thread_time()  # the event loop's thread: the sidecar's work (the dribble is another thread)
            dribble = Dribble(target.port, data)
            dribble.start()
            times = []
            while dribble.is_alive() and len(times) < 40:
                start = time.monotonic()
                assert await round_trip(pki, target.port) == b"x"
                times.append(time.monotonic() - start)
                await trio.sleep(0.02)
            await trio.to_thread.run_sync(dribble.join, DRIBBLE_TIME + 1)
            cpu = time.thread_time() - cpu
    assert dribble.ended is not None, "the sidecar never ended the dribble"
    took = dribble.ended - dribble.started
    assert took < ends_by, f"ended after {took:.2f}s and {dribble.sent} bytes"
    assert times and statistics.median(times) < BOUND * 4, times  # each sample is a whole new mTLS connection
    assert cpu < CPU, f"the event loop spent {cpu:.2f}s of CPU"

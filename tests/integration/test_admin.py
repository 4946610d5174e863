"""The HTTP endpoints, built as the sidecar builds them (`Endpoints` over a runtime and a state, `serve_http` on a
listener), and asked over loopback by a real client: `http.client` in a thread, or a raw socket for what no client
library would send.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization

from mtlsmesh import admin, config, durations
from mtlsmesh.credentials import CredentialStore
from mtlsmesh.outcome import Decision, Reason
from mtlsmesh.runtime import ConnRecord, Runtime
from tests.integration.mesh import LOOPBACK, base_config, connect, read_all
from tests.pki import TD, Pki

IO = 10.0


@pytest.fixture
def rt(pki: Pki) -> Runtime:
    files = pki.issue("a")
    return Runtime(base_config(files), CredentialStore.load(files, TD))


@pytest.fixture
def state() -> admin.State:
    return admin.State(ready=True)


@asynccontextmanager
async def endpoint(rt: Runtime, state: admin.State, kind: str) -> AsyncIterator[int]:
    """One endpoint (`health`, `metrics` or `admin`) served on a loopback port, as the sidecar wires it; yields the
    port. Bounded by IO seconds."""
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(IO):
        async with trio.open_nursery() as nursery:
            await nursery.start(admin.serve_http, listener, admin.Endpoints(rt, state, kind))
            try:
                yield port
            finally:
                nursery.cancel_scope.cancel()


Answer = tuple[int, dict[str, str], bytes]


async def ask(port: int, method: str, path: str) -> Answer:
    """A request from `http.client` (in a thread): (status, headers, body), as a real client parses them."""

    def call() -> Answer:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=IO)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(call)


async def raw(port: int, request: bytes) -> bytes:
    """Bytes in, the whole answer out (to the server's close)."""
    stream = await connect(port)
    try:
        await stream.send_all(request)
        return await read_all(stream)
    finally:
        await stream.aclose()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- health ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["health", "admin"])
async def test_health_follows_the_state(rt: Runtime, kind: str) -> None:
    state = admin.State()
    async with endpoint(rt, state, kind) as port:
        assert (await ask(port, "GET", "/healthz/ready"))[::2] == (503, b"not ready\n")  # before everything is bound
        state.ready = True
        status, headers, body = await ask(port, "GET", "/healthz/ready")
        assert (status, body) == (200, b"ready\n")
        assert headers["content-type"] == "text/plain"
        assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"
        state.ready, state.draining = False, True
        assert (await ask(port, "GET", "/healthz/ready"))[::2] == (503, b"draining\n")


# (endpoint, method, path, status). Health is reachable from every pod: it answers its probe and nothing else.
ROUTES = [
    ("health", "GET", "/healthz/ready", 200),
    ("health", "POST", "/healthz/ready", 405),
    ("health", "GET", "/stats/prometheus", 404),
    ("health", "GET", "/config_dump", 404),
    ("health", "GET", "/certs", 404),
    ("health", "POST", "/drain", 404),
    ("health", "POST", "/logging?level=debug", 404),
    ("metrics", "GET", "/stats/prometheus", 200),
    ("metrics", "GET", "/healthz/ready", 404),
    ("metrics", "GET", "/certs", 404),
    ("metrics", "POST", "/drain", 404),
    ("admin", "GET", "/healthz/ready", 200),
    ("admin", "PUT", "/healthz/ready", 405),
    ("admin", "GET", "/stats/prometheus", 200),
    ("admin", "GET", "/config_dump", 200),
    ("admin", "GET", "/certs", 200),
    ("admin", "GET", "/drain", 404),  # the wrong method on the other paths is not found either
    ("admin", "POST", "/config_dump", 404),
    ("admin", "GET", "/logging?level=debug", 404),
    ("admin", "GET", "/nowhere", 404),
]


@pytest.mark.parametrize(("kind", "method", "path", "status"), ROUTES, ids=[" ".join(r[:3]) for r in ROUTES])
async def test_each_endpoint_answers_its_own_paths(
    rt: Runtime, state: admin.State, kind: str, method: str, path: str, status: int
) -> None:
    level = logging.getLogger("mtlsmesh").level
    async with endpoint(rt, state, kind) as port:
        got, headers, body = await ask(port, method, path)
    assert got == status
    assert headers["content-length"] == str(len(body))
    if status == 404:
        assert body == b"not found\n"
    assert not state.drain.is_set()  # only the admin port's POST /drain drains
    assert logging.getLogger("mtlsmesh").level == level


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /healthz/ready HTTP/1.0\r\n\r\n", 200),
        (b"GET /healthz/ready HTTP/1.1\n\n", 200),  # bare newlines end a head too
        (b"GET /healthz/ready\r\n\r\n", 400),  # no version
        (b"GET healthz/ready HTTP/1.1\r\n\r\n", 400),  # not a path
        (b"GET /healthz/ready SPDY/3\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
    ],
)
async def test_what_is_not_an_http_request_line_is_a_400(
    rt: Runtime, state: admin.State, request_bytes: bytes, status: int
) -> None:
    async with endpoint(rt, state, "admin") as port:
        answer = await raw(port, request_bytes)
    assert status_of(answer) == status
    assert answer.endswith(b"\r\n\r\nready\n" if status == 200 else b"\r\n\r\nbad request\n")


def head_of(size: int) -> bytes:
    """A GET whose head (request line, headers, blank line) is exactly `size` bytes."""
    start, end = b"GET /healthz/ready HTTP/1.1\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize(("size", "status"), [(admin.MAX_REQUEST, 200), (admin.MAX_REQUEST + 1, 431)])
async def test_a_head_over_max_request_is_refused_with_431(
    rt: Runtime, state: admin.State, size: int, status: int
) -> None:
    async with endpoint(rt, state, "admin") as port:
        answer = await raw(port, head_of(size))
    assert status_of(answer) == status


async def test_a_431_reaches_a_client_that_is_still_sending(rt: Runtime, state: admin.State) -> None:
    # The server answers after MAX_REQUEST bytes while the client is still sending its head: closing right away
    # with unread bytes would be an RST, which can destroy the answer in the client's buffer.
    junk = b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"j" * (5 * admin.MAX_REQUEST)
    async with endpoint(rt, state, "admin") as port:
        stream = await connect(port)
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(junk)
                await stream.send_eof()

            nursery.start_soon(send)
            answer = await read_all(stream)
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert answer.endswith(b"\r\n\r\nrequest too large\n")


# --- slow and idle clients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["health", "admin"])
@pytest.mark.parametrize("client", ["silent", "trickling"])
async def test_a_slow_client_is_cut_at_the_read_timeout_and_blocks_no_one(
    rt: Runtime, state: admin.State, monkeypatch: pytest.MonkeyPatch, kind: str, client: str
) -> None:
    # The admin port's 5 s, shortened, but still unlike health's 1 s: each endpoint keeps to its own.
    monkeypatch.setattr(admin, "READ_TIMEOUT", 1.5)
    timeout = admin.HEALTH_READ_TIMEOUT if kind == "health" else admin.READ_TIMEOUT
    async with endpoint(rt, state, kind) as port:
        slow = await connect(port)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            if client == "trickling":  # a byte at a time, never a whole request line: the timeout is for the head

                async def trickle() -> None:
                    for byte in b"GET /healthz/ready HTTP/1.1"[:25]:
                        await slow.send_all(bytes([byte]))
                        await trio.sleep(0.1)

                nursery.start_soon(trickle)
            # Meanwhile another client is answered at once.
            with trio.fail_after(timeout / 2):
                assert (await ask(port, "GET", "/healthz/ready"))[::2] == (200, b"ready\n")
            answer = await read_all(slow)
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        await slow.aclose()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and answer.endswith(b"request timeout\n")
    assert timeout - 0.05 < elapsed < timeout + 1.5


async def test_a_full_house_pushes_out_the_oldest_client_still_silent(rt: Runtime, state: admin.State) -> None:
    request = b"GET /healthz/ready HTTP/1.1\r\n\r\n"
    async with endpoint(rt, state, "health") as port:
        silent = [await connect(port) for _ in range(admin.MAX_CLIENTS)]
        try:
            await trio.testing.wait_all_tasks_blocked()  # all admitted, each waiting for its request
            newcomer = await connect(port)
            silent.append(newcomer)
            with trio.fail_after(admin.HEALTH_READ_TIMEOUT / 2):  # long before the read timeout
                assert await read_all(silent[0]) == b""  # the oldest, closed without an answer to make room
            for stream in (silent[1], silent[-2], newcomer):  # the others keep their places
                await stream.send_all(request)
                assert status_of(await read_all(stream)) == 200
        finally:
            for stream in silent:
                await trio.aclose_forcefully(stream)


async def test_a_full_house_of_clients_being_answered_turns_a_newcomer_away(
    rt: Runtime, state: admin.State, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Clients past their request (answered, the server lingering over their unread bytes) cannot be pushed out:
    # with every slot held so, a new connection is closed at once. (A longer linger: time to fill every slot.)
    monkeypatch.setattr(admin, "LINGER", 5.0)
    request = b"GET /healthz/ready HTTP/1.1\r\n\r\n"
    async with endpoint(rt, state, "health") as port:
        held = [await connect(port) for _ in range(admin.MAX_CLIENTS)]
        try:
            for stream in held:
                await stream.send_all(request)
                answer = await stream.receive_some(4096)  # answered; the server now waits for our EOF
                assert status_of(answer) == 200
            turned_away = await connect(port)
            held.append(turned_away)
            with trio.fail_after(1.0):
                assert await read_all(turned_away) == b""
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)  # frees the slots
        await trio.testing.wait_all_tasks_blocked()
        assert (await ask(port, "GET", "/healthz/ready"))[0] == 200


# --- metrics ------------------------------------------------------------------------------------------------

SAMPLE = re.compile(
    r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*")*)\})? (?P<value>-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?)'
)
COMMENT = re.compile(r"# (?P<kind>HELP|TYPE) (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<text>.+)")


def parse_exposition(text: str) -> dict[str, float]:
    """Check the text exposition format (0.0.4) line by line; return every sample by its name and labels."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            comment = COMMENT.fullmatch(line)
            assert comment, f"not a HELP or TYPE line: {line!r}"
            if comment["kind"] == "TYPE":
                assert comment["name"] not in types, f"a second TYPE for {comment['name']}"
                assert comment["text"] in ("counter", "gauge"), line
                types[comment["name"]] = comment["text"]
            continue
        sample = SAMPLE.fullmatch(line)
        assert sample, f"not a sample line: {line!r}"
        assert sample["name"] in types, f"{sample['name']} has no TYPE before it"
        assert types[sample["name"]] != "counter" or sample["name"].endswith("_total"), line
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"{key} twice"
        samples[key] = float(sample["value"])
    return samples


async def test_stats_prometheus_is_valid_text_exposition(rt: Runtime, state: admin.State) -> None:
    # What the accept loop records for finished connections, one of them with a long free-text detail.
    ended = (
        (Decision.MTLS, Reason.CLOSED, "", 3),
        (Decision.MTLS, Reason.HANDSHAKE_FAILED, "peer certificate is not a valid SVID: 2 URI SANs", 2),
    )
    for decision, reason, detail, count in ended:
        for _ in range(count):
            rec = ConnRecord(
                "inbound", "inbound", bytes_in=10, bytes_out=20, decision=decision, reason=reason, detail=detail
            )
            rt.stats.record(rec)
    rt.stats.active["inbound"] = 1
    async with endpoint(rt, state, "metrics") as port:
        status, headers, body = await ask(port, "GET", "/stats/prometheus")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4"
    samples = parse_exposition(body.decode())
    assert samples['mtlsmesh_connections_total{direction="inbound",decision="mtls",reason="closed"}'] == 3
    assert samples['mtlsmesh_connections_total{direction="inbound",decision="mtls",reason="handshake_failed"}'] == 2
    assert samples['mtlsmesh_bytes_total{direction="inbound",side="in"}'] == 50
    assert samples['mtlsmesh_bytes_total{direction="inbound",side="out"}'] == 100
    assert samples['mtlsmesh_active_connections{direction="inbound"}'] == 1
    assert samples["mtlsmesh_credential_reloads_total"] == 0
    assert samples["mtlsmesh_credential_reload_failures_total"] == 0
    assert samples["mtlsmesh_certificate_expiry_seconds"] == round(rt.credentials.current.not_after.timestamp())
    assert samples["mtlsmesh_ready"] == 1


# --- admin --------------------------------------------------------------------------------------------------


def key_material(key_file: str) -> Iterator[str]:
    """The private key as anything that could leak it: its PEM body lines, its DER in base64 and hex, and the
    private value itself in decimal and hex."""
    pem_text = Path(key_file).read_text()
    yield from (line for line in pem_text.splitlines() if line and not line.startswith("-----"))
    key = serialization.load_pem_private_key(pem_text.encode(), password=None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    yield base64.b64encode(der).decode()[:48]
    yield der.hex()[:48]
    private_value = key.private_numbers().private_value  # type: ignore[union-attr]
    yield str(private_value)
    yield format(private_value, "x")
    yield "PRIVATE"


@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signed", "with-intermediate"])
async def test_config_dump_and_certs_show_no_key_material(
    state: admin.State, tmp_path: Path, intermediate: bool
) -> None:
    pki = Pki(tmp_path, intermediate=intermediate)
    files = pki.issue("a")
    rt = Runtime(base_config(files), CredentialStore.load(files, TD))
    async with endpoint(rt, state, "admin") as port:
        dump = await ask(port, "GET", "/config_dump")
        certs = await ask(port, "GET", "/certs")
    for status, headers, body in (dump, certs):
        assert (status, headers["content-type"]) == (200, "application/json")
        for leak in key_material(files.key):
            assert leak not in body.decode(), f"{leak[:16]}... is in the answer"
    assert json.loads(dump[2]) == config.render_config(rt.config)  # the key's path, never the key
    shown = json.loads(certs[2])
    current = rt.credentials.current
    assert shown["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/a"
    assert shown["sha256"] == current.fingerprint and shown["not_after"] == durations.format_time(current.not_after)
    assert shown["intermediates"] == (1 if intermediate else 0)
    assert len(shown["roots"]) == 1


@pytest.fixture
def mesh_level() -> Iterator[logging.Logger]:
    logger = logging.getLogger("mtlsmesh")
    before = logger.level
    try:
        yield logger
    finally:
        logger.setLevel(before)


async def test_post_logging_sets_the_level(rt: Runtime, state: admin.State, mesh_level: logging.Logger) -> None:
    async with endpoint(rt, state, "admin") as port:
        for level in admin.LOG_LEVELS:
            assert (await ask(port, "POST", f"/logging?level={level}"))[::2] == (200, f"log level {level}\n".encode())
            assert mesh_level.level == logging.getLevelName(level.upper())
        for bad in ("loud", "", "warn", "info&x=1"):
            status, _, body = await ask(port, "POST", f"/logging?level={bad}")
            assert (status, body) == (400, b"level must be one of debug, info, warning, error\n")
            assert mesh_level.level == logging.ERROR  # the last good one stays

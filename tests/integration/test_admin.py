"""The HTTP endpoints, built as the sidecar builds them (`Endpoints` over a runtime and a state, `serve_http` on a
listener), and asked over loopback by a real client: `http.client` in a thread, or a raw socket for what no client
library would send.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

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


TOKEN = "a-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def state() -> admin.State:
    return admin.State(ready=True, token=TOKEN)


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


async def ask(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    """A request from `http.client` (in a thread): (status, headers, body), as a real client parses them. A POST
    carries the admin token unless `headers` say otherwise; http.client sends `Host: 127.0.0.1:<port>`."""
    sent = dict(AUTH if method == "POST" and headers is None else headers or {})

    def call() -> Answer:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=IO)
        try:
            conn.request(method, path, headers=sent)
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
    ("admin", "GET", "/drain", 405),  # a known path with the wrong method
    ("admin", "POST", "/config_dump", 405),
    ("admin", "GET", "/logging?level=debug", 405),
    ("admin", "DELETE", "/certs", 405),
    ("admin", "GET", "/nowhere", 404),
    ("admin", "POST", "/nowhere", 404),
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
    if status == 405:  # and which method would do
        assert headers["allow"] in ("GET", "POST") and body == f"use {headers['allow']}\n".encode()
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


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The exposition parsed by prometheus_client's own parser: sample name → sorted labels → value. Every family
    has its HELP and TYPE, and no sample appears twice."""
    assert text.endswith("\n")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("counter", "gauge", "histogram"), family
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            assert key not in out.setdefault(sample.name, {}), f"{sample.name}{key} twice"
            out[sample.name][key] = sample.value
    return out


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


async def test_stats_prometheus_is_valid_text_exposition(rt: Runtime, state: admin.State) -> None:
    # What the accept loop records for finished connections, one of them with a long free-text detail.
    ended = (
        (Decision.MTLS, Reason.CLOSED, "", 3),
        (Decision.MTLS, Reason.HANDSHAKE_FAILED, "peer certificate is not a valid SVID: 2 URI SANs", 2),
    )
    own = rt.credentials.current.spiffe_id
    for decision, reason, detail, count in ended:
        for _ in range(count):
            rec = ConnRecord(
                "inbound", "inbound", bytes_in=10, bytes_out=20, decision=decision, reason=reason, detail=detail
            )
            rec.orig_dst = "198.18.0.10:9080"
            rt.stats.record(rec, own)
    rt.stats.accepted("inbound")
    async with endpoint(rt, state, "metrics") as port:
        status, headers, body = await ask(port, "GET", "/stats/prometheus")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = scrape(body.decode())
    connections = samples["mtlsmesh_connections_total"]
    assert connections[labels(direction="inbound", decision="mtls", reason="closed")] == 3
    assert connections[labels(direction="inbound", decision="mtls", reason="handshake_failed")] == 2
    # No handshake checked a peer here: the caller is unknown, the destination is us, under mutual TLS.
    identity = labels(
        direction="inbound",
        source_principal="unknown",
        destination_principal=str(own),
        destination_port="9080",
        security_policy="mutual_tls",
    )
    closed = samples["mtlsmesh_tcp_connections_closed_total"]
    assert closed[tuple(sorted((*identity, ("reason", "closed"))))] == 3
    assert samples["mtlsmesh_tcp_received_bytes_total"][identity] == 50
    assert samples["mtlsmesh_tcp_sent_bytes_total"][identity] == 100
    assert samples["mtlsmesh_active_connections"][labels(direction="inbound")] == 1
    assert samples["mtlsmesh_connection_duration_seconds_count"][labels(direction="inbound", decision="mtls")] == 5
    assert samples["mtlsmesh_credential_reloads_total"][()] == 0
    assert samples["mtlsmesh_credential_reload_failures_total"][()] == 0
    not_after = rt.credentials.current.not_after.timestamp()
    assert samples["mtlsmesh_svid_not_after_timestamp_seconds"][()] == not_after
    assert 0 < samples["mtlsmesh_svid_seconds_left"][()] <= not_after - time.time() + 1
    assert samples["mtlsmesh_ready"][()] == 1


async def test_the_ready_gauge_is_what_healthz_answers(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ready, not ready, draining, and ready but with an expired SVID: the gauge says 1 exactly when health is 200.
    state = admin.State(ready=True)
    async with endpoint(rt, state, "admin") as port:
        for ready, draining, expired in ((True, False, False), (False, False, False), (False, True, False),
                                         (True, False, True)):  # fmt: skip
            state.ready, state.draining = ready, draining
            when = rt.credentials.current.not_after + timedelta(seconds=1) if expired else datetime.now(UTC)
            monkeypatch.setattr(admin, "datetime", _Frozen.at(when))
            health = (await ask(port, "GET", "/healthz/ready"))[0]
            gauge = scrape((await ask(port, "GET", "/stats/prometheus"))[2].decode())["mtlsmesh_ready"][()]
            assert (health, gauge) == ((200, 1) if ready and not expired else (503, 0))


class _Frozen(datetime):
    """`datetime` whose now() is fixed: an SVID expired without waiting for it."""

    frozen: datetime

    @classmethod
    def at(cls, when: datetime) -> type[_Frozen]:
        return type("FrozenAt", (cls,), {"frozen": when})

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _Frozen:  # type: ignore[override]
        return cls.frozen  # type: ignore[return-value]


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
    expected = config.render_config(rt.config)  # the key's path, never the key
    expected["log"] = {**expected["log"], "level": admin.current_log_level()}  # the level in force (the run's)
    assert json.loads(dump[2]) == expected
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
            # /config_dump shows the level now in force, not the one the sidecar started with.
            assert json.loads((await ask(port, "GET", "/config_dump"))[2])["log"]["level"] == level
        for bad in ("loud", "", "warn", "x=1"):
            status, _, body = await ask(port, "POST", f"/logging?level={bad}")
            assert (status, body) == (400, b"level must be one of debug, info, warning, error\n")
            assert mesh_level.level == logging.ERROR  # the last good one stays
        # A query string is parsed whole: other parameters in any order, percent-encoding; one level only.
        for query, level in (("level=info&x=1", "info"), ("x=1&level=debug", "debug"), ("level=%77arning", "warning")):
            assert (await ask(port, "POST", f"/logging?{query}"))[0] == 200
            assert mesh_level.level == logging.getLevelName(level.upper())
        status, _, body = await ask(port, "POST", "/logging?level=info&level=debug")
        assert (status, body) == (400, b"the query parameter level is given more than once\n")
        assert mesh_level.level == logging.WARNING


# --- the admin port's guards: browsers, DNS rebinding, other local processes ------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "localhost:15000"}, 200),
        ({"Host": "LOCALHOST"}, 200),
        ({"Host": "127.0.0.1"}, 200),
        ({"Host": "127.9.9.9:1"}, 200),
        ({"Host": "[::1]:15000"}, 200),
        ({"Host": "rebind.example:15000"}, 403),  # DNS rebinding: the attacker's name, resolving to 127.0.0.1
        ({"Host": "198.18.0.10:15000"}, 403),  # not loopback, and not the address the admin port is bound to
        ({"Host": "localhost.rebind.example"}, 403),
        ({"Host": "127.0.0.1", "Origin": "http://127.0.0.1:15000"}, 403),  # any browser request, same-origin too
        ({"Host": "127.0.0.1", "Origin": "null"}, 403),
    ],
)
@pytest.mark.parametrize("path", ["/config_dump", "/certs", "/stats/prometheus", "/healthz/ready"])
async def test_the_admin_port_refuses_foreign_hosts_and_browsers(
    rt: Runtime, state: admin.State, headers: dict[str, str], status: int, path: str
) -> None:
    async with endpoint(rt, state, "admin") as port:
        got, _, body = await ask(port, "GET", path, headers)
    assert got == status, body
    if status == 403:
        assert body.startswith(b"requests with an Origin" if "Origin" in headers else b"the Host header must")


async def test_only_the_admin_port_checks_the_host(rt: Runtime, state: admin.State) -> None:
    # The kubelet and Prometheus reach health and metrics at the pod's address: their Host is whatever that is.
    for kind, path in (("health", "/healthz/ready"), ("metrics", "/stats/prometheus")):
        async with endpoint(rt, state, kind) as port:
            assert (await ask(port, "GET", path, {"Host": "198.18.0.10:15021", "Origin": "http://x"}))[0] == 200


async def test_a_repeated_host_header_is_a_400(rt: Runtime, state: admin.State) -> None:
    async with endpoint(rt, state, "admin") as port:
        answer = await raw(port, b"GET /certs HTTP/1.1\r\nHost: localhost\r\nHost: rebind.example\r\n\r\n")
    assert status_of(answer) == 400


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer", 401),
        (f"Basic {TOKEN}", 401),
        ("Bearer not-the-token", 403),
        (f"Bearer {TOKEN}x", 403),
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
    ],
)
async def test_a_post_needs_the_token(rt: Runtime, authorization: str | None, status: int) -> None:
    state = admin.State(ready=True, token=TOKEN)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with endpoint(rt, state, "admin") as port:
        got, answer_headers, body = await ask(port, "POST", "/drain", headers)
        assert got == status, body
        assert state.drain.is_set() == (status == 200)
        if status == 401:
            assert answer_headers["www-authenticate"] == "Bearer"
        assert (await ask(port, "GET", "/healthz/ready"))[0] == 200  # GETs need no token


async def test_without_a_token_every_post_is_refused(rt: Runtime) -> None:
    state = admin.State(ready=True, token=None)
    async with endpoint(rt, state, "admin") as port:
        for authorization in ("", "Bearer ", "Bearer None"):
            got, _, body = await ask(port, "POST", "/drain", {"Authorization": authorization})
            assert (got, body) == (403, b"POST is disabled: the sidecar has no admin token (see --admin-token-file)\n")
    assert not state.drain.is_set()


def test_the_token_file_is_ours_alone(tmp_path: Path) -> None:
    path = tmp_path / "run" / "admin-token"
    token = admin.write_token(path)
    assert path.read_text() == token + "\n" and len(token) >= 40
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert admin.write_token(path) != token  # one per process start
    admin.remove_token(path, token)  # another process's token now: left in place
    assert path.exists()
    admin.remove_token(path, path.read_text().strip())
    assert not path.exists() and list(path.parent.iterdir()) == []

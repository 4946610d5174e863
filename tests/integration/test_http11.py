"""The HTTP/1.1 loop over real loopback sockets: keep-alive, every limit answered with its status, and the client."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from mtlsmesh import http11
from tests.integration.mesh import LOOPBACK, connect, outcome

LIMITS = http11.Limits(max_head=1024, max_body=256, read_timeout=0.5, max_requests=3)


@asynccontextmanager
async def server(limits: http11.Limits = LIMITS) -> AsyncIterator[tuple[int, list[http11.Request], list[str]]]:
    """An echo server: yields its port, the requests it handled and the refusals it made itself."""
    seen: list[http11.Request] = []
    refused: list[str] = []

    async def handler(request: http11.Request) -> http11.Response:
        seen.append(request)
        return http11.Response(200, f"{request.method} {request.target} {len(request.body)}".encode(), "text/plain")

    def refuse(status: int, message: str) -> http11.Response:
        refused.append(f"{status} {message}")
        return http11.plain_refusal(status, message)

    async def one(stream: trio.SocketStream) -> None:
        try:
            await http11.serve_connection(stream, handler, limits, refuse)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, one, 0, host=LOOPBACK))
        yield listeners[0].socket.getsockname()[1], seen, refused
        nursery.cancel_scope.cancel()


async def raw(port: int, data: bytes, *, eof: bool = False) -> bytes:
    stream = await connect(port)
    await stream.send_all(data)
    if eof:
        await stream.send_eof()
    with trio.fail_after(5):
        _, answer = await outcome(stream)
    await stream.aclose()
    return answer


async def test_keep_alive_serves_several_requests_then_closes_at_the_limit() -> None:
    async with server() as (port, seen, _):
        one = b"GET /a HTTP/1.1\r\nHost: ca\r\n\r\n"
        post = b"POST /b HTTP/1.1\r\nHost: ca\r\nContent-Length: 5\r\n\r\nhello"
        answer = await raw(port, one + post + one + one)
    assert answer.count(b"HTTP/1.1 200 OK") == 3  # max_requests=3: the fourth is never read
    assert answer.endswith(b"GET /a 0")
    assert answer.count(b"connection: close") == 1
    assert [(r.method, r.target, r.body) for r in seen] == [("GET", "/a", b""), ("POST", "/b", b"hello"),
                                                           ("GET", "/a", b"")]  # fmt: skip


async def test_connection_close_is_honoured() -> None:
    async with server() as (port, seen, _):
        answer = await raw(port, b"GET /x HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\nGET /y HTTP/1.1\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 1
    assert [r.target for r in seen] == ["/x"]


@pytest.mark.parametrize(
    ("data", "status", "refusal"),
    [
        (b"garbage\r\n\r\n", b"400 Bad Request", "400 malformed request"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400 Bad Request", "400 malformed request"),  # HTTP/1.1 needs a Host
        (b"GET / HTTP/1.1\r\nHost: ca\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", b"431", "431 request header too large"),
        (
            b"POST / HTTP/1.1\r\nHost: ca\r\nContent-Length: 100000\r\n\r\n",
            b"413 Content Too Large",
            "413 the body is larger than 256 bytes",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: ca\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n" + b"a" * 512 + b"\r\n0\r\n\r\n",
            b"413 Content Too Large",
            "413 the body is larger than 256 bytes",
        ),
        (b"GET / HTTP/1.1\r\nHost: ca\r\n", b"408 Request Timeout", "408 the request was not complete within 0.5 s"),
        (b"POST / HTTP/1.1\r\nHost: ca\r\nContent-Length: 10\r\n\r\nabc", b"408", "408 the request was not complete"),
    ],
    ids=["garbage", "no-host", "head-too-large", "body-too-large", "chunked-too-large", "slow-head", "slow-body"],
)
async def test_limits_and_malformed_input_get_a_status_and_a_close(data: bytes, status: bytes, refusal: str) -> None:
    async with server() as (port, seen, refused):
        answer = await raw(port, data)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close" in answer
    assert len(refused) == 1 and refused[0].startswith(refusal)
    assert seen == []


async def test_a_silent_connection_is_closed_without_an_answer() -> None:
    async with server() as (port, _, refused):
        with trio.fail_after(5):
            answer = await raw(port, b"")
    assert answer == b""
    assert refused == []


async def test_a_client_ending_mid_body_is_told_and_the_next_one_is_served() -> None:
    async with server() as (port, seen, refused):
        cut = await raw(port, b"POST / HTTP/1.1\r\nHost: ca\r\nContent-Length: 10\r\n\r\nabc", eof=True)
        assert cut.startswith(b"HTTP/1.1 400") and b"without sending complete message body" in cut
        assert b"200 OK" in await raw(port, b"GET /after HTTP/1.1\r\nHost: ca\r\n\r\n", eof=True)
    assert [r.target for r in seen] == ["/after"]
    assert len(refused) == 1


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    async with server() as (port, seen, _):
        stream = await connect(port)
        await stream.send_all(b"POST /c HTTP/1.1\r\nHost: ca\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            first = await stream.receive_some(1000)
        assert first.startswith(b"HTTP/1.1 100")
        await stream.send_all(b"abc")
        await stream.send_eof()
        with trio.fail_after(5):
            _, rest = await outcome(stream)
        await stream.aclose()
    assert b"200 OK" in rest and rest.endswith(b"POST /c 3")
    assert seen[0].body == b"abc"


async def test_the_client_request_round_trips() -> None:
    async with server() as (port, seen, _):
        stream = await connect(port)
        with trio.fail_after(5):
            answer = await http11.request(
                stream, "POST", "/v1/sign", host="ca", headers=[("authorization", "Bearer t")], body=b"{}"
            )
        await stream.aclose()
    assert answer.status == 200 and answer.body == b"POST /v1/sign 2"
    assert ("content-type", "text/plain") in answer.headers
    assert seen[0].header("authorization") == "Bearer t" and seen[0].header("host") == "ca"
    assert seen[0].header("missing") is None


async def test_the_client_refuses_a_broken_or_oversized_answer() -> None:
    async def serve_bytes(payload: bytes, stream: trio.SocketStream) -> None:
        await stream.receive_some(1000)
        await stream.send_all(payload)
        await stream.aclose()

    cases = [
        (b"NOT HTTP\r\n\r\n", "the server broke HTTP/1.1"),
        (b"", "closed the connection before answering|broke HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000, "larger than 1000 bytes"),
    ]
    for payload, match in cases:
        async with trio.open_nursery() as nursery:
            handler = functools.partial(serve_bytes, payload)
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
            stream = await connect(listeners[0].socket.getsockname()[1])
            with trio.fail_after(5), pytest.raises(http11.HttpError, match=match):
                await http11.request(stream, "GET", "/v1/bundle", host="ca", max_answer=1000)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_head_request_gets_the_head_alone_and_the_connection_goes_on() -> None:
    # h11 refuses a body after a HEAD answer; sending one would raise out of the loop (and out of a listener that
    # does not catch it). The answer's Content-Length is what GET would send, as HTTP says.
    async with server() as (port, seen, _):
        client = await connect(port)
        wire = b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        await client.send_all(wire)
        kind, answer = await outcome(client)
        await client.aclose()
    assert kind == "eof"
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 9" in head.lower()  # len(b"HEAD /x 0")
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"GET /y 0")  # no body came between the two
    assert [(r.method, r.target) for r in seen] == [("HEAD", "/x"), ("GET", "/y")]


async def test_a_client_that_never_reads_its_answer_is_let_go_after_the_write_timeout() -> None:
    # A lockstep pair: a send waits until the other end reads, as a socket does once its buffers are full.
    ours, theirs = trio.testing.lockstep_stream_pair()
    limits = http11.Limits(read_timeout=5.0, write_timeout=0.3)

    async def handler(request: http11.Request) -> http11.Response:
        return http11.Response(200, b"x" * 1000, "text/plain")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(theirs.send_all, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # then never reads
        started = trio.current_time()
        with trio.fail_after(3):
            await http11.serve_connection(ours, handler, limits)
        assert trio.current_time() - started < 2.0  # the write timeout ended it, not the read timeout (5 s)
        nursery.cancel_scope.cancel()

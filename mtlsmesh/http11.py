"""HTTP/1.1 over any trio stream, with h11 doing the parsing: one small server loop and one small client call.

What it does: `serve_connection` reads requests from one connection (a `tls.TLSStream`, a plain socket) and hands
each, with its whole body, to a handler, keeping the connection alive between requests up to `Limits.max_requests`.
Whatever the caller sends, the loop ends cleanly: a head larger than `Limits.max_head` is answered 431, a body
larger than `Limits.max_body` 413 (at once, when Content-Length says so), a request not complete within
`Limits.read_timeout` 408, anything h11 cannot parse 400; each of these closes the connection. A connection that
stays silent between requests is closed without an answer. `request` sends one request on a fresh connection
(`Connection: close`) and reads the whole answer, bounded in size.

What it does not: chunked or streamed bodies for the handler (bodies are small JSON here), pipelining beyond what
h11 itself buffers, TLS (the caller brings the stream), or routing (the handler decides on method and path).
"""

from __future__ import annotations

import email.utils
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

from mtlsmesh.errors import MeshError

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
READ_SIZE = 16 * 1024
LINGER = 1.0  # seconds to read what a client still sends after our closing answer (see _close)


class HttpError(MeshError):
    """An HTTP exchange that failed on the client's side: the peer broke the protocol or the connection."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_head: int = 8 * 1024  # request line and headers
    max_body: int = 16 * 1024
    read_timeout: float = 10.0  # for one whole request, and for the silence before the next one
    write_timeout: float = 10.0  # for one answer to leave (a client that never reads must not hold us)
    max_requests: int = 100  # per connection; the last answer says Connection: close


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names lowercase, in the order sent
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header (`name` lowercase), or None."""
        return next((value for key, value in self.headers if key == name), None)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]
# What the server answers when it refuses a request itself (status, one line); the caller renders and logs it.
Refuse = Callable[[int, str], Response]


def plain_refusal(status: int, message: str) -> Response:
    return Response(status, message.encode() + b"\n", "text/plain")


def _head(response: Response, *, close: bool) -> list[tuple[str, str]]:
    headers = [("content-type", response.content_type), ("content-length", str(len(response.body)))]
    # RFC 9110 §6.6.1: a server with a clock sends Date; `mtlsmesh check` measures the clock skew with the CA's.
    headers.append(("date", email.utils.formatdate(usegmt=True)))
    headers += list(response.headers)
    if close:
        headers.append(("connection", "close"))
    return headers


def _raw(response: Response) -> bytes:
    """A closing answer written out by hand, for when h11's state no longer allows one (after a parse error)."""
    reason = REASONS.get(response.status, "Error")
    lines = [f"HTTP/1.1 {response.status} {reason}", *(f"{k}: {v}" for k, v in _head(response, close=True))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> object:
    """The next h11 event, reading as needed; `_Refused` for what h11 refuses, None when the peer just left."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
            message = "request header too large" if status == 431 else f"malformed request: {exc}"
            raise _Refused(status, message) from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data and conn.their_state is h11.IDLE:
            return None
        conn.receive_data(bytes(data))


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection, limits: Limits) -> Request | None:
    event = await _next_event(stream, conn)
    if event is None or isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields a Request first on a server
        raise _Refused(400, "malformed request")
    # h11 enforces max_incomplete_event_size only on a head still arriving; one that came in a single read is
    # measured here (as sent, give or take the whitespace h11 strips).
    head_size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
    if head_size > limits.max_head:
        raise _Refused(431, "request header too large")
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)
    length = next((value for key, value in headers if key == "content-length"), None)
    if length is not None and int(length) > limits.max_body:  # h11 has checked it is a number
        raise _Refused(413, f"the body is larger than {limits.max_body} bytes")
    if conn.they_are_waiting_for_100_continue:  # curl asks before it sends a larger body
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
    body = bytearray()
    while True:
        part = await _next_event(stream, conn)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > limits.max_body:
                raise _Refused(413, f"the body is larger than {limits.max_body} bytes")
        elif isinstance(part, h11.EndOfMessage):
            break
        else:  # the peer left in the middle of its body
            return None
    return Request(event.method.decode("ascii"), event.target.decode("ascii", "replace"), headers, bytes(body))


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, *, close: bool, head_only: bool
) -> None:
    """The answer; to a HEAD request its head alone (h11 refuses a body there: its length is what GET would send)."""
    reason = REASONS.get(response.status, "").encode()
    data = conn.send(h11.Response(status_code=response.status, headers=_head(response, close=close), reason=reason))
    if not head_only:
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


async def _close(stream: trio.abc.Stream) -> None:
    """Half-close, then read (and drop) what the client still sends for a moment: closing with unread bytes would
    reset the connection and could destroy our answer in the client's buffer."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
            with trio.move_on_after(LINGER):
                while await stream.receive_some(READ_SIZE):
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_connection(
    stream: trio.abc.Stream, handler: Handler, limits: Limits = Limits(), refuse: Refuse = plain_refusal
) -> None:
    """Serve requests on `stream` until the client closes, asks to close, or breaks a limit; the caller closes
    `stream` afterwards. Transport errors, and a client too slow to take an answer within `limits.write_timeout`,
    end the loop quietly; the handler's own errors propagate."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
    served = 0
    try:
        while True:
            refusal: Response | None = None
            with trio.move_on_after(limits.read_timeout) as timer:
                try:
                    request = await _read_request(stream, conn, limits)
                except _Refused as exc:
                    refusal = refuse(exc.status, exc.message)
            if timer.cancelled_caught:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return  # silent between requests: close without a word
                refusal = refuse(408, f"the request was not complete within {limits.read_timeout:g} s")
            if refusal is not None:
                with trio.move_on_after(limits.write_timeout):
                    await stream.send_all(_raw(refusal))
                    await _close(stream)
                return
            if request is None:
                return
            served += 1
            response = await handler(request)
            close = served >= limits.max_requests or conn.their_state is h11.MUST_CLOSE
            with trio.move_on_after(limits.write_timeout) as writing:
                await _send(stream, conn, response, close=close, head_only=request.method == "HEAD")
            if writing.cancelled_caught:
                return
            if close or conn.our_state is not h11.DONE:
                with trio.move_on_after(limits.write_timeout):
                    await _close(stream)
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        # LocalProtocolError: an answer h11 will not send in this state; the connection ends, nobody else's does.
        return


# ---------------------------------------------------------------------------------------------------------------
# The client side


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


async def request(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    *,
    host: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    max_answer: int = 1024 * 1024,
) -> Answer:
    """One request on `stream` (which then closes: `Connection: close`) and its whole answer. Raises `HttpError`;
    the caller bounds it in time and closes `stream`."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    head = [("host", host), ("connection", "close"), *headers]
    if body or method not in ("GET", "HEAD"):
        head.append(("content-length", str(len(body))))
    try:
        out = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
        out += (conn.send(h11.Data(data=body)) or b"") if body else b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        status, received = 0, bytearray()
        answer_headers: tuple[tuple[str, str], ...] = ()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(f"the server broke HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)
            elif isinstance(event, h11.Data):
                received += event.data
                if len(received) > max_answer:
                    raise HttpError(f"the answer is larger than {max_answer} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, answer_headers, bytes(received))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("the server closed the connection before answering")
    except h11.LocalProtocolError as exc:  # pragma: no cover - our own request is well-formed
        raise HttpError(f"cannot send the request: {exc}") from None
    except trio.BrokenResourceError as exc:
        raise HttpError(f"the connection broke: {exc}") from None

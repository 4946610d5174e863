"""The demo's apps: what a user would run in the pods, written with the standard library only.

They know nothing of the mesh: they listen and dial in plaintext, and the mesh's capture rules and sidecars do the
rest. That is the point the demo and the end-to-end tests make, so these apps must stay mesh-unaware.

    python -m mtlsmesh.lab.demoapps http --name reviews --port 9080 --call ratings=http://198.19.0.12:9080/ratings
        A JSON HTTP service. Each request is logged on one line with what arrived in plaintext (peer, path and the
        `X-Demo-Marker` header), then each `--call` upstream is asked in turn (the marker is passed on) and the
        answers are nested in the reply.
    python -m mtlsmesh.lab.demoapps tcp --port 3306 --mode banner|echo|hash
        echo: send back what arrives, and shut down writing after the peer's EOF (half-close passes through);
        banner: speak first (`BANNER <name>\\n`), then echo — a server-first protocol like MySQL;
        hash: read to EOF, then answer `<bytes> <sha256 hex>\\n`.

The data path of the mesh itself never uses these (it is trio, see `relay`); a thread per connection is plenty here.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import socket
import socketserver
import sys
import threading
import urllib.parse
from collections.abc import Sequence

MARKER_HEADER = "X-Demo-Marker"
UPSTREAM_TIMEOUT = 10.0


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def peer_text(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """`a.b.c.d:port` or `[v6]:port` of a peer our dual-stack listeners accepted (an IPv4 peer arrives mapped)."""
    host, port = address[0], address[1]
    host = host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _DualStack:
    """Listen on `::` for both families, as a pod's app does on a dual-stack cluster."""

    address_family: int = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # type: ignore[attr-defined]
        super().server_bind()  # type: ignore[misc]


def call_upstream(url: str, marker: str) -> object:
    """GET `url` in plaintext, as any app would; the mesh, not this code, makes it mutual TLS."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=UPSTREAM_TIMEOUT)
    try:
        conn.request("GET", parts.path or "/", headers={MARKER_HEADER: marker})
        response = conn.getresponse()
        body = response.read()
        try:
            return {"status": response.status, "body": json.loads(body)}
        except ValueError:
            return {"status": response.status, "body": body.decode(errors="replace")}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def make_http_handler(name: str, calls: Sequence[tuple[str, str]]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            marker = self.headers.get(MARKER_HEADER, "")
            port = self.server.server_address[1]  # type: ignore[index]  # a (host, port, ...) tuple
            peer = peer_text(self.client_address)
            log(f"app={name} port={port} peer={peer} request={self.requestline!r} marker={marker!r}")
            upstreams = {up_name: call_upstream(url, marker) for up_name, url in calls}
            body = json.dumps(
                {
                    "service": name,
                    "port": port,
                    "peer": peer.rsplit(":", 1)[0].strip("[]"),
                    "marker": marker,
                    "upstreams": upstreams,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request is written by do_GET

    return Handler


class _Server(_DualStack, socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512


class _HttpServer(_DualStack, http.server.ThreadingHTTPServer):
    request_queue_size = 512  # the listen backlog: the tests open a couple of hundred connections at once


def serve_http(name: str, ports: Sequence[int], calls: Sequence[tuple[str, str]]) -> None:
    handler = make_http_handler(name, calls)
    servers = [_HttpServer(("::", port), handler) for port in ports]
    log(f"app={name} listening ports={','.join(str(p) for p in ports)}")
    _serve_all(servers)


def _serve_all(servers: Sequence[socketserver.BaseServer]) -> None:
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers[1:]]
    for thread in threads:
        thread.start()
    servers[0].serve_forever()


class TcpHandler(socketserver.BaseRequestHandler):
    mode = "echo"
    name = "tcp"

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = peer_text(self.client_address)
        if self.mode == "hash":
            digest = hashlib.sha256()
            total = 0
            while chunk := sock.recv(262144):
                digest.update(chunk)
                total += len(chunk)
            sock.sendall(f"{total} {digest.hexdigest()}\n".encode())
            log(f"app={self.name} mode=hash peer={peer} bytes={total}")
            return
        if self.mode == "banner":
            sock.sendall(f"BANNER {self.name}\n".encode())
        total = 0
        while chunk := sock.recv(65536):
            total += len(chunk)
            if total <= 4096:
                log(f"app={self.name} mode={self.mode} peer={peer} received={chunk[:200]!r}")
            sock.sendall(chunk)
        # The peer has shut down its writing side; answer with a last line, then our own FIN.
        sock.sendall(f"EOF after {total} bytes\n".encode())
        sock.shutdown(socket.SHUT_WR)
        log(f"app={self.name} mode={self.mode} peer={peer} eof_after={total}")


def serve_tcp(name: str, ports: Sequence[int], mode: str) -> None:
    handler = type("Handler", (TcpHandler,), {"mode": mode, "name": name})
    servers = [_Server(("::", port), handler) for port in ports]
    log(f"app={name} mode={mode} listening ports={','.join(str(p) for p in ports)}")
    _serve_all(servers)


def parse_call(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"expected NAME=http://HOST:PORT/PATH, not {text!r}")
    return name, url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlsmesh.lab.demoapps", description="The demo mesh's apps.")
    sub = parser.add_subparsers(dest="kind", required=True)
    http_parser = sub.add_parser("http", help="a JSON HTTP service that may call upstreams")
    http_parser.add_argument("--name", required=True)
    http_parser.add_argument("--port", type=int, action="append", required=True)
    http_parser.add_argument("--call", type=parse_call, action="append", default=[])
    tcp_parser = sub.add_parser("tcp", help="a raw TCP server: echo, banner (server speaks first) or hash")
    tcp_parser.add_argument("--name", default="tcp")
    tcp_parser.add_argument("--port", type=int, action="append", required=True)
    tcp_parser.add_argument("--mode", choices=("echo", "banner", "hash"), default="echo")
    args = parser.parse_args(argv)
    try:
        if args.kind == "http":
            serve_http(args.name, args.port, args.call)
        else:
            serve_tcp(args.name, args.port, args.mode)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

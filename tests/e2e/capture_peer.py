"""Listener and client run inside the test's network namespaces (stdlib only, passed to python with -c).

    serve NAME LIFETIME SPEC...   SPEC is tcp4:PORT, tcp6:PORT, tcp4t:PORT / tcp6t:PORT (IP_TRANSPARENT, for
                                  TPROXY), udp4:PORT, udp6:PORT. Prints "ready" once every socket is bound, then
                                  answers each TCP connection / UDP datagram with one JSON line describing what it
                                  saw: which listener, local and peer address, SO_ORIGINAL_DST.
    connect HOST PORT [SOURCE]    TCP: sends a line, prints the JSON answer (or {"error": ...}).
    udp HOST PORT                 UDP: sends a datagram, prints the JSON answer (or {"error": ...}).

The test harness kills `serve` by PID; LIFETIME bounds it anyway.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number at SOL_IPV6
IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
SOL_IP = 0
SOL_IPV6 = 41


def original_dst(conn: socket.socket) -> list[object] | None:
    """The destination the client dialed before NAT, read from conntrack; None when there is none."""
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack_from("!H4s", raw, 2)
            return [socket.inet_ntop(socket.AF_INET, addr), port]
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
        return [socket.inet_ntop(socket.AF_INET6, addr), port]
    except OSError:
        return None


def serve(name: str, lifetime: float, specs: list[str]) -> None:
    selector = selectors.DefaultSelector()
    for spec in specs:
        kind, port_text = spec.split(":")
        port = int(port_text)
        family = socket.AF_INET6 if "6" in kind else socket.AF_INET
        sock_type = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
        sock = socket.socket(family, sock_type)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind.endswith("t"):
            if family == socket.AF_INET:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        if sock_type == socket.SOCK_STREAM:
            sock.listen(16)
        selector.register(sock, selectors.EVENT_READ, (kind, port))
    print("ready", flush=True)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            kind, port = key.data
            if kind.startswith("udp"):
                data, peer = ready.recvfrom(2048)
                answer = {"name": name, "listen": port, "proto": "udp", "peer": list(peer[:2]), "got": data.decode()}
                ready.sendto(json.dumps(answer).encode(), peer)
                continue
            conn, peer = ready.accept()
            with conn:
                conn.settimeout(2.0)
                answer = {
                    "name": name,
                    "listen": port,
                    "proto": "tcp",
                    "local": list(conn.getsockname()[:2]),
                    "peer": list(peer[:2]),
                    "orig_dst": original_dst(conn),
                }
                try:
                    conn.recv(256)
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass


def connect(host: str, port: int, source: str | None) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            sock.sendall(b"hello\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    answer: dict[str, object] = json.loads(data) if data else {"error": "no answer"}
    return answer


def udp(host: str, port: int) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3.0)
        try:
            sock.sendto(b"query", (host, port))
            data, _ = sock.recvfrom(4096)
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    answer: dict[str, object] = json.loads(data)
    return answer


def main(argv: list[str]) -> None:
    command = argv[0]
    if command == "serve":
        serve(argv[1], float(argv[2]), argv[3:])
    elif command == "connect":
        print(json.dumps(connect(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else None)))
    elif command == "udp":
        print(json.dumps(udp(argv[1], int(argv[2]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

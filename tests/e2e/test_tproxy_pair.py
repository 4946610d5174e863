"""TPROXY over IPv6 and IPv4 between two network namespaces this test builds: a mesh caller and a TPROXY pod.

"client" (2001:db8::1/64, 198.18.1.1/30) runs the init step in REDIRECT mode and a sidecar whose only mesh
destination is the server; "server" (2001:db8::2/64, 198.18.1.2/30) runs the init step with `--interception-mode
TPROXY` and a sidecar with `inbound.interception_mode: TPROXY` (CAP_NET_ADMIN, as the injector gives it), with its
dual-stack inbound listener on `[::]:15006`. The client's plaintext connection to the server's app is captured,
carried in mTLS, TPROXYed into the server's sidecar and dialed to the app from the client's own address: the app
prints the peer it saw, which must be the client namespace's address of that family. The addresses come from the
IPv6 documentation range and the IPv4 benchmarking range and exist only inside the two namespaces. Namespaces and
processes are removed even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mtlsmesh.conventions import PROXY_GID, PROXY_UID
from tests.pki import Pki

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = {"client": ("2001:db8::1", "198.18.1.1"), "server": ("2001:db8::2", "198.18.1.2")}
APP_PORT = 9080

APP = f"""
import socket
server = socket.socket(socket.AF_INET6)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", {APP_PORT}))
server.listen(16)
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    print("peer", peer[0].removeprefix("::ffff:"), data.decode(), flush=True)
    conn.sendall(data[::-1])
    conn.close()
"""

CLIENT = """
import socket, sys
client = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
client.sendall(sys.argv[3].encode())
client.shutdown(socket.SHUT_WR)
reply = b""
while chunk := client.recv(65536):
    reply += chunk
print(reply.decode())
"""


def run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


@pytest.fixture
def pair() -> Iterator[dict[str, str]]:
    tag = f"mtpx{os.getpid()}"
    names = {"client": f"{tag}c", "server": f"{tag}s"}
    created: list[str] = []
    try:
        for ns in names.values():
            run(["ip", "netns", "add", ns])
            created.append(ns)
        run(["ip", "link", "add", f"{tag}c", "type", "veth", "peer", "name", f"{tag}s"])
        for role, ns in names.items():
            dev = ns  # each end of the veth is named like its namespace
            ip6, ip4 = ADDRESSES[role]
            run(["ip", "link", "set", dev, "netns", ns])
            for argv in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad"],
                ["ip", "addr", "add", f"{ip4}/30", "dev", dev],
                ["ip", "link", "set", dev, "up"],
            ):
                run(["ip", "netns", "exec", ns, *argv])
        yield names
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{tag}c"], capture_output=True, timeout=30)


def start(ns: str, argv: list[str], *, proxy: bool = False, caps: bool = False) -> subprocess.Popen[str]:
    prefix = ["ip", "netns", "exec", ns]
    if proxy:
        prefix += ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_GID}", "--clear-groups"]
    if caps:
        prefix += ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"]
    return subprocess.Popen(
        [*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def wait_for_line(process: subprocess.Popen[str], stream: str, needle: str, timeout: float = 30) -> list[str]:
    pipe = process.stdout if stream == "stdout" else process.stderr
    assert pipe is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} from {process.args}: {lines}")


def write_config(directory: Path, pki: Pki, name: str, extra: dict[str, object]) -> Path:
    files = pki.issue(name)
    for path in (files.cert, files.key, files.bundle):
        os.chown(path, PROXY_UID, PROXY_GID)  # the key stays 0600, owned by the proxy uid
    for path in {directory / "pki", Path(files.cert).parent}:
        path.chmod(0o755)
    config = directory / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump({"credentials": {"cert": files.cert, "key": files.key, "bundle": files.bundle}, **extra})
    )
    config.chmod(0o644)
    return config


def test_the_app_sees_the_mesh_caller_over_ipv6_and_ipv4(pair: dict[str, str], proxy_dir: Path) -> None:
    pki = Pki(proxy_dir / "pki")
    server_id = str(pki.id_of("server"))
    server_ips = ADDRESSES["server"]
    client_cfg = write_config(
        proxy_dir,
        pki,
        "client",
        {
            "outbound": {
                "listen": "[::]:15001",
                "destinations": [
                    {"cidrs": [f"{ip}/{128 if ':' in ip else 32}" for ip in server_ips], "identities": [server_id]}
                ],
            },
            "inbound": {"enabled": False},
        },
    )
    server_cfg = write_config(
        proxy_dir,
        pki,
        "server",
        {"inbound": {"listen": "[::]:15006", "mode": "strict", "interception_mode": "TPROXY"}},
    )
    mesh = [sys.executable, "-m", "mtlsmesh"]
    run(["ip", "netns", "exec", pair["client"], *mesh, "iptables"])
    run(["ip", "netns", "exec", pair["server"], *mesh, "iptables", "--interception-mode", "TPROXY"])
    processes: list[subprocess.Popen[str]] = []
    try:
        for role, config in (("client", client_cfg), ("server", server_cfg)):
            sidecar = start(pair[role], [*mesh, "sidecar", "--config", str(config)], proxy=True, caps=role == "server")
            processes.append(sidecar)
            wait_for_line(sidecar, "stderr", "event=ready")
        app = start(pair["server"], [sys.executable, "-c", APP])
        processes.append(app)
        wait_for_line(app, "stdout", "listening")
        for server_ip, client_ip in zip(server_ips, ADDRESSES["client"], strict=True):
            message = f"hello-{server_ip}"
            argv = [sys.executable, "-c", CLIENT, server_ip, str(APP_PORT), message]
            client = subprocess.run(
                ["ip", "netns", "exec", pair["client"], *argv], capture_output=True, text=True, timeout=30, check=False
            )
            assert client.returncode == 0, client.stderr
            assert client.stdout.strip() == message[::-1]
            seen = wait_for_line(app, "stdout", message)[-1]
            assert seen == f"peer {client_ip} {message}"  # the caller's own address, not 127.0.0.6 or ::6
        for process in processes:
            process.terminate()
        logs = [process.communicate(timeout=20)[1] for process in processes[:2]]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # only what this test started
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
    server_conn = [line for line in logs[1].splitlines() if "logger=mtlsmesh.conn" in line and "dir=inbound" in line]
    assert len(server_conn) == 2, logs[1]
    client_id = str(pki.id_of("client"))
    for line, (server_ip, client_ip) in zip(
        server_conn, zip(server_ips, ADDRESSES["client"], strict=True), strict=True
    ):
        host = f"[{server_ip}]" if ":" in server_ip else server_ip
        assert f"orig_dst={host}:{APP_PORT}" in line and f"peer_id={client_id}" in line, line
        assert "decision=mtls" in line and "reason=closed" in line, line
        assert f"client={f'[{client_ip}]' if ':' in client_ip else client_ip}:" in line, line
    client_out = [line for line in logs[0].splitlines() if "dir=outbound" in line]
    assert len(client_out) == 2 and all(f"peer_id={server_id}" in line for line in client_out), logs[0]

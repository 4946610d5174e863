"""The sidecar in transparent mode against real capture rules, in a network namespace this test creates.

One "pod" calls its own service IP through its sidecar, the path istio-iptables keeps for it (docs/ARCHITECTURE.md §3):
the app dials 198.18.0.1:9080 → OUTPUT REDIRECT to the outbound listener (15001) → the sidecar, running as uid
1337, dials 198.18.0.1:9080 with mTLS → that dial is redirected to the inbound listener (15006) → the inbound side
reads the original destination, terminates mTLS, and dials the app from 127.0.0.6, which the rules let through.
Both original-destination lookups are the kernel's. Needs root; the namespace and processes are removed even when
the test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mtlsmesh.conventions import PROXY_GID, PROXY_UID
from tests.e2e import harness
from tests.pki import Pki

ROOT = Path(__file__).resolve().parents[2]
SERVICE_IP = "198.18.0.1"
APP_PORT = 9080

# nat OUTPUT, in the order docs/ARCHITECTURE.md §3 gives (the parts a pod calling itself goes through).
RULES = [
    ["-o", "lo", "-s", "127.0.0.6", "-j", "RETURN"],
    ["-o", "lo", "!", "-d", "127.0.0.1", "-m", "owner", "--uid-owner", str(PROXY_UID), "-j", "REDIRECT",
     "--to-ports", "15006"],
    ["-m", "owner", "--uid-owner", str(PROXY_UID), "-j", "RETURN"],
    ["-d", "127.0.0.1", "-j", "RETURN"],
    ["-j", "REDIRECT", "--to-ports", "15001"],
]  # fmt: skip

APP = f"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("{SERVICE_IP}", {APP_PORT}))
server.listen(4)
print("listening", flush=True)
conn, peer = server.accept()
print("peer", peer[0], flush=True)
data = b""
while chunk := conn.recv(65536):
    data += chunk
conn.sendall(data[::-1])
conn.close()
"""

CLIENT = f"""
import socket
client = socket.create_connection(("{SERVICE_IP}", {APP_PORT}), timeout=10)
client.sendall(b"hello through the mesh")
client.shutdown(socket.SHUT_WR)
reply = b""
while chunk := client.recv(65536):
    reply += chunk
print(reply.decode())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    rules = [["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", *rule] for rule in RULES]
    with harness.loopback_namespace("shltp", [f"{SERVICE_IP}/24"], rules) as name:
        yield name


def start(netns: str, argv: list[str], *, as_proxy: bool = False) -> subprocess.Popen[str]:
    prefix = ["ip", "netns", "exec", netns]
    if as_proxy:
        prefix += ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_GID}", "--clear-groups"]
    return subprocess.Popen(
        [*prefix, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


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


@pytest.mark.root
def test_a_pod_calls_its_own_service_through_outbound_and_inbound(netns: str, proxy_dir: Path) -> None:
    pki = Pki(proxy_dir / "pki")
    files = pki.issue("web")
    for path in (files.cert, files.key, files.bundle):
        os.chown(path, PROXY_UID, PROXY_GID)  # the key stays 0600, owned by the proxy uid
    for directory in (proxy_dir / "pki", Path(files.cert).parent):
        directory.chmod(0o755)
    config = proxy_dir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "credentials": {"cert": files.cert, "key": files.key, "bundle": files.bundle},
                "outbound": {
                    "listen": "[::]:15001",  # dual stack: the IPv4 app's connection arrives as ::ffff:198.18.0.1
                    "destinations": [
                        {"cidrs": [f"{SERVICE_IP}/32"], "ports": [APP_PORT], "identities": [str(pki.id_of("web"))]}
                    ],
                },
                "inbound": {"listen": "0.0.0.0:15006", "mode": "strict"},
            }
        )
    )
    config.chmod(0o644)
    processes: list[subprocess.Popen[str]] = []
    try:
        sidecar = start(netns, [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(config)], as_proxy=True)
        processes.append(sidecar)
        wait_for_line(sidecar, "stderr", "event=ready")
        app = start(netns, [sys.executable, "-c", APP])
        processes.append(app)
        wait_for_line(app, "stdout", "listening")
        client = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=30
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "hello through the mesh"[::-1]
        app_out, _ = app.communicate(timeout=10)
        assert "peer 127.0.0.6" in app_out
        sidecar.terminate()
        _, sidecar_err = sidecar.communicate(timeout=20)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # only what this test started
                process.wait(timeout=10)
    conn = [line for line in sidecar_err.splitlines() if "logger=mtlsmesh.conn" in line]
    outbound = [line for line in conn if "dir=outbound" in line]
    inbound = [line for line in conn if "dir=inbound" in line]
    assert len(outbound) == 1 and len(inbound) == 1, sidecar_err
    for line in (outbound[0], inbound[0]):
        assert f"orig_dst={SERVICE_IP}:{APP_PORT}" in line
        assert "decision=mtls" in line and "peer_id=spiffe://cluster.local/ns/default/sa/web" in line
        assert "reason=closed" in line
    assert sidecar.returncode == 0
    print("\n".join(conn))

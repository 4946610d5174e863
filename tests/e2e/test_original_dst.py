"""`netio.original_dst` against the kernel: REDIRECT rules in a network namespace this test creates.

A dual-stack listener (IPV6_V6ONLY off) accepts an IPv4 client as `::ffff:a.b.c.d`: the lookup must still ask the
IPv4 NAT table (docs/ARCHITECTURE.md §13). Needs root; the namespace is removed even when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import harness

ROOT = Path(__file__).resolve().parents[2]
LISTEN_PORT = 15001
V4_DST = "198.18.0.55"
V6_DST = "2001:db8:55::55"  # RFC 3849 documentation range, never routed

PROBE = f"""
import json, socket, trio
from mtlsmesh import netio

async def main():
    listener = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind(("::", {LISTEN_PORT}))
    listener.listen(8)
    out = {{}}
    for name, family, dst in (("v4", socket.AF_INET, ("{V4_DST}", 9080)), ("v6", socket.AF_INET6, ("{V6_DST}", 9443))):
        client = trio.socket.socket(family, socket.SOCK_STREAM)
        await client.connect(dst)
        accepted, _ = await listener.accept()
        ip, port = netio.original_dst(trio.SocketStream(accepted))
        out[name] = [str(ip), port, accepted.getsockname()[0]]
        accepted.close(); client.close()
    print(json.dumps(out))

trio.run(main)
"""


@pytest.fixture
def netns() -> Iterator[str]:
    rules = [
        [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dst, "--dport", port, "-j", "REDIRECT",
         "--to-ports", str(LISTEN_PORT)]
        for tool, dst, port in (("iptables", V4_DST, "9080"), ("ip6tables", V6_DST, "9443"))
    ]  # fmt: skip
    with harness.loopback_namespace("shlod", ["198.18.0.1/24", "2001:db8:55::1/64"], rules) as name:
        yield name


@pytest.mark.root
def test_original_destination_for_ipv4_on_a_dual_stack_socket_and_for_ipv6(netns: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["v4"][:2] == [V4_DST, 9080]
    assert found["v4"][2].startswith("::ffff:")  # the trap: an IPv4 connection seen through a v6 socket
    assert found["v6"][:2] == [V6_DST, 9443]

"""End-to-end checks of the lab itself: it refuses what it cannot do, and leaves nothing behind however it ends.

These use pods outside the mesh only (no sidecar), so they test the lab's own plumbing: the bridge, routing
through the node, Service DNAT, teardown on failure, on SIGTERM, and `cleanup_stale` after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtlsmesh.errors import LabError
from mtlsmesh.lab import netns
from mtlsmesh.lab.pods import Lab, child_env, http_get, preflight
from mtlsmesh.lab.topology import AppSpec, PodSpec, ServiceSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

PLAIN = Topology(
    pods=(
        PodSpec("a", mesh=False, apps=(AppSpec("http", ("http", "--name", "a", "--port", "8080"), ports=(8080,)),)),
        PodSpec("b", mesh=False),
    ),
    services=(ServiceSpec("a", 80, "a", 8080),),
)

# A child process that builds a lab, prints its prefix and its apps' PIDs, then waits to be signalled.
CHILD = textwrap.dedent(
    """
    import signal, sys
    from mtlsmesh.lab.pods import Lab
    from mtlsmesh.lab.topology import AppSpec, PodSpec, Topology
    topology = Topology(pods=(PodSpec("a", mesh=False, apps=(AppSpec("http", ("http", "--name", "a", "--port",
        "8080"), ports=(8080,)),)),))
    with Lab(topology, tag="mmt") as lab:
        print(lab.prefix, *lab.processes(), flush=True)
        signal.pause()
    """
)


def test_plain_pods_route_through_the_node_and_vip() -> None:
    for lab in harness.open_lab(PLAIN):
        # A node's packets to a pod on its bridge are bridged when the host has br_netfilter loaded, routed when it
        # does not: both ways, per namespace, when this kernel has the switch.
        bridge_nf = [Path("/proc/sys/net/bridge", f"bridge-nf-call-{t}") for t in ("iptables", "ip6tables")]
        for bridged in (True, False) if all(p.exists() for p in bridge_nf) else (None,):
            if bridged is not None:
                netns.run_in_netns(lab.node_ns, functools.partial(_write_all, bridge_nf, str(int(bridged))))
            for family in (4, 6):  # dual stack: each pod and the Service answer on an address of each family
                status, body = http_get(lab.pod_ns("b"), lab.ip("a", family), 8080, f"/direct-v{family}")
                assert status == 200
                assert f'"peer": "{lab.ip("b", family)}"'.encode() in body
                status, body = http_get(lab.pod_ns("b"), lab.vip("a", family), 80, f"/via-vip-v{family}")
                assert status == 200
                assert f'"peer": "{lab.ip("b", family)}"'.encode() in body  # DNAT only: the caller's own address
                assert f"/via-vip-v{family}" in lab.app_log("a", "http")
                # The hairpin: pod a through its own Service comes back to itself, SNATed to the node as kube-proxy
                # does (the gateway of its family is the caller it sees), instead of timing out.
                status, body = http_get(lab.pod_ns("a"), lab.vip("a", family), 80, f"/own-vip-v{family}")
                assert status == 200
                gateway = "198.18.0.1" if family == 4 else "2001:db8:18::1"
                assert f'"peer": "{gateway}"'.encode() in body
        # Nothing of the lab is visible outside its namespaces: no interface with its prefix on the host.
        host_links = netns.run(["ip", "-o", "link", "show"])
        assert lab.prefix not in host_links


def _write_all(paths: list[Path], value: str) -> None:
    for path in paths:
        path.write_text(value)


def test_failed_start_leaves_nothing() -> None:
    broken = Topology(
        pods=(PodSpec("a", mesh=False, apps=(AppSpec("bad", ("tcp", "--port", "not-a-port"), ports=(8080,)),)),)
    )
    lab = Lab(broken, tag="mme")
    with pytest.raises(LabError, match="has exited"):
        lab.start()
    harness.assert_nothing_left(lab, [])


@pytest.mark.parametrize(
    ("prefix", "path", "message"),
    [
        (["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"], None, "run it as root"),
        ([], "/nonexistent", "tcpdump is missing: apt-get install -y tcpdump"),
    ],
)
def test_refuses_what_it_cannot_run(prefix: list[str], path: str | None, message: str) -> None:
    env = child_env()
    if path is not None:
        env["PATH"] = path
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "mtlsmesh", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("mtlsmesh: error: ")
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@contextlib.contextmanager
def child_lab() -> Iterator[tuple[subprocess.Popen[str], str, list[int]]]:
    """A child process holding a lab: yields it, the lab's prefix and its apps' PIDs. Afterwards the child is
    killed if still there and `cleanup_stale` removes whatever of its lab a failed test left."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=child_env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    prefix = ""
    try:
        assert child.stdout is not None
        words = child.stdout.readline().split()
        assert words, "the child lab did not start"
        prefix = words[0]
        yield child, prefix, [int(word) for word in words[1:]]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if prefix:
            netns.cleanup_stale(prefix)


def test_sigterm_tears_the_lab_down() -> None:
    with child_lab() as (child, prefix, pids):
        assert [name for name in netns.list_namespaces() if name.startswith(prefix)]
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(timeout=30) != 0
        assert not harness.leftovers(prefix)
        assert not [pid for pid in pids if netns.alive(pid)]


def test_cleanup_stale_after_sigkill() -> None:
    with child_lab() as (child, prefix, pids):
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        left = [name for name in netns.list_namespaces() if name.startswith(prefix)]
        assert left, "a SIGKILLed lab cannot clean up: its namespaces should still be there"
        assert f"{prefix}-" in netns.stale_prefixes("mmt")
        removed = netns.cleanup_stale(prefix)
        assert set(left) < set(removed)  # the namespaces, and the work dir
        assert not harness.leftovers(prefix)
        assert not [pid for pid in pids if netns.alive(pid)]


@pytest.mark.parametrize(("prefix", "message"), [("", "too short"), ("mm", "too short")])
def test_cleanup_stale_refuses_short_prefix(prefix: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        netns.cleanup_stale(prefix)


def test_preflight_names_missing_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        LabError,
        match=r"missing ip, iptables, iptables-restore, ip6tables, ip6tables-restore, setpriv: install them \(apt-get",
    ):
        preflight()

"""End-to-end: a sidecar killed and started again, and a certificate rotated under traffic.

Its own lab, since these scenarios disturb the pods; each test leaves both sidecars running and serving.
"""

from __future__ import annotations

import datetime
import signal
import threading
import time
from pathlib import Path

import pytest

from mtlsmesh import ca
from mtlsmesh.identity import parse_spiffe_id
from mtlsmesh.lab.pods import Lab
from mtlsmesh.lab.topology import AppSpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

TOPOLOGY = Topology(
    pods=(
        PodSpec(
            "server",
            apps=(
                AppSpec("echo", ("tcp", "--name", "server-echo", "--port", "7000", "--mode", "echo"), ports=(7000,)),
            ),
        ),
        PodSpec("client"),
    ),
)

lab = harness.lab_fixture(TOPOLOGY)


def echo_ok(lab: Lab, payload: bytes) -> bool:
    return harness.exchange(lab, "client", lab.ip("server"), 7000, payload) == harness.echo_answer(payload)


@pytest.mark.parametrize("pod", ["server", "client"])
def test_killed_sidecar_comes_back(lab: Lab, pod: str) -> None:
    assert echo_ok(lab, b"before\n")
    old_pid = lab.sidecar_pid(pod)
    lab.kill_sidecar(pod, signal.SIGKILL)
    # Capture rules stay, nobody listens: the app's connections fail instead of bypassing the mesh.
    harness.refused(lambda: harness.exchange(lab, "client", lab.ip("server"), 7000, b"while dead\n", timeout=5))
    lab.restart_sidecar(pod)
    assert lab.sidecar_pid(pod) != old_pid
    assert echo_ok(lab, b"after restart\n")


def test_certificate_rotation_under_traffic(lab: Lab, tmp_path: Path) -> None:
    assert lab.authority is not None
    probe = ca.issue_svid(
        lab.authority,
        parse_spiffe_id("spiffe://cluster.local/ns/default/sa/probe"),
        now=datetime.datetime.now(datetime.UTC),
    )
    probe.write_to_dir(tmp_path)
    serial_before = harness.server_certificate_serial(lab, "server", 7000, tmp_path)

    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal done
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            payload = f"rotation {done}\n".encode()
            try:
                if not echo_ok(lab, payload):
                    failures.append(f"connection {done}: wrong answer")
            except OSError as exc:
                failures.append(f"connection {done}: {exc!r}")
            done += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.5)
        lab.rotate_svid("server")
        lab.rotate_svid("client")
        deadline = time.monotonic() + 15
        serial_after = serial_before
        while serial_after == serial_before and time.monotonic() < deadline:
            time.sleep(0.25)
            serial_after = harness.server_certificate_serial(lab, "server", 7000, tmp_path)
        time.sleep(1.0)  # more traffic on the new certificates
    finally:
        stop.set()
        thread.join(timeout=40)
    assert serial_after != serial_before, "the server never presented its new certificate"
    assert done >= 5, f"only {done} connections ran during the rotation"
    assert failures == []

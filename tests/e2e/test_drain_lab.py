"""End-to-end: a lab pod drained with `mtlsmesh drain` and its log level changed with `mtlsmesh log-level`, run
inside the pod's network namespace (`--pod`) with the admin token its sidecar wrote in a directory only uid 1337
can enter, as `kubectl exec -c mtlsmesh-proxy -- mtlsmesh drain` would in an injected pod.

The pods: web (mesh, HTTP on 9080) and client (mesh). After the drain web's health answers the node's probe with
503, a new connection from client is refused, and web's sidecar is still running until the lab stops it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtlsmesh.lab import netns
from mtlsmesh.lab.pods import Lab, as_uid, child_env, http_get
from mtlsmesh.lab.topology import AppSpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

TOPOLOGY = Topology(
    pods=(
        PodSpec("web", apps=(AppSpec("http", ("http", "--name", "web", "--port", "9080"), ports=(9080,)),)),
        PodSpec("client"),
    ),
)

lab = harness.lab_fixture(TOPOLOGY)


def mtlsmesh(lab: Lab, pod: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *args, "--pod", lab.pod_ns(pod)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


def test_drain_a_lab_pod_with_the_cli(lab: Lab) -> None:
    token = str(lab.admin_token_path("web"))
    status, _ = harness.get(lab, "client", lab.ip("web"), 9080, "/")
    assert status == 200

    # Another uid in the pod cannot read the token: one line says who can.
    argv = as_uid(65534, [sys.executable, "-m", "mtlsmesh", "drain", "--token-file", token])
    nobody = subprocess.run(
        netns.ns_exec(lab.pod_ns("web"), argv), capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert nobody.returncode == 2 and nobody.stdout == ""
    assert nobody.stderr == (
        f"mtlsmesh: error: cannot read the admin token {token}: permission denied (run as uid 1337 or root)\n"
    )

    changed = mtlsmesh(lab, "web", "log-level", "debug", "--token-file", token, "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == [{"admin": "127.0.0.1:15000", "log_level": "debug", "changed": True}]

    drained = mtlsmesh(lab, "web", "drain", "--token-file", token, "--wait", "--json")
    assert drained.returncode == 0, drained.stderr
    assert json.loads(drained.stdout) == [
        {"admin": "127.0.0.1:15000", "draining": True, "ready": False, "open_inbound": 0, "open_outbound": 0}
    ]
    # The kubelet's probe from the node now fails, new connections are refused, and the sidecar stays up.
    assert http_get(lab.node_ns, lab.ip("web"), 15021, "/healthz/ready")[0] == 503
    harness.refused(lambda: harness.get(lab, "client", lab.ip("web"), 9080, "/"))
    assert netns.alive(lab.sidecar_pid("web"))
    status_rows = json.loads(mtlsmesh(lab, "web", "status", "--json").stdout)
    assert status_rows[0]["draining"] is True
    log = lab.sidecar_log("web")
    assert "event=log_level level=debug via=admin" in log
    assert log.count("event=drain_requested via=admin") == 1
    assert "Traceback" not in log

"""End-to-end: `mtlsmesh check` and `mtlsmesh explain` in lab pods, against what really happens to connections.

The pods:
  web       mesh; HTTP on 9080 (PERMISSIVE), 9081 (STRICT, DENY sa/intruder), 9099 (excluded from capture)
  client    mesh; outbound port 9099 excluded from capture
  intruder  mesh
  broken    mesh; its capture rules are deleted by hand in the test (so nothing else uses it)
  outside   outside the mesh (no capture, no sidecar)

Every command runs as an operator would run it: `python -m mtlsmesh check --pod NS` as a process, which enters the
pod's network namespace and reads the live rules, the sidecar's admin endpoint and its files there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from mtlsmesh.lab.pods import Lab, child_env
from mtlsmesh.lab.topology import AppSpec, IdentitySpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
INTRUDER_ID = "spiffe://cluster.local/ns/default/sa/intruder"

TOPOLOGY = Topology(
    pods=(
        PodSpec(
            "web",
            apps=(
                AppSpec(
                    "http",
                    ("http", "--name", "web", "--port", "9080", "--port", "9081", "--port", "9099"),
                    ports=(9080, 9081, 9099),
                ),
            ),
            exclude_inbound_ports=(9099,),
            sidecar={
                "inbound": {"mode": "strict", "ports": {9080: {"mode": "permissive"}}},
                "authorization": [{"action": "DENY", "principals": [INTRUDER_ID], "ports": [9081]}],
            },
        ),
        PodSpec("client", exclude_outbound_ports=(9099,)),
        PodSpec("intruder"),
        PodSpec("broken"),
        PodSpec("outside", mesh=False),
    ),
)

lab = harness.lab_fixture(TOPOLOGY)


def mtlsmesh(lab: Lab, pod: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mtlsmesh ARGS --pod <the pod's namespace>` (its full name: other labs may have a pod so named)."""
    return subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *args, "--pod", lab.pod_ns(pod)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


def as_json(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert not result.stderr, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def test_check_passes_in_a_healthy_pod(lab: Lab) -> None:
    result = mtlsmesh(lab, "client", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names == ["✓ config", "✓ capture", "✓ listening", "✓ health", "✓ svid", "✓ chain", "✓ bundle", "- ca",
                     "- clock"]  # fmt: skip
    assert "ports 15001, 15006, 15000, 15021, 15090 bound by uid 1337" in result.stdout
    rows = as_json(mtlsmesh(lab, "client", "check", "--json"))
    assert [row["ok"] for row in rows] == [True] * 7 + [None, None]
    assert CLIENT_ID in next(row["detail"] for row in rows if row["check"] == "svid")


def test_rules_deleted_by_hand_fail_check_and_explain_says_why(lab: Lab) -> None:
    for table_chain in (("OUTPUT", "MTLSMESH_OUTPUT"), ("PREROUTING", "MTLSMESH_INBOUND")):
        lab.run_in("broken", ["iptables", "-t", "nat", "-D", table_chain[0], "-p", "tcp", "-j", table_chain[1]])
    result = mtlsmesh(lab, "broken", "check")
    assert result.returncode == 1, result.stdout
    [capture] = [line for line in result.stdout.splitlines() if line.startswith("✗ capture:")]
    assert "no jump into the capture chains (are the rules missing?)" in capture
    assert "    hint: apply the capture rules again: the init step, `mtlsmesh iptables`" in result.stdout
    assert "✓ health" in result.stdout and "✓ listening" in result.stdout  # the sidecar itself is fine

    [found] = as_json(mtlsmesh(lab, "broken", "explain", "--to", f"{lab.ip('web')}:9081", "--json"))
    assert found["decision"] == "not_captured" and found["captured"] is False
    assert "are the rules missing?" in found["verdict"]
    # And so it is: the call leaves in plaintext, which web's STRICT port refuses.
    harness.refused(lambda: harness.get(lab, "broken", lab.ip("web"), 9081, "/plain"))


def test_an_excluded_port_is_explained_by_its_rule(lab: Lab) -> None:
    # The pod has capture rules for both families (iptables and ip6tables): explained once for each.
    found = as_json(mtlsmesh(lab, "web", "explain", "--from", CLIENT_ID, "--port", "9099", "--json"))
    assert [inbound["family"] for inbound in found] == ["ipv4", "ipv6"]
    for inbound in found:
        assert inbound["decision"] == "not_captured"
        assert (
            inbound["capture"]["deciding_rule"]
            == "-A MTLSMESH_INBOUND -p tcp -m tcp --dport 9099 -j RETURN sends it back"
        )
    [outbound] = as_json(mtlsmesh(lab, "client", "explain", "--to", f"{lab.ip('web')}:9099", "--json"))
    assert outbound["decision"] == "not_captured"
    assert "--dport 9099 -j RETURN" in outbound["capture"]["deciding_rule"]
    # What it says happens: the client's call to 9099 reaches web's app in plaintext, from the client's address.
    marker = harness.unique_marker("excluded")
    status, _ = harness.get(lab, "client", lab.ip("web"), 9099, "/excluded", marker)
    assert status == 200
    line = next(line for line in lab.app_log("web", "http").splitlines() if marker in line)
    assert f"peer={lab.ip('client')}:" in line  # not 127.0.0.6: the sidecar never saw it


def test_a_permissive_port_called_in_plaintext_is_passed_through_live(lab: Lab) -> None:
    status, _ = harness.get(lab, "outside", lab.ip("web"), 9080, "/plain")
    assert status == 200
    found, v6 = as_json(mtlsmesh(lab, "web", "explain", "--from", "plaintext", "--port", "9080", "--live", "--json"))
    assert (v6["family"], v6["decision"], v6["capture"]["port"]) == ("ipv6", "passthrough", 15006)
    assert found["capture"]["outcome"] == "captured" and found["capture"]["port"] == 15006
    assert found["mode"] == "permissive" and found["decision"] == "passthrough"
    assert found["authorization"]["allowed"] is True
    live = found["live"]
    assert live["decision"] == "passthrough" and live["agrees"] is True
    assert any(
        entry["decision"] == "passthrough" and entry["client"].startswith(lab.ip("outside") + ":")
        for entry in live["recent"]
    ), live["recent"]
    text = mtlsmesh(lab, "web", "explain", "--from", "plaintext", "--port", "9080")
    assert text.returncode == 0
    assert text.stdout.splitlines()[-1].startswith(
        "verdict: port 9080 from a plaintext client is captured, passed through in plaintext"
    )


def test_a_denied_identity_is_explained_and_the_sidecar_agrees(lab: Lab) -> None:
    harness.refused(lambda: harness.get(lab, "intruder", lab.ip("web"), 9081, "/denied"))
    found, v6 = as_json(mtlsmesh(lab, "web", "explain", "--from", INTRUDER_ID, "--port", "9081", "--live", "--json"))
    assert (v6["family"], v6["decision"], v6["authorization"]["rule"]) == ("ipv6", "refuse", 0)
    assert found["decision"] == "refuse"
    assert found["authorization"] == {
        "allowed": False, "rule": 0, "reason": f"rule 0 DENY matches {INTRUDER_ID} on port 9081", "action": "DENY",
        "principals": [INTRUDER_ID],
    }  # fmt: skip
    assert found["live"]["decision"] == "refuse"
    assert any(
        (entry["decision"], entry["reason"], entry["peer_id"]) == ("mtls", "denied", INTRUDER_ID)
        for entry in found["live"]["recent"]
    ), found["live"]["recent"]
    # The intruder's side: its outbound call is mTLS to web, as explain says from there.
    [out] = as_json(mtlsmesh(lab, "intruder", "explain", "--to", f"{lab.ip('web')}:9081", "--json"))
    assert out["decision"] == "mtls" and out["identities"] == ["spiffe://cluster.local/ns/default/sa/web"]


def test_iptables_check_json_lists_the_differences(lab: Lab) -> None:
    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", lab.pod_ns("client"), sys.executable, "-m", "mtlsmesh", "iptables", "--check"]
        return subprocess.run([*argv, *flags, "--json"], capture_output=True, text=True, timeout=60, env=child_env())

    same = check("--exclude-outbound-ports", "9099")  # the flags the pod's init step ran with
    assert (same.returncode, json.loads(same.stdout)) == (0, []), same.stderr
    other = check()  # without the exclusion: the rule that RETURNs 9099 is one too many
    assert other.returncode == 1
    rows = json.loads(other.stdout)
    assert rows and all(set(row) == {"backend", "difference"} for row in rows)
    assert any("--dport 9099 -j RETURN" in row["difference"] for row in rows)


IDENTITY = Topology(pods=(PodSpec("app"),), identity=IdentitySpec(ttl="1h"))


def test_check_in_identity_mode_asks_the_ca_and_compares_clocks() -> None:
    for identity_lab in harness.open_lab(IDENTITY):
        result = mtlsmesh(identity_lab, "app", "check")
        assert result.returncode == 0, result.stdout + result.stderr
        rows = {row["check"]: row for row in as_json(mtlsmesh(identity_lab, "app", "check", "--json"))}
        assert rows["config"]["detail"].endswith("identity mode")
        assert (
            rows["ca"]["ok"] is True
            and "spiffe://cluster.local/ns/mtlsmesh-system/sa/mtlsmesh-ca" in rows["ca"]["detail"]
        )
        assert rows["clock"]["ok"] is True and "from the CA's clock" in rows["clock"]["detail"]
        assert rows["chain"]["ok"] is None  # no files: the sidecar checked the CA's chain itself
        assert rows["bundle"]["ok"] is True and rows["svid"]["ok"] is True
        # The CA stopped: the check says so, with a hint, and fails.
        identity_lab.stop_ca()
        down = {row["check"]: row for row in as_json(mtlsmesh(identity_lab, "app", "check", "--json"))}
        # The check runs as root in the pod, so its connection is captured: the outbound sidecar accepts it, fails to
        # reach the CA and resets it. Whether that reset lands before the connect returns or during the TLS
        # handshake is a race between the two processes; either way the detail names the reset.
        detail = down["ca"]["detail"]
        assert down["ca"]["ok"] is False and "198.18.0.1:15012" in detail and "reset by peer" in detail, detail
        assert down["ca"]["hint"].startswith("is the CA service up")
        assert down["clock"]["ok"] is None
        assert mtlsmesh(identity_lab, "app", "check").returncode == 1


def test_pod_names_a_namespace_by_its_suffix_and_refuses_an_ambiguous_one() -> None:
    suffix = f"opcli{os.getpid()}"
    names = [f"mmq{os.getpid()}a-{suffix}", f"mmq{os.getpid()}b-{suffix}"]

    def status() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "mtlsmesh", "status", "--pod", suffix]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())

    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        both = status()
        assert both.returncode == 2
        several = f"{suffix!r} is in several labs ({', '.join(names)}): give the namespace's full name"
        assert both.stderr == f"mtlsmesh: error: --pod: {several}\n"
        subprocess.run(["ip", "netns", "del", names[1]], check=True, timeout=30)
        one = status()  # found, entered (no sidecar there): the admin endpoint's refusal, from inside
        assert one.returncode == 2
        assert one.stderr.startswith("mtlsmesh: error: the sidecar's admin endpoint 127.0.0.1:15000 did not answer")
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    gone = status()
    assert gone.stderr.startswith(f"mtlsmesh: error: --pod: no network namespace for pod {suffix!r}")

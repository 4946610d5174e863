"""The capture rules in a real kernel: two network namespaces joined by a veth pair, real sockets, real iptables.

"pod" (198.18.0.1/30, 2001:db8:198:18::1/64) gets the rules through the real CLI (`python -m mtlsmesh iptables`, run
with `ip netns exec`); "peer" (198.18.0.2, 2001:db8:198:18::2) is the rest of the world. Listeners in both answer every
connection with what they saw (capture_peer.py), so each test reads off where a connection landed and which
original destination the kernel kept for it. Namespaces and processes are removed even when a test fails; the
addresses exist only inside the namespaces and are never routed out.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.test_capture import GOLDEN_CASES

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
PEER_SOURCE = (Path(__file__).with_name("capture_peer.py")).read_text()
POD_V4, PEER_V4 = "198.18.0.1", "198.18.0.2"
POD_V6, PEER_V6 = "2001:db8:198:18::1", "2001:db8:198:18::2"
LIFETIME = "60"  # seconds a listener lives at most, even if the harness could not kill it
_counter = itertools.count()


def run(argv: list[str], *, timeout: float = 30, check: bool = True, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def normalized_save(text: str) -> list[str]:
    """iptables-save without comments and counters, and without tables that hold no rule and no own chain."""
    tables: list[list[str]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        tables[-1].append(line.split(" [")[0] if line.startswith(":") else line)
    builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

    def empty(table: list[str]) -> bool:
        chains = [line[1:].split()[0] for line in table if line.startswith(":")]
        return not any(line.startswith("-A") for line in table) and set(chains) <= builtin

    return [line for table in tables if not empty(table) for line in table]


@dataclass
class Pair:
    pod: str
    peer: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def exec(self, ns: str, argv: list[str], *, user: tuple[int, int] | None = None, **kwargs: object) -> str:
        prefix = ["ip", "netns", "exec", ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
        return run(prefix + argv, **kwargs)  # type: ignore[arg-type]

    def mtlsmesh(
        self,
        *args: str,
        check: bool = True,
        user: tuple[int, int] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.pod]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
        clean = {name: value for name, value in os.environ.items() if not name.startswith("MTLSMESH_")}
        env = {**clean, **(env or {}), "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "mtlsmesh", "iptables", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mtlsmesh iptables {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def serve(self, ns: str, name: str, *specs: str) -> None:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-I", "-c", PEER_SOURCE, "serve", name, LIFETIME, *specs]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            raise AssertionError(
                f"listener in {ns} did not start: {line!r} {process.stderr.read() if process.stderr else ''}"
            )

    def connect(
        self, ns: str, host: str, port: int, *, source: str = "", user: tuple[int, int] | None = None
    ) -> dict[str, object]:
        argv = [sys.executable, "-I", "-c", PEER_SOURCE, "connect", host, str(port)] + ([source] if source else [])
        answer: dict[str, object] = json.loads(self.exec(ns, argv, user=user))
        return answer

    def udp(self, ns: str, host: str, port: int) -> dict[str, object]:
        answer: dict[str, object] = json.loads(
            self.exec(ns, [sys.executable, "-I", "-c", PEER_SOURCE, "udp", host, str(port)])
        )
        return answer

    def save(self, ns: str, family: int = 4, backend: str = "") -> str:
        tool = ("iptables" if family == 4 else "ip6tables") + (f"-{backend}" if backend else "") + "-save"
        return self.exec(ns, [tool])


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = f"mcap{os.getpid()}{next(_counter)}"
    pod, peer = f"{tag}p", f"{tag}q"
    created: list[str] = []
    result = Pair(pod, peer)
    try:
        for ns in (pod, peer):
            run(["ip", "netns", "add", ns])
            created.append(ns)
        run(["ip", "link", "add", f"{tag}p", "type", "veth", "peer", "name", f"{tag}q"])
        for ns, ip4, ip6 in ((pod, POD_V4, POD_V6), (peer, PEER_V4, PEER_V6)):
            dev = f"{tag}{ns[-1]}"
            run(["ip", "link", "set", dev, "netns", ns])
            for argv in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{ip4}/30", "dev", dev],
                ["ip", "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad"],
                ["ip", "link", "set", dev, "up"],
            ):
                run(["ip", "netns", "exec", ns, *argv])
        yield result
    finally:
        for process in result.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        # A veth left in the root namespace (creation failed half-way) goes too; its name carries our tag.
        subprocess.run(["ip", "link", "del", f"{tag}p"], capture_output=True, timeout=30)


def landed(answer: dict[str, object]) -> tuple[object, object]:
    """(namespace, listening port) that answered."""
    assert "error" not in answer, answer
    return answer["name"], answer["listen"]


# ---------------------------------------------------------------------------------------------------------------
# Outbound


def test_outbound_tcp_reaches_15001_with_original_destination(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006")
    pair.serve(pair.peer, "peer", "tcp4:9080")
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("peer", 9080)  # before: straight through

    pair.mtlsmesh()
    answer = pair.connect(pair.pod, PEER_V4, 9080)
    assert landed(answer) == ("pod", 15001)
    assert answer["orig_dst"] == [PEER_V4, 9080]
    assert answer["peer"][0] == POD_V4  # type: ignore[index]


@pytest.mark.parametrize(
    ("user", "why"),
    [((1337, 1337), "proxy uid and gid"), ((4242, 1337), "proxy gid only"), ((1337, 4242), "proxy uid only")],
)
def test_proxy_owner_is_not_captured(pair: Pair, user: tuple[int, int], why: str) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006")
    pair.serve(pair.peer, "peer", "tcp4:9080")
    pair.mtlsmesh()
    assert landed(pair.connect(pair.pod, PEER_V4, 9080, user=user)) == ("peer", 9080), why
    assert landed(pair.connect(pair.pod, PEER_V4, 9080, user=(4242, 4242))) == ("pod", 15001)


def test_loopback_and_app_source_are_not_captured(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006", "tcp4:9080")
    pair.mtlsmesh()
    proxy = (1337, 1337)
    # The pod talking to itself over localhost, as the app or as the sidecar.
    assert landed(pair.connect(pair.pod, "127.0.0.1", 9080)) == ("pod", 9080)
    assert landed(pair.connect(pair.pod, "127.0.0.1", 9080, user=proxy)) == ("pod", 9080)
    # The app calling its own pod IP: plaintext inside the pod.
    assert landed(pair.connect(pair.pod, POD_V4, 9080)) == ("pod", 9080)
    # The inbound sidecar dialing the app from 127.0.0.6 is not captured again...
    assert landed(pair.connect(pair.pod, POD_V4, 9080, source="127.0.0.6", user=proxy)) == ("pod", 9080)
    # ...while the outbound sidecar dialing the pod's own IP is sent to the inbound sidecar.
    answer = pair.connect(pair.pod, POD_V4, 9080, user=proxy)
    assert landed(answer) == ("pod", 15006)
    assert answer["orig_dst"] == [POD_V4, 9080]


def test_excluded_outbound_port_and_cidr_go_straight_out(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006")
    pair.serve(pair.peer, "peer", "tcp4:9080", "tcp4:5432")
    pair.mtlsmesh("--exclude-outbound-ports", "5432")
    assert landed(pair.connect(pair.pod, PEER_V4, 5432)) == ("peer", 5432)
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("pod", 15001)
    pair.mtlsmesh("--exclude-outbound-cidrs", f"{PEER_V4}/32")
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("peer", 9080)
    pair.mtlsmesh("--include-outbound-cidrs", "198.19.0.0/16")
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("peer", 9080)
    pair.mtlsmesh("--include-outbound-cidrs", "198.18.0.0/30")
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("pod", 15001)


def test_udp_is_untouched(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006", "udp4:15001", "udp4:15006", "udp4:53")
    pair.serve(pair.peer, "peer", "udp4:53")
    pair.mtlsmesh()
    out = pair.udp(pair.pod, PEER_V4, 53)
    assert (out["name"], out["listen"], out["got"]) == ("peer", 53, "query")
    back = pair.udp(pair.peer, POD_V4, 53)
    assert (back["name"], back["listen"]) == ("pod", 53)


# ---------------------------------------------------------------------------------------------------------------
# Inbound


def test_inbound_tcp_reaches_15006_with_original_port(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4:15006", "tcp4:9080")
    assert landed(pair.connect(pair.peer, POD_V4, 9080)) == ("pod", 9080)
    pair.mtlsmesh()
    answer = pair.connect(pair.peer, POD_V4, 9080)
    assert landed(answer) == ("pod", 15006)
    assert answer["orig_dst"] == [POD_V4, 9080]
    assert answer["peer"][0] == PEER_V4  # type: ignore[index]


def test_health_metrics_and_excluded_inbound_ports_reach_the_app(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15006", "tcp4:15021", "tcp4:15090", "tcp4:9443", "tcp4:9080")
    pair.mtlsmesh("--exclude-inbound-ports", "9443")
    for port in (15021, 15090, 9443):
        assert landed(pair.connect(pair.peer, POD_V4, port)) == ("pod", port)
    assert landed(pair.connect(pair.peer, POD_V4, 9080)) == ("pod", 15006)
    # An explicit list captures only what it lists, and still never 15021/15090.
    pair.mtlsmesh("--inbound-ports", "9443")
    assert landed(pair.connect(pair.peer, POD_V4, 9443)) == ("pod", 15006)
    for port in (15021, 15090, 9080):
        assert landed(pair.connect(pair.peer, POD_V4, port)) == ("pod", port)


# ---------------------------------------------------------------------------------------------------------------
# IPv6 and TPROXY


def test_ipv6_capture(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp6:15001", "tcp6:15006", "tcp6:9080")
    pair.serve(pair.peer, "peer", "tcp6:9080")
    pair.mtlsmesh()
    out = pair.connect(pair.pod, PEER_V6, 9080)
    assert landed(out) == ("pod", 15001)
    assert out["orig_dst"] == [PEER_V6, 9080]
    inbound = pair.connect(pair.peer, POD_V6, 9080)
    assert landed(inbound) == ("pod", 15006)
    assert inbound["orig_dst"] == [POD_V6, 9080]
    proxy = (1337, 1337)
    assert landed(pair.connect(pair.pod, PEER_V6, 9080, user=proxy)) == ("peer", 9080)
    assert landed(pair.connect(pair.pod, "::1", 9080)) == ("pod", 9080)
    # ::6 was added to lo by the init step, so the sidecar can dial the app from it, uncaptured.
    assert landed(pair.connect(pair.pod, POD_V6, 9080, source="::6", user=proxy)) == ("pod", 9080)


def test_no_ipv6_leaves_ip6tables_alone(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp6:15001", "tcp6:15006")
    pair.serve(pair.peer, "peer", "tcp6:9080")
    pair.mtlsmesh("--no-ipv6")
    assert "MTLSMESH" not in pair.save(pair.pod, 6)
    assert landed(pair.connect(pair.pod, PEER_V6, 9080)) == ("peer", 9080)


def test_tproxy_listener_sees_the_real_client(pair: Pair) -> None:
    pair.serve(pair.pod, "pod", "tcp4:15001", "tcp4t:15006", "tcp6:15001", "tcp6t:15006", "tcp4:9080", "tcp4:15021")
    pair.serve(pair.peer, "peer", "tcp4:9080")
    pair.mtlsmesh("--interception-mode", "TPROXY")
    for pod_ip, peer_ip in ((POD_V4, PEER_V4), (POD_V6, PEER_V6)):
        answer = pair.connect(pair.peer, pod_ip, 9080)
        assert landed(answer) == ("pod", 15006)
        assert answer["local"] == [pod_ip, 9080]  # the transparent socket is the original destination
        assert answer["peer"][0] == peer_ip  # type: ignore[index]
    assert landed(pair.connect(pair.peer, POD_V4, 15021)) == ("pod", 15021)
    # Outbound is still REDIRECT, and the app's own traffic inside the pod is left alone.
    assert landed(pair.connect(pair.pod, PEER_V4, 9080)) == ("pod", 15001)
    assert landed(pair.connect(pair.pod, POD_V4, 9080)) == ("pod", 9080)
    # The sidecar dialing the app from 127.0.0.6 reaches it; dialing the pod's own IP goes to the inbound side.
    proxy = (1337, 1337)
    assert landed(pair.connect(pair.pod, POD_V4, 9080, source="127.0.0.6", user=proxy)) == ("pod", 9080)
    assert landed(pair.connect(pair.pod, POD_V4, 9080, user=proxy)) == ("pod", 15006)
    assert pair.mtlsmesh("--check", "--interception-mode", "TPROXY").returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Idempotency, cleanup, check, errors


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_every_golden_case_applies_and_reads_back_identically(pair: Pair, case: str) -> None:
    """apply reads the rules back and fails on any difference: this proves each golden file is exactly what the
    kernel stores and prints (the canonical iptables-save form), then that cleanup leaves nothing."""
    env = {f"MTLSMESH_{field.upper()}": value for field, value in GOLDEN_CASES[case].items()}
    env = {("MTLSMESH_INTERCEPTION_MODE" if name == "MTLSMESH_MODE" else name): value for name, value in env.items()}
    pair.mtlsmesh(env=env)
    assert pair.mtlsmesh("--check", env=env).returncode == 0
    pair.mtlsmesh("--cleanup", env=env)
    assert not any("MTLSMESH" in line for family in (4, 6) for line in normalized_save(pair.save(pair.pod, family)))


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_apply_twice_equals_apply_once(pair: Pair, backend: str) -> None:
    pair.mtlsmesh("--iptables-backend", backend)
    once = [normalized_save(pair.save(pair.pod, family, backend)) for family in (4, 6)]
    assert any("MTLSMESH_OUTPUT" in line for line in once[0]) and any("::6/128" in line for line in once[1])
    pair.mtlsmesh("--iptables-backend", backend)
    twice = [normalized_save(pair.save(pair.pod, family, backend)) for family in (4, 6)]
    assert twice == once
    assert pair.mtlsmesh("--check", "--iptables-backend", backend).returncode == 0
    # auto-detection finds the backend holding our chains, so --check and --cleanup work without the flag.
    assert f"({backend} backend)" in pair.mtlsmesh("--check").stdout
    pair.mtlsmesh("--cleanup")
    assert not any(
        "MTLSMESH" in line for family in (4, 6) for line in normalized_save(pair.save(pair.pod, family, backend))
    )


def test_tproxy_apply_twice_keeps_one_ip_rule(pair: Pair) -> None:
    for _ in range(2):
        pair.mtlsmesh("--interception-mode", "TPROXY")
    for flag in ("-4", "-6"):
        rules = pair.exec(pair.pod, ["ip", flag, "rule", "show"])
        assert rules.count("fwmark 0x539 lookup 133") == 1, rules
        routes = pair.exec(pair.pod, ["ip", flag, "route", "show", "table", "133"])
        assert routes.count("local default dev lo") == 1, routes


def test_switching_mode_replaces_the_old_rules(pair: Pair) -> None:
    pair.mtlsmesh("--interception-mode", "TPROXY")
    pair.mtlsmesh()  # back to REDIRECT: the mangle chains go, the nat inbound chain comes
    assert "MTLSMESH" not in "".join(line for line in pair.save(pair.pod).splitlines(True) if "mangle" in line)
    assert pair.mtlsmesh("--check").returncode == 0
    assert pair.mtlsmesh("--check", "--interception-mode", "TPROXY", check=False).returncode == 1


def test_cleanup_restores_the_namespace(pair: Pair) -> None:
    # Rules that are not ours, which cleanup must leave exactly as they are.
    for tool in ("iptables", "ip6tables"):
        pair.exec(pair.pod, [tool, "-t", "nat", "-N", "MCAPTEST"])
        pair.exec(pair.pod, [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7", "-j", "MCAPTEST"])
        pair.exec(pair.pod, [tool, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN"])
    before = [normalized_save(pair.save(pair.pod, family)) for family in (4, 6)]
    rules_before = [pair.exec(pair.pod, ["ip", flag, "rule", "show"]) for flag in ("-4", "-6")]

    pair.mtlsmesh("--interception-mode", "TPROXY")
    assert [normalized_save(pair.save(pair.pod, family)) for family in (4, 6)] != before
    pair.mtlsmesh("--cleanup")
    assert [normalized_save(pair.save(pair.pod, family)) for family in (4, 6)] == before
    assert [pair.exec(pair.pod, ["ip", flag, "rule", "show"]) for flag in ("-4", "-6")] == rules_before
    assert pair.exec(pair.pod, ["ip", "route", "show", "table", "133"]) == ""
    pair.mtlsmesh("--cleanup")  # nothing left to remove is not an error
    assert [normalized_save(pair.save(pair.pod, family)) for family in (4, 6)] == before


def lo_six(pair: Pair) -> str:
    """The ::6/128 line of `ip -6 addr show dev lo` with its flags, or "" when there is none."""
    lines = pair.exec(pair.pod, ["ip", "-6", "addr", "show", "dev", "lo"]).splitlines()
    return next((line.strip() for line in lines if "inet6 ::6/128" in line), "")


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_cleanup_removes_the_lo_address_it_added(pair: Pair, mode: str) -> None:
    assert lo_six(pair) == ""
    pair.mtlsmesh("--interception-mode", mode)
    assert "nodad" in lo_six(pair)  # added, with the flag that says it is ours
    pair.mtlsmesh("--interception-mode", mode)  # a re-run keeps it
    assert "nodad" in lo_six(pair)
    pair.mtlsmesh("--cleanup")
    assert lo_six(pair) == ""
    assert "::1/128" in pair.exec(pair.pod, ["ip", "-6", "addr", "show", "dev", "lo"])  # only ours went


def test_cleanup_keeps_a_lo_address_that_was_there_before(pair: Pair) -> None:
    pair.exec(pair.pod, ["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])
    before = lo_six(pair)
    assert before and "nodad" not in before
    pair.mtlsmesh()
    assert lo_six(pair) == before  # apply found it present and left it alone
    pair.mtlsmesh("--cleanup")
    assert lo_six(pair) == before


def test_check_reports_a_rule_deleted_by_hand(pair: Pair) -> None:
    assert pair.mtlsmesh("--check", check=False).returncode == 1  # nothing applied yet
    pair.mtlsmesh()
    assert "match" in pair.mtlsmesh("--check").stdout
    pair.exec(pair.pod, ["iptables", "-t", "nat", "-D", "MTLSMESH_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"])
    pair.exec(pair.pod, ["ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MTLSMESH_OUTPUT"])
    result = pair.mtlsmesh("--check", check=False)
    assert result.returncode == 1
    assert "ipv4 nat MTLSMESH_OUTPUT: missing rule: -A MTLSMESH_OUTPUT -d 127.0.0.1/32 -j RETURN" in result.stdout
    assert "ipv6 nat: jump present 2 times: -A OUTPUT -p tcp -j MTLSMESH_OUTPUT" in result.stdout
    pair.mtlsmesh()  # a re-run repairs both
    assert pair.mtlsmesh("--check").returncode == 0


def test_without_net_admin_the_error_says_so(pair: Pair) -> None:
    result = pair.mtlsmesh(check=False, user=(1337, 1337))
    assert result.returncode == 2
    assert result.stderr.startswith("mtlsmesh: error: ")
    assert "CAP_NET_ADMIN" in result.stderr
    assert "Traceback" not in result.stderr


def test_apply_fails_loudly_when_the_kernel_holds_other_rules(pair: Pair, tmp_path: Path) -> None:
    """An iptables-restore that silently drops one rule (a wrapper in front of the real one) must not pass."""
    real = run(["sh", "-c", "command -v iptables-restore"]).strip()
    wrapper = tmp_path / "iptables-restore"
    wrapper.write_text(f"#!/bin/sh\ngrep -v -- '-d 127.0.0.1/32 -j RETURN' | {real} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = pair.mtlsmesh("--iptables-backend", "system", "--no-ipv6", check=False, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("mtlsmesh: error: the rules read back differ from the rules applied: ")
    assert "ipv4 nat MTLSMESH_OUTPUT: missing rule: -A MTLSMESH_OUTPUT -d 127.0.0.1/32 -j RETURN" in result.stderr

"""Capture rules as data (capture.py, capture_plan.py): options, rule order, payloads (golden files), comparison.

Golden files live in tests/unit/golden/capture/. After an intended change to the rules, regenerate them with

    MTLSMESH_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_capture.py

(the one switch for every golden test, see tests/golden.py) and read the diff before committing it: every changed
line is a changed rule in every pod.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsmesh import capture
from mtlsmesh import capture_plan as plan
from mtlsmesh.capture import CaptureOptions, Family, InterceptionMode
from mtlsmesh.capture_plan import Backend
from mtlsmesh.cli import main
from mtlsmesh.errors import ConfigError
from tests import golden

GOLDEN = Path(__file__).parent / "golden" / "capture"
ROOT = Path(__file__).resolve().parents[2]


def assert_golden(name: str, text: str) -> None:
    golden.assert_golden(GOLDEN / f"{name}.golden", text)


GOLDEN_CASES = {
    "defaults": {},
    "inbound-ports": {"inbound_ports": "9080, 9443"},
    "exclude-ports": {"exclude_inbound_ports": "9443,8080", "exclude_outbound_ports": "5432,6379,5432"},
    "cidrs": {
        "include_outbound_cidrs": "198.18.0.0/15,fd00:198:18::/48",
        "exclude_outbound_cidrs": "198.18.0.8/29,fd00:198:18:1::/64,198.18.0.3",
    },
    "ipv6-cidrs-only": {"include_outbound_cidrs": "fd00:198:18::/48"},
    "no-ipv6": {"ipv6": "false"},
    "owner-and-ports": {"proxy_uid": "2000", "proxy_gid": "2001", "outbound_port": "16001", "inbound_port": "16006"},
    "tproxy": {"mode": "TPROXY"},
    "tproxy-inbound-ports": {"mode": "tproxy", "inbound_ports": "9080", "exclude_inbound_ports": "9443"},
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_apply_script_matches_golden(name: str) -> None:
    options = capture.parse_capture_options(GOLDEN_CASES[name])
    assert_golden(name, plan.render_dry_run(options, Backend.SYSTEM))


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_cleanup_script_matches_golden(mode: str) -> None:
    options = capture.parse_capture_options({"mode": mode})
    assert_golden(f"cleanup-{mode.lower()}", plan.render_dry_run(options, Backend.NFT, cleanup=True))


def test_check_render_matches_golden() -> None:
    rulesets = capture.build_rulesets(CaptureOptions())
    assert_golden("check-defaults", "".join(capture.render_expected(rs) for rs in rulesets))


def test_rerun_payload_heals_duplicates_and_stale_chains() -> None:
    """Against a namespace holding a TPROXY install plus a duplicated and an outdated jump, a REDIRECT apply
    keeps one jump each, removes the stale mangle chains and rewrites our nat chains whole."""
    tproxy = capture.build_ruleset(CaptureOptions(mode=InterceptionMode.TPROXY), Family.V4)
    state_text = capture.render_expected(tproxy).replace(
        "-A OUTPUT -p tcp -j MTLSMESH_OUTPUT",
        "-A OUTPUT -p tcp -j MTLSMESH_OUTPUT\n-A OUTPUT -p tcp -j MTLSMESH_OUTPUT\n-A OUTPUT -j MTLSMESH_OUTPUT\n"
        "-A OUTPUT -d 198.18.0.3/32 -j ACCEPT",
    )
    state = plan.parse_save(state_text)
    ruleset = capture.build_ruleset(CaptureOptions(), Family.V4)
    assert_golden("rerun-heals", plan.render_apply(ruleset, state))


# ---------------------------------------------------------------------------------------------------------------
# Rule order and family handling


def rendered(options: CaptureOptions, family: Family = Family.V4, chain: str = capture.OUTPUT) -> list[str]:
    ruleset = capture.build_ruleset(options, family)
    return [rule.render() for rule in ruleset.rules if rule.chain == chain and rule.table == "nat"]


def test_output_chain_follows_the_design_order() -> None:
    # The order and the reason for each rule: docs/ARCHITECTURE.md §3.
    options = capture.parse_capture_options(
        {
            "exclude_outbound_ports": "5432",
            "exclude_outbound_cidrs": "10.0.0.0/8",
            "include_outbound_cidrs": "10.0.0.0/7",
        }
    )
    assert rendered(options) == [
        "-A MTLSMESH_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MTLSMESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A MTLSMESH_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MTLSMESH_IN_REDIRECT",
        "-A MTLSMESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A MTLSMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MTLSMESH_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j MTLSMESH_IN_REDIRECT",
        "-A MTLSMESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A MTLSMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A MTLSMESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A MTLSMESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
        "-A MTLSMESH_OUTPUT -d 10.0.0.0/7 -j MTLSMESH_REDIRECT",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, ["15021", "15090", "-p tcp -j MTLSMESH_IN_REDIRECT"]),
        ({"exclude_inbound_ports": "22,15021"}, ["15021", "15090", "22", "-p tcp -j MTLSMESH_IN_REDIRECT"]),
        ({"inbound_ports": "80,443"}, ["15021", "15090", "80 -j MTLSMESH_IN_REDIRECT", "443 -j MTLSMESH_IN_REDIRECT"]),
        ({"inbound_ports": ""}, ["15021", "15090"]),
    ],
)
def test_inbound_chain(raw: dict[str, str], expected: list[str]) -> None:
    lines = rendered(capture.parse_capture_options(raw), chain=capture.INBOUND)
    assert len(lines) == len(expected)
    for line, fragment in zip(lines, expected, strict=True):
        assert fragment in line, (line, fragment)


@pytest.mark.parametrize("family", [Family.V4, Family.V6])
def test_each_family_gets_only_its_own_cidrs_and_loopbacks(family: Family) -> None:
    options = capture.parse_capture_options(
        {"include_outbound_cidrs": "198.18.0.0/15,fd00::/8", "exclude_outbound_cidrs": "198.18.0.0/30,fd00:1::/32"}
    )
    text = "\n".join(rendered(options, family))
    own, other = ("198.18.", "fd00") if family is Family.V4 else ("fd00", "198.18.")
    assert own in text and other not in text
    assert ("127.0.0." in text) == (family is Family.V4)
    assert ("::6/128" in text and "::1/128" in text) == (family is Family.V6)


def test_builtin_chains_hold_only_jumps() -> None:
    for options in (CaptureOptions(), CaptureOptions(mode=InterceptionMode.TPROXY)):
        for ruleset in capture.build_rulesets(options):
            assert all(rule.chain in capture.OWN_CHAINS[rule.table] for rule in ruleset.rules)
            assert {rule.chain for rule in ruleset.jumps} <= capture.BUILTIN_CHAINS
            assert all(rule.match == ("-p", "tcp") and len(rule.target) == 1 for rule in ruleset.jumps)


# ---------------------------------------------------------------------------------------------------------------
# Option parsing


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"outbound_port": "0"}, r"^--outbound-port: port 0 is out of range 1-65535$"),
        ({"inbound_port": "70000"}, r"^--inbound-port: port 70000 is out of range"),
        ({"inbound_port": "http"}, r"^--inbound-port: expected a port number 1-65535, got 'http'$"),
        ({"inbound_ports": "80,eighty"}, r"^--inbound-ports: expected a port number 1-65535, got 'eighty'$"),
        ({"exclude_inbound_ports": "*"}, r"^--exclude-inbound-ports: '\*' is not allowed here"),
        ({"exclude_outbound_ports": "1-100"}, r"got '1-100'"),
        ({"inbound_ports": "15021"}, r"port 15021 is the sidecar's own and is never captured"),
        ({"inbound_ports": "80,15006"}, r"^--inbound-ports: port 15006 is the sidecar's own listener; capturing it"),
        ({"inbound_ports": "15001"}, r"^--inbound-ports: port 15001 is the sidecar's own listener; capturing it loops"),
        (
            {"inbound_ports": "16000", "inbound_port": "16000", "outbound_port": "16001"},
            r"port 16000 is the sidecar's own listener",
        ),
        ({"inbound_ports": "80", "exclude_inbound_ports": "80"}, r"port 80 is both captured and excluded"),
        ({"outbound_port": "15006"}, r"^--inbound-port: inbound and outbound port are both 15006$"),
        ({"include_outbound_cidrs": "10.0.0.0/33"}, r"^--include-outbound-cidrs: '10.0.0.0/33' is not an IP address"),
        ({"exclude_outbound_cidrs": "example.com"}, r"'example.com' is not an IP address or CIDR"),
        ({"exclude_outbound_cidrs": "10.1.0.0/8"}, r"'10.1.0.0/8' has host bits set; did you mean 10.0.0.0/8\?"),
        ({"exclude_outbound_cidrs": "*"}, r"^--exclude-outbound-cidrs: '\*' is not allowed here"),
        (
            {"include_outbound_cidrs": "10.0.0.0/8", "exclude_outbound_cidrs": "10.0.0.0/8"},
            r"10.0.0.0/8 is both included and excluded",
        ),
        ({"mode": "NAT"}, r"^--interception-mode: unknown interception mode 'NAT': expected REDIRECT or TPROXY$"),
        ({"ipv6": "maybe"}, r"^--ipv6: expected true or false, got 'maybe'$"),
        ({"proxy_uid": "-1"}, r"^--proxy-uid: expected a numeric uid/gid, got '-1'$"),
        ({"proxy_gid": "0"}, r"0 \(root\) cannot be the proxy's uid/gid"),
        ({"proxy_uid": "4294967295"}, r"4294967295 is out of range"),
    ],
)
def test_bad_options_are_refused(raw: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        capture.parse_capture_options(raw)


def test_errors_name_the_environment_variable_a_value_came_from() -> None:
    with pytest.raises(ConfigError, match=r"^MTLSMESH_INBOUND_PORTS: expected a port number"):
        capture.parse_capture_options({"inbound_ports": "x"}, sources={"inbound_ports": "MTLSMESH_INBOUND_PORTS"})


@pytest.mark.parametrize(
    ("raw", "field", "value"),
    [
        ({}, "inbound_ports", None),
        ({"inbound_ports": " * "}, "inbound_ports", None),
        ({"inbound_ports": ""}, "inbound_ports", ()),
        ({"inbound_ports": "80, 443,80,"}, "inbound_ports", (80, 443)),
        ({"include_outbound_cidrs": ""}, "include_outbound_cidrs", ()),
        ({"exclude_outbound_cidrs": "10.0.0.1"}, "exclude_outbound_cidrs", (ipaddress.ip_network("10.0.0.1/32"),)),
        ({"mode": "tproxy"}, "mode", InterceptionMode.TPROXY),
        ({"ipv6": "OFF"}, "ipv6", False),
        ({"ipv6": "1"}, "ipv6", True),
        ({"proxy_uid": "2000"}, "proxy_uid", 2000),
    ],
)
def test_good_options_parse(raw: dict[str, str], field: str, value: object) -> None:
    assert getattr(capture.parse_capture_options(raw), field) == value


# ---------------------------------------------------------------------------------------------------------------
# State: parse, compare, cleanup


ALL_OPTIONS = [capture.parse_capture_options(raw) for raw in GOLDEN_CASES.values()]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=list(GOLDEN_CASES))
def test_expected_state_compares_clean_and_cleans_up_completely(options: CaptureOptions) -> None:
    for ruleset in capture.build_rulesets(options):
        state = plan.parse_save(capture.render_expected(ruleset))
        assert plan.compare(ruleset, state) == ()
        # Re-applying onto our own state adds no jump and removes nothing but rewrites the chains.
        payload = plan.render_apply(ruleset, state)
        assert not any(line.startswith(("-D", "-X", "-F")) for line in payload.splitlines())
        assert not any(rule.render() in payload for rule in ruleset.jumps)
        cleanup = plan.render_cleanup(state)
        assert cleanup.count("-X ") == len(ruleset.chains)
        assert cleanup.count("-D ") == len(ruleset.jumps)


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 30 03:44:13 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:MTLSMESH_INBOUND - [0:0]
:MTLSMESH_IN_REDIRECT - [0:0]
:MTLSMESH_OUTPUT - [0:0]
:MTLSMESH_REDIRECT - [0:0]
:KUBE-THING - [0:0]
-A PREROUTING -p tcp -j MTLSMESH_INBOUND
-A OUTPUT -p tcp -j MTLSMESH_OUTPUT
-A OUTPUT -p tcp -j MTLSMESH_OUTPUT
-A OUTPUT -j KUBE-THING
-A MTLSMESH_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A MTLSMESH_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A MTLSMESH_INBOUND -p tcp -j MTLSMESH_IN_REDIRECT
-A MTLSMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MTLSMESH_OUTPUT -j MTLSMESH_REDIRECT
-A MTLSMESH_OUTPUT -d 198.18.0.9/32 -j RETURN
-A KUBE-THING -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MTLSMESH_OUTPUT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:MTLSMESH_DIVERT - [0:0]
-A PREROUTING -p tcp -j MTLSMESH_INBOUND
COMMIT
"""


def test_compare_lists_every_difference() -> None:
    diffs = plan.compare(capture.build_ruleset(CaptureOptions(), Family.V4), plan.parse_save(SAVED))
    text = "\n".join(diffs)
    # 15021 and 15090 swapped: one of them is reported out of order, neither as missing.
    assert "ipv4 nat MTLSMESH_INBOUND: rule out of order: -A MTLSMESH_INBOUND -p tcp -m tcp --dport 150" in text
    assert "MTLSMESH_INBOUND: missing" not in text and "MTLSMESH_INBOUND: unexpected" not in text
    assert "ipv4 nat MTLSMESH_OUTPUT: unexpected rule: -A MTLSMESH_OUTPUT -d 198.18.0.9/32 -j RETURN" in text
    assert "missing rule: -A MTLSMESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN" in text
    assert "ipv4 nat: jump present 2 times: -A OUTPUT -p tcp -j MTLSMESH_OUTPUT" in text
    assert "ipv4 mangle MTLSMESH_DIVERT: chain should not exist with these options" in text
    assert "ipv4 mangle: unexpected jump: -A PREROUTING -p tcp -j MTLSMESH_INBOUND" in text
    assert "filter" not in text  # a table we never touch is not ours to judge
    assert "MTLSMESH_IN_REDIRECT: " not in text  # present and equal
    assert "ipv4 nat MTLSMESH_REDIRECT: missing rule: -A MTLSMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in text


def test_cleanup_removes_only_our_chains_and_jumps() -> None:
    assert plan.render_cleanup(plan.parse_save(SAVED)) == (
        "*nat\n"
        "-D PREROUTING -p tcp -j MTLSMESH_INBOUND\n"
        "-D OUTPUT -p tcp -j MTLSMESH_OUTPUT\n"
        "-D OUTPUT -p tcp -j MTLSMESH_OUTPUT\n"
        "-F MTLSMESH_INBOUND\n-F MTLSMESH_IN_REDIRECT\n-F MTLSMESH_OUTPUT\n-F MTLSMESH_REDIRECT\n"
        "-X MTLSMESH_INBOUND\n-X MTLSMESH_IN_REDIRECT\n-X MTLSMESH_OUTPUT\n-X MTLSMESH_REDIRECT\n"
        "COMMIT\n"
        "*mangle\n"
        "-D PREROUTING -p tcp -j MTLSMESH_INBOUND\n"
        "-F MTLSMESH_DIVERT\n-X MTLSMESH_DIVERT\n"
        "COMMIT\n"
    )
    assert plan.render_cleanup({}) == ""


ROUTE = capture.PolicyRoute(Family.V4, 1337, 133)


@pytest.mark.parametrize(
    ("rules_json", "routes_json", "expected"),
    [
        ("[]", "[]", plan.PolicyRouteState(0, False)),
        ("", "", plan.PolicyRouteState(0, False)),
        (
            '[{"priority":0,"src":"all","table":"local"},{"priority":32765,"src":"all","fwmark":"0x539","table":"133"}]',
            '[{"type":"local","dst":"default","dev":"lo","table":"133","scope":"host","flags":[]}]',
            plan.PolicyRouteState(1, True),
        ),
        (
            '[{"fwmark":"0x539","table":"133"},{"fwmark":"0x539","table":"133"},{"fwmark":"0x53a","table":"133"}]',
            '[{"type":"local","dst":"default","dev":"lo","table":"134"}]',
            plan.PolicyRouteState(2, False),
        ),
    ],
)
def test_policy_route_state(rules_json: str, routes_json: str, expected: plan.PolicyRouteState) -> None:
    found = plan.parse_policy_route(ROUTE, rules_json, routes_json)
    assert found == expected
    diffs = plan.compare_policy_route(ROUTE, found)
    assert (diffs == ()) == (expected == plan.PolicyRouteState(1, True))


def test_apply_plan_adds_the_ip_rule_only_when_absent() -> None:
    ruleset = capture.build_ruleset(CaptureOptions(mode=InterceptionMode.TPROXY), Family.V4)
    fresh = [step.argv for step in plan.plan_apply(ruleset, Backend.NFT, {}, plan.PolicyRouteState(0, False))]
    again = [step.argv for step in plan.plan_apply(ruleset, Backend.NFT, {}, plan.PolicyRouteState(2, True))]
    assert ROUTE.rule_add() in fresh and ROUTE.rule_delete() not in fresh
    assert ROUTE.rule_add() not in again and again.count(ROUTE.rule_delete()) == 1
    assert ROUTE.route_replace() in fresh and ROUTE.route_replace() in again


LO_SIX = capture.LoSource(capture.APP_SOURCE_NET_V6)


def _lo_json(*addresses: dict[str, object]) -> str:
    return json.dumps(
        [{"ifname": "lo", "addr_info": [{"family": "inet6", "local": "::1", "prefixlen": 128}, *addresses]}]
    )


@pytest.mark.parametrize(
    ("addr_json", "expected"),
    [
        ("", plan.LO_SOURCE_ABSENT),
        (_lo_json(), plan.LO_SOURCE_ABSENT),
        (
            _lo_json({"family": "inet6", "local": "::6", "prefixlen": 128, "nodad": True}),
            plan.LoSourceState(True, True),
        ),
        (_lo_json({"family": "inet6", "local": "::6", "prefixlen": 128}), plan.LoSourceState(True, False)),
        (_lo_json({"family": "inet6", "local": "::6", "prefixlen": 64, "nodad": True}), plan.LO_SOURCE_ABSENT),
    ],
)
def test_lo_source_state(addr_json: str, expected: plan.LoSourceState) -> None:
    assert plan.parse_lo_source(LO_SIX, addr_json) == expected


def test_the_lo_address_is_added_when_absent_and_removed_only_when_ours() -> None:
    ruleset = capture.build_ruleset(CaptureOptions(), Family.V6)
    assert ruleset.lo_source == LO_SIX
    assert capture.build_ruleset(CaptureOptions(), Family.V4).lo_source is None

    def applied(state: plan.LoSourceState) -> list[tuple[str, ...]]:
        return [step.argv for step in plan.plan_apply(ruleset, Backend.NFT, {}, None, state)]

    def cleaned(state: plan.LoSourceState) -> list[tuple[str, ...]]:
        route = plan.policy_route_for(CaptureOptions(), Family.V6)
        none = plan.PolicyRouteState(0, False)
        return [step.argv for step in plan.plan_cleanup(Family.V6, Backend.NFT, {}, route, none, LO_SIX, state)]

    assert LO_SIX.add() in applied(plan.LO_SOURCE_ABSENT)
    assert LO_SIX.add() not in applied(plan.LoSourceState(True, False))  # someone else's: left as it is
    assert LO_SIX.add() not in applied(plan.LoSourceState(True, True))
    assert cleaned(plan.LoSourceState(True, True)) == [LO_SIX.delete()]
    assert cleaned(plan.LoSourceState(True, False)) == []
    assert cleaned(plan.LO_SOURCE_ABSENT) == []


@pytest.mark.parametrize(
    ("backend", "family", "kind", "name"),
    [
        (Backend.SYSTEM, Family.V4, "restore", "iptables-restore"),
        (Backend.NFT, Family.V6, "save", "ip6tables-nft-save"),
        (Backend.LEGACY, Family.V4, "", "iptables-legacy"),
    ],
)
def test_tool_names(backend: Backend, family: Family, kind: str, name: str) -> None:
    assert plan.tool_name(backend, family, kind) == name


# ---------------------------------------------------------------------------------------------------------------
# The command line (no root needed)


def test_cli_dry_run_prints_the_golden_script(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("MTLSMESH_"):
            monkeypatch.delenv(name)
    assert main(["iptables", "--dry-run"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "defaults.golden").read_text()


def test_cli_flags_override_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLSMESH_INTERCEPTION_MODE", "TPROXY")
    monkeypatch.setenv("MTLSMESH_EXCLUDE_OUTBOUND_PORTS", "5432")
    monkeypatch.setenv("MTLSMESH_IPV6", "false")
    monkeypatch.setenv("MTLSMESH_IPTABLES_BACKEND", "legacy")
    assert main(["iptables", "--dry-run", "--interception-mode", "REDIRECT", "apply"]) == 0
    out = capsys.readouterr().out
    assert "--dport 5432 -j RETURN" in out
    assert "TPROXY" not in out and "ip6tables" not in out
    assert "iptables-legacy-restore --noflush" in out


@pytest.mark.parametrize(
    ("argv", "env", "match"),
    [
        (["--inbound-ports", "x"], {}, "mtlsmesh: error: --inbound-ports: expected a port number"),
        ([], {"MTLSMESH_EXCLUDE_OUTBOUND_CIDRS": "nope"}, "mtlsmesh: error: MTLSMESH_EXCLUDE_OUTBOUND_CIDRS: 'nope'"),
        ([], {"MTLSMESH_IPTABLES_BACKEND": "ebtables"}, "unknown iptables backend 'ebtables'"),
        ([], {"MTLSMESH_IPV6": "sometimes"}, "mtlsmesh: error: MTLSMESH_IPV6: expected true or false"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    argv: list[str],
    env: dict[str, str],
    match: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["iptables", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_cli_without_iptables_says_what_to_install(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "iptables"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stderr == "mtlsmesh: error: iptables-restore not found on PATH: install the iptables package\n"

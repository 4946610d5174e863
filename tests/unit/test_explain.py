"""`mtlsmesh explain`'s decision walk: the capture rules as `capture` writes them, walked; the sidecar's own
decision functions asked; and the text and JSON it prints."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsmesh import capture, capture_plan, explain, policy
from mtlsmesh.cli import main
from mtlsmesh.config import Mode, parse_config
from mtlsmesh.errors import ConfigError
from mtlsmesh.identity import parse_workload_id

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
BAD = "spiffe://cluster.local/ns/default/sa/bad"
GOOD = "spiffe://cluster.local/ns/default/sa/productpage"
CONFIG: dict[str, Any] = {
    "outbound": {
        "destinations": [{"cidrs": ["198.18.0.0/24"], "ports": [9080], "identities": [REVIEWS]}],
        "policy": "ALLOW_ANY",
    },
    "inbound": {"ports": {9090: {"mode": "permissive"}, 3306: {"server_first": True}, 7000: {"mode": "disable"}}},
    "authorization": [
        {"action": "DENY", "principals": [BAD], "ports": [9080]},
        {"action": "ALLOW", "principals": ["spiffe://cluster.local/ns/default/*"], "ports": [9080]},
    ],
}
CFG = parse_config(CONFIG)


def tables(**options: Any) -> dict[str, capture_plan.SavedTable]:
    ruleset = capture.build_ruleset(capture.CaptureOptions(**options), capture.Family.V4)
    return capture_plan.parse_save(capture.render_expected(ruleset))


P = explain.Packet
OUT = "-A MTLSMESH_OUTPUT"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- the walk --------------------------------------------------------------------------------------------------


def test_an_apps_connection_is_redirected_to_the_outbound_listener() -> None:
    walk = explain.capture_walk(tables(), explain.Packet(ip("198.18.0.12"), 9080, out_iface="eth0"), inbound=False)
    assert (walk.outcome, walk.port) == (explain.CAPTURED, 15001)
    assert [step.rule for step in walk.matched()] == [
        "-A OUTPUT -p tcp -j MTLSMESH_OUTPUT",
        "-A MTLSMESH_OUTPUT -j MTLSMESH_REDIRECT",
        "-A MTLSMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ]


@pytest.mark.parametrize(
    ("packet", "deciding"),
    [
        (P(ip("198.18.0.12"), 5432, out_iface="eth0"), f"{OUT} -p tcp -m tcp --dport 5432 -j RETURN"),
        (P(ip("127.0.0.1"), 80, out_iface="lo"), f"{OUT} -o lo -m owner ! --uid-owner 1337 -j RETURN"),
        (P(ip("198.18.0.12"), 80, out_iface="eth0", uid=1337), f"{OUT} -m owner --uid-owner 1337 -j RETURN"),
        (P(ip("10.0.0.9"), 80, out_iface="eth0"), f"{OUT} -d 10.0.0.0/8 -j RETURN"),
    ],
)  # fmt: skip
def test_what_is_let_by_names_the_rule_that_returns_it(packet: explain.Packet, deciding: str) -> None:
    walk = explain.capture_walk(
        tables(exclude_outbound_ports=(5432,), exclude_outbound_cidrs=(ipaddress.ip_network("10.0.0.0/8"),)),
        packet,
        inbound=False,
    )
    assert walk.outcome == explain.LET_BY
    assert walk.deciding == f"{deciding} sends it back"


def test_the_sidecars_own_dial_to_its_pod_ip_goes_to_the_inbound_listener() -> None:
    packet = explain.Packet(ip("198.18.0.11"), 9080, out_iface="lo", uid=1337, gid=1337)
    walk = explain.capture_walk(tables(), packet, inbound=False)
    assert (walk.outcome, walk.port) == (explain.CAPTURED, 15006)


def test_in_tproxy_mode_an_app_is_captured_and_the_sidecars_marked_dial_to_its_app_is_not() -> None:
    rules = tables(mode=capture.InterceptionMode.TPROXY)
    app = explain.capture_walk(rules, explain.Packet(ip("198.18.0.12"), 9080, out_iface="eth0"), inbound=False)
    assert (app.outcome, app.port) == (explain.CAPTURED, 15001)  # an app's packet has no mark: the rule passes it
    dial = explain.Packet(ip("198.18.0.11"), 9080, out_iface="lo", uid=1337, gid=1337, mark=1337)
    walk = explain.capture_walk(rules, dial, inbound=False)
    assert walk.outcome == explain.LET_BY
    assert walk.deciding == f"{OUT} -m mark --mark 0x539 -j RETURN sends it back"
    unmarked = explain.Packet(ip("198.18.0.11"), 9080, out_iface="lo", uid=1337, gid=1337)
    assert explain.capture_walk(rules, unmarked, inbound=False).port == 15006  # the pod calling itself, as before


def test_rules_deleted_by_hand_leave_everything_uncaptured_and_say_so() -> None:
    empty = capture_plan.parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    walk = explain.capture_walk(empty, explain.Packet(ip("198.18.0.12"), 9080, out_iface="eth0"), inbound=False)
    assert walk.outcome == explain.LET_BY
    assert "no jump into the capture chains (are the rules missing?)" in walk.deciding
    answer = explain.explain_outbound(CFG, empty, ip("198.18.0.12"), 9080)
    assert answer.decision == "not_captured" and not answer.captured
    assert answer.verdict.startswith("198.18.0.12:9080 is not captured, so it leaves as the app sent it")
    assert answer.verdict.endswith("no jump into the capture chains (are the rules missing?).")


@pytest.mark.parametrize("mode", [capture.InterceptionMode.REDIRECT, capture.InterceptionMode.TPROXY])
def test_inbound_capture_and_excluded_ports_in_both_modes(mode: capture.InterceptionMode) -> None:
    rules = tables(mode=mode, exclude_inbound_ports=(8081,))
    caught = explain.capture_walk(rules, explain.Packet(ip("198.18.0.11"), 9080, in_iface="eth0"), inbound=True)
    assert (caught.outcome, caught.port) == (explain.CAPTURED, 15006)
    for port, rule in ((8081, "--dport 8081 -j RETURN"), (15021, "--dport 15021 -j RETURN")):
        walk = explain.capture_walk(rules, explain.Packet(ip("198.18.0.11"), port, in_iface="eth0"), inbound=True)
        assert walk.outcome == explain.LET_BY
        assert rule in walk.deciding


def test_a_rule_it_does_not_understand_stops_the_walk_instead_of_guessing() -> None:
    rule = "-A OUTPUT -p tcp -m set --match-set blocked dst -j REDIRECT --to-ports 15001"
    text = f"*nat\n:OUTPUT ACCEPT [0:0]\n{rule}\nCOMMIT\n"
    walk = explain.capture_walk(capture_plan.parse_save(text), explain.Packet(ip("198.18.0.9"), 1), inbound=False)
    assert walk.outcome == explain.UNKNOWN
    assert "explain does not evaluate match module set" in walk.deciding
    assert explain.explain_outbound(CFG, capture_plan.parse_save(text), ip("198.18.0.9"), 1).decision == "unknown"


# --- the decisions: the sidecar's own functions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "port", "decision", "identities"),
    [("198.18.0.12", 9080, "mtls", [REVIEWS]), ("203.0.113.7", 443, "passthrough", [])],
)
def test_outbound_decisions_are_route_outbounds(dst: str, port: int, decision: str, identities: list[str]) -> None:
    answer = explain.explain_outbound(CFG, tables(), ip(dst), port)
    route = policy.route_outbound(CFG.outbound, ip(dst), port)
    assert (answer.decision, answer.reason) == (route.kind.value, route.reason) == (decision, route.reason)
    assert list(answer.identities) == identities
    registry_only = parse_config({**CONFIG, "outbound": {**CONFIG["outbound"], "policy": "REGISTRY_ONLY"}})
    if decision == "passthrough":
        assert explain.explain_outbound(registry_only, tables(), ip(dst), port).decision == "refuse"


@pytest.mark.parametrize(
    ("caller", "port", "decision", "rule", "verdict_has"),
    [
        (GOOD, 9080, "mtls", 1, "in mutual TLS"),
        (BAD, 9080, "refuse", 0, "denied (reset): rule 0 DENY matches"),
        (None, 9080, "refuse", None, "refused (reset): STRICT: not mesh mTLS"),
        (None, 9090, "passthrough", None, "passed through in plaintext"),  # permissive, no ALLOW rule covers it
        (GOOD, 3306, "mtls", None, "server-first port in STRICT"),
        (None, 3306, "refuse", None, "reset after timeouts.handshake (10 s): the port is server-first"),
        (GOOD, 7000, "passthrough", None, "mode DISABLE"),
    ],
)
def test_inbound_decisions_are_route_inbound_then_authorize(
    caller: str | None, port: int, decision: str, rule: int | None, verdict_has: str
) -> None:
    spiffe_id = parse_workload_id(caller) if caller else None
    answer = explain.explain_inbound(CFG, tables(), port, spiffe_id)
    assert answer.decision == decision, answer.verdict
    assert verdict_has in answer.verdict
    if answer.authorization is not None:
        assert answer.authorization["rule"] == rule
        carried = policy.route_inbound(
            CFG.inbound.port_mode(port), CFG.inbound.is_server_first(port), caller is not None
        )
        authenticated = spiffe_id if carried.kind is policy.InboundKind.MTLS else None
        assert answer.authorization["reason"] == policy.authorize(CFG.authorization, authenticated, port).reason


def test_a_plaintext_caller_of_a_sniffed_permissive_port_is_told_about_server_first_clients() -> None:
    answer = explain.explain_inbound(CFG, tables(), 9090, None)
    assert answer.decision == "passthrough"
    assert any(
        "waits the whole inbound.sniff_timeout (1 s)" in note and "server_first" in note for note in answer.notes
    )
    assert not any(
        "sniff_timeout" in note for note in explain.explain_inbound(CFG, tables(), 9090, parse_workload_id(GOOD)).notes
    )


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("server_first", [False, True])
@pytest.mark.parametrize("hello", [None, False, True])
def test_route_inbound_is_the_handlers_table(mode: Mode, server_first: bool, hello: bool | None) -> None:
    route = policy.route_inbound(mode, server_first, hello if policy.sniffs(mode, server_first) else None)
    if mode is Mode.DISABLE:
        expected = policy.InboundKind.PASSTHROUGH
    elif server_first:
        expected = policy.InboundKind.MTLS  # mesh-only in PERMISSIVE too: a server-first client sends nothing
    elif hello:
        expected = policy.InboundKind.MTLS
    else:
        expected = policy.InboundKind.REFUSE if mode is Mode.STRICT else policy.InboundKind.PASSTHROUGH
    assert route.kind is expected
    assert policy.sniffs(mode, server_first) == (mode is not Mode.DISABLE and not server_first)


# --- the command ------------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "credentials": {"cert": "c", "key": "k", "bundle": "b"}}))
    rules = tmp_path / "rules.txt"
    rules.write_text(capture.render_expected(capture.build_ruleset(capture.CaptureOptions(), capture.Family.V4)))
    return str(config), str(rules)


def test_the_command_prints_the_walk_and_one_verdict(
    files: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, rules = files
    assert main(["explain", "--to", "198.18.0.12:9080", "--config", config, "--rules", rules]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "outbound 198.18.0.12:9080"
    assert "  capture:        captured to port 15001" in out
    assert "    nat MTLSMESH_REDIRECT: -A MTLSMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in out
    assert f"  identities:     {REVIEWS}" in out
    verdict = "198.18.0.12:9080 is captured and sent in mutual TLS (destination 0 matches 198.18.0.12 port 9080)"
    assert out[-1] == f"verdict: {verdict}, expecting {REVIEWS}."


def test_the_command_json_is_a_list_of_one(files: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    config, rules = files
    assert main(["explain", "--from", BAD, "--port", "9080", "--config", config, "--rules", rules, "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)
    assert found["direction"] == "inbound" and found["decision"] == "refuse"
    assert found["authorization"]["rule"] == 0 and found["authorization"]["action"] == "DENY"
    assert found["capture"]["port"] == 15006


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--to", "reviews:9080"], "mtlsmesh: error: --to: 'reviews' is not an IP address"),
        (["--to", "198.18.0.1"], "mtlsmesh: error: --to: expected IP:PORT"),
        (["--from", GOOD], "mtlsmesh: error: --port: --from needs --port"),
        (["--from", "spiffe://x", "--port", "1"], "mtlsmesh: error: --from: "),
        (["--to", "198.18.0.1:1", "--rules", "/nonexistent"], "mtlsmesh: error: --rules: /nonexistent: No such file"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    files: tuple[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    assert main(["explain", *argv, "--config", files[0]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


# --- loops, explicit listeners, IPv6 -----------------------------------------------------------------------------


def test_a_connection_to_a_capture_listener_itself_is_the_loop_the_handlers_refuse() -> None:
    rules = tables()
    # Arriving at the pod's port 15006: captured to the inbound listener, whose original destination is itself.
    answer = explain.explain_inbound(CFG, rules, 15006, None)
    assert (answer.captured, answer.decision, answer.reason) == (True, "refuse", explain.LOOP_REASON)
    assert policy.loops_to_listener(15006, ip("198.18.0.11"), 15006, local=True)
    # The app dialing its own pod's 15001 or 127.0.0.1:15006 is let by (lo), and reaches the listener itself.
    for dst, which in (("198.18.0.11", "outbound"), ("127.0.0.1", "inbound")):
        port = 15001 if which == "outbound" else 15006
        answer = explain.explain_outbound(CFG, rules, ip(dst), port, local=True)
        assert (answer.captured, answer.decision) == (False, "refuse")
        assert answer.verdict == (
            f"{dst}:{port} is not captured but is the {which} listener itself: refused (reset), {explain.LOOP_REASON}."
        )
    # Another pod's 15001 is no loop: captured, and routed as any destination.
    assert explain.explain_outbound(CFG, rules, ip("198.18.0.12"), 15001).decision == "passthrough"
    assert not policy.loops_to_listener(15001, ip("198.18.0.12"), 15001, local=False)
    assert policy.loops_to_listener(15001, ip("::ffff:127.0.0.1"), 15001, local=False)
    assert policy.loops_to_listener(15001, ip("0.0.0.0"), 15001, local=False)


EXPLICIT = parse_config(
    {
        **CONFIG,
        "explicit": [
            {"name": "web-in", "listen": "0.0.0.0:8443", "forward_to": "127.0.0.1:9080", "mode": "terminate",
             "identities": [GOOD, BAD]},
            {"name": "legacy-in", "listen": "0.0.0.0:8444", "forward_to": "127.0.0.1:9081", "mode": "terminate",
             "min_tls_version": "1.2"},
            {"name": "db-out", "listen": "127.0.0.1:15432", "forward_to": "198.18.0.20:5432", "mode": "originate",
             "identities": [REVIEWS]},
        ],
    }
)  # fmt: skip


def test_find_listener_by_name_or_port() -> None:
    assert explain.find_listener(EXPLICIT, "web-in").name == "web-in"
    assert explain.find_listener(EXPLICIT, "15432").name == "db-out"
    with pytest.raises(ConfigError, match=r"no explicit listener named or listening on 'nope' \(web-in \(0.0.0.0:8443"):
        explain.find_listener(EXPLICIT, "nope")
    with pytest.raises(ConfigError, match=r"\(none in this config\)"):
        explain.find_listener(CFG, "8443")


def test_a_terminate_listener_is_strict_mtls_then_its_identities_then_authorization() -> None:
    web_in = explain.find_listener(EXPLICIT, "web-in")
    answer = explain.explain_listener(EXPLICIT, web_in, parse_workload_id(GOOD))
    assert (answer.direction, answer.decision, answer.mode, answer.sniffed) == ("inbound", "mtls", "strict", False)
    assert answer.capture is None and answer.identities == (GOOD, BAD) and answer.listener == "web-in"
    assert answer.authorization is not None and answer.authorization["rule"] == 1  # forward_to's port 9080
    assert answer.verdict == (
        f"listener web-in (0.0.0.0:8443 -> 127.0.0.1:9080) from {GOOD} is carried in mutual TLS to 127.0.0.1:9080 "
        f"({GOOD} is one of this listener's identities), and allowed: rule 1 ALLOW matches {GOOD} on port 9080."
    )
    # BAD is one of the listener's identities, but rule 0 denies it on port 9080.
    denied = explain.explain_listener(EXPLICIT, web_in, parse_workload_id(BAD))
    assert (denied.decision, denied.reason) == ("refuse", f"rule 0 DENY matches {BAD} on port 9080")
    # REVIEWS is not one of them: the handler's own check, policy.listener_admits, says so in the same words.
    stranger = explain.explain_listener(EXPLICIT, web_in, parse_workload_id(REVIEWS))
    admitted = policy.listener_admits(web_in.identities, parse_workload_id(REVIEWS))
    assert not admitted.allowed and (stranger.decision, stranger.reason) == ("refuse", admitted.reason)
    assert stranger.reason == f"{REVIEWS} is not one of this listener's identities ({GOOD}, {BAD})"
    assert stranger.authorization is None
    assert explain.explain_listener(EXPLICIT, web_in, None).decision == "refuse"  # no SVID: no handshake
    other = explain.explain_listener(EXPLICIT, web_in, parse_workload_id("spiffe://other.example/ns/a/sa/b"))
    assert (other.decision, other.reason) == (
        "refuse",
        "spiffe://other.example/ns/a/sa/b is not in trust domain cluster.local",
    )
    legacy = explain.explain_listener(EXPLICIT, explain.find_listener(EXPLICIT, "legacy-in"), parse_workload_id(GOOD))
    assert legacy.notes == [
        "explicit terminate listener: no capture rule is involved (TLS 1.2 or later, record layer openssl)"
    ]
    assert policy.listener_admits((), parse_workload_id(REVIEWS)).allowed


def test_an_originate_listener_sends_mtls_expecting_its_identities() -> None:
    answer = explain.explain_listener(EXPLICIT, explain.find_listener(EXPLICIT, "db-out"), None)
    assert (answer.direction, answer.decision, answer.identities) == ("outbound", "mtls", (REVIEWS,))
    assert answer.verdict == (
        "listener db-out (127.0.0.1:15432 -> 198.18.0.20:5432): the app's plaintext is sent in mutual TLS to "
        f"198.18.0.20:5432, expecting {REVIEWS}."
    )


def test_a_connection_the_rules_let_by_to_an_explicit_listener_is_explained_by_it() -> None:
    # The app dialing the originate listener on 127.0.0.1: let by (lo), carried by db-out.
    answer = explain.explain_outbound(EXPLICIT, tables(), ip("127.0.0.1"), 15432, local=True)
    assert (answer.decision, answer.listener, answer.identities) == ("mtls", "db-out", (REVIEWS,))
    assert answer.capture is not None and answer.capture.outcome == explain.LET_BY
    assert answer.notes[0].startswith("not captured (-A MTLSMESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN")
    # A peer calling 8443, excluded from capture: the terminate listener answers; not excluded, the capture does.
    excluded = explain.explain_inbound(EXPLICIT, tables(exclude_inbound_ports=(8443,)), 8443, parse_workload_id(GOOD))
    assert (excluded.decision, excluded.listener) == ("mtls", "web-in")
    captured = explain.explain_inbound(EXPLICIT, tables(), 8443, parse_workload_id(GOOD))
    assert captured.listener is None and captured.capture is not None and captured.capture.port == 15006


def test_an_inbound_call_on_ipv6_walks_the_ipv6_rules() -> None:
    v6 = capture_plan.parse_save(
        capture.render_expected(
            capture.build_ruleset(capture.CaptureOptions(exclude_inbound_ports=(8081,)), capture.Family.V6)
        )
    )
    dst = ip("2001:db8::fffe")
    answer = explain.explain_inbound(CFG, v6, 9080, parse_workload_id(GOOD), dst=dst)
    assert answer.captured and answer.capture is not None and answer.capture.port == 15006
    assert answer.decision == "mtls"
    assert explain.explain_inbound(CFG, v6, 8081, None, dst=dst).decision == "not_captured"


def test_the_command_explains_both_families_and_a_listener(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump({**CONFIG, "credentials": {"cert": "c", "key": "k", "bundle": "b"},
                        "explicit": [{"name": "web-in", "listen": "0.0.0.0:8443", "forward_to": "127.0.0.1:9080",
                                      "mode": "terminate", "identities": [GOOD]}]})
    )  # fmt: skip
    rules, rules6 = tmp_path / "v4.txt", tmp_path / "v6.txt"
    for path, family, excluded in ((rules, capture.Family.V4, ()), (rules6, capture.Family.V6, (9080,))):
        options = capture.CaptureOptions(exclude_inbound_ports=excluded)
        path.write_text(capture.render_expected(capture.build_ruleset(options, family)))
    argv = ["explain", "--from", GOOD, "--port", "9080", "--config", str(config), "--rules", str(rules)]
    assert main([*argv, "--rules6", str(rules6), "--json"]) == 0
    four, six = json.loads(capsys.readouterr().out)
    assert (four["family"], four["decision"], six["family"], six["decision"]) == (
        "ipv4",
        "mtls",
        "ipv6",
        "not_captured",
    )
    assert main([*argv, "--rules6", str(rules6)]) == 0
    text = capsys.readouterr().out
    assert f"inbound port 9080 from {GOOD}\n" in text and f"\n\ninbound port 9080 from {GOOD} (IPv6)\n" in text
    assert main(["explain", "--listener", "8443", "--from", GOOD, "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"inbound listener web-in (0.0.0.0:8443 -> 127.0.0.1:9080) from {GOOD}"
    assert f"  identities:     {GOOD}" in lines and "  inbound mode:   strict (not sniffed)" in lines
    assert lines[-1].startswith("verdict: listener web-in (0.0.0.0:8443 -> 127.0.0.1:9080) from")
    for bad, message in (
        (["--listener", "web-in", "--live"], "mtlsmesh: error: --live: --live does not go with --listener"),
        (["--listener", "nope"], "mtlsmesh: error: --listener: no explicit listener named or listening on 'nope'"),
        ([], "mtlsmesh: error: --to: say what to explain"),
        (["--to", "198.18.0.1:80", "--from", GOOD], "mtlsmesh: error: --from: --from explains an inbound call"),
    ):
        assert main(["explain", *bad, "--config", str(config)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(message), err

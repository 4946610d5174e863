"""The config parser: the example file, defaults, every error path, round-trips through render_config and YAML."""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsmesh.config import (
    Action,
    AuthzRule,
    Config,
    CredentialFiles,
    Destination,
    ExplicitListener,
    ExplicitMode,
    IdentityConfig,
    InboundConfig,
    KeyExchange,
    ListenAddr,
    Mode,
    OutboundConfig,
    OutboundPolicy,
    PortConfig,
    RecordLayer,
    Timeouts,
    load_config,
    parse_config,
    parse_duration,
    parse_listen_addr,
    render_config,
)
from mtlsmesh.conventions import InterceptionMode
from mtlsmesh.errors import ConfigError
from mtlsmesh.identity import TrustDomain, parse_spiffe_id

EXAMPLE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "sidecar-config.example.yaml"

EXAMPLE = Config(
    trust_domain=TrustDomain("cluster.local"),
    credentials=CredentialFiles(
        "/var/run/mtlsmesh/svid/cert.pem", "/var/run/mtlsmesh/svid/key.pem", "/var/run/mtlsmesh/svid/bundle.pem", 2.0
    ),
    outbound=OutboundConfig(
        enabled=True,
        listen=ListenAddr("::", 15001),
        policy=OutboundPolicy.ALLOW_ANY,
        destinations=(
            Destination(
                (ipaddress.ip_network("198.18.0.0/15"),),
                frozenset({9080}),
                (parse_spiffe_id("spiffe://cluster.local/ns/default/sa/reviews"),),
            ),
            Destination(
                (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00:198:18::/64")), frozenset(), ()
            ),
        ),
    ),
    inbound=InboundConfig(
        enabled=True,
        listen=ListenAddr("::", 15006),
        mode=Mode.STRICT,
        ports={9080: PortConfig(mode=Mode.PERMISSIVE), 3306: PortConfig(server_first=True)},
        app_source=ipaddress.ip_address("127.0.0.6"),
        sniff_timeout=1.0,
    ),
    authorization=(
        AuthzRule(Action.DENY, ("spiffe://cluster.local/ns/default/sa/ratings",), frozenset({9080})),
        AuthzRule(Action.ALLOW, ("spiffe://cluster.local/ns/default/*",)),
    ),
    explicit=(
        ExplicitListener(
            "db",
            ListenAddr("127.0.0.1", 5432),
            ListenAddr("198.18.0.20", 15432),
            ExplicitMode.ORIGINATE,
            (parse_spiffe_id("spiffe://cluster.local/ns/default/sa/postgres"),),
        ),
        ExplicitListener(
            "db-server",
            ListenAddr("0.0.0.0", 15432),
            ListenAddr("postgres.default.svc", 5432),
            ExplicitMode.TERMINATE,
            (parse_spiffe_id("spiffe://cluster.local/ns/default/sa/api"),),
        ),
        ExplicitListener(
            "legacy",
            ListenAddr("0.0.0.0", 15433),
            ListenAddr("127.0.0.1", 8080),
            ExplicitMode.TERMINATE,
            min_tls_version="1.2",
            record_layer=RecordLayer.OPENSSL,
        ),
    ),
    record_layer=RecordLayer.OWN,
    timeouts=Timeouts(handshake=10.0, connect=5.0, idle=None, drain=5.0),
    max_connections=10_000,
    admin_listen=ListenAddr("127.0.0.1", 15000),
    health_listen=ListenAddr("0.0.0.0", 15021),
    metrics_listen=ListenAddr("0.0.0.0", 15090),
    log_level="info",
)


def test_the_example_file_parses_to_what_its_comments_say() -> None:
    assert load_config(str(EXAMPLE_FILE)) == EXAMPLE


def test_the_example_file_shows_every_key() -> None:
    # Every key render_config writes (which is every key the parser knows) appears in the example.
    text = EXAMPLE_FILE.read_text()
    keys: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            keys.update(k for k in value if isinstance(k, str))
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(render_config(EXAMPLE))
    missing = sorted(key for key in keys if f"{key}:" not in text)
    assert missing == []


# --- scalars ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5s", 5.0), ("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0), ("0.5s", 0.5), (".5s", 0.5), (" 3s ", 3.0),
     ("0", None), (0, 0.0), (7, 7.0), (1.5, 1.5), ("0ms", 0.0),
     ("1h30m", 5400.0), ("1d", 86400.0)],
)  # fmt: skip
def test_parse_duration(value: object, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(
            ConfigError, match=r"^duration: expected a duration like 500ms, 90s, 1h30m or 24h, or a number"
        ):
            parse_duration(value)
    else:
        assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", r"expected a duration like 500ms, 90s, 1h30m or 24h, or a number of seconds \(got '5'\)"),
        ("5 s", r"expected a duration .* \(got '5 s'\)"),
        ("1x", r"expected a duration .* \(got '1x'\)"),
        ("30m1h", r"expected a duration .* \(got '30m1h'\)"),
        ("-1s", r"expected a duration .* \(got '-1s'\)"),
        (True, r"expected a duration .* \(got True\)"),
        (None, r"expected a duration .* \(got null\)"),
        ([1], r"expected a duration .* \(got a list\)"),
        (-1, r"a duration must be finite and not negative \(got -1\)"),
        (math.inf, r"a duration must be finite and not negative \(got inf\)"),
        (math.nan, r"a duration must be finite and not negative \(got nan\)"),
    ],
)
def test_parse_duration_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^timeouts\.idle: {message}$"):
        parse_duration(value, "timeouts.idle")


@pytest.mark.parametrize(
    ("text", "allow_name", "expected"),
    [
        ("0.0.0.0:15001", False, ListenAddr("0.0.0.0", 15001)),
        ("[::]:15001", False, ListenAddr("::", 15001)),
        ("[::1]:80", False, ListenAddr("::1", 80)),
        ("[0:0::1]:80", False, ListenAddr("::1", 80)),  # canonical text
        ("127.0.0.1:0", False, ListenAddr("127.0.0.1", 0)),  # ephemeral, for tests
        ("db.default.svc:5432", True, ListenAddr("db.default.svc", 5432)),
        ("DB.Example:5432", True, ListenAddr("db.example", 5432)),
        ("my_db.ns9.svc.cluster.local:5432", True, ListenAddr("my_db.ns9.svc.cluster.local", 5432)),
        ("db1:5432", True, ListenAddr("db1", 5432)),
        ("198.18.0.20:15432", True, ListenAddr("198.18.0.20", 15432)),
        ("[fd00::20]:15432", True, ListenAddr("fd00::20", 15432)),
    ],
)
def test_parse_listen_addr(text: str, allow_name: bool, expected: ListenAddr) -> None:
    parsed = parse_listen_addr(text, allow_name=allow_name)
    assert parsed == expected
    assert parse_listen_addr(str(parsed), allow_name=allow_name) == parsed


@pytest.mark.parametrize(
    ("value", "allow_name", "message"),
    [
        (15001, False, r"expected host:port as a string \(got 15001\)"),
        ("0.0.0.0", False, r"expected host:port, e\.g\. 0\.0\.0\.0:15001 or \[::\]:15001 \(got '0\.0\.0\.0'\)"),
        (":15001", False, r"expected host:port"),
        ("0.0.0.0:", False, r"expected host:port"),
        ("0.0.0.0:-1", False, r"expected host:port"),
        ("0.0.0.0:\uff11\uff15", False, r"expected host:port"),
        ("0.0.0.0:70000", False, r"port 70000 is out of range 0-65535"),
        ("db:0", True, r"port 0 is out of range 1-65535"),
        ("::1:80", False, r"an IPv6 address needs brackets \(\[::1\]:80\), an IPv4 address none"),
        ("[127.0.0.1]:80", False, r"an IPv6 address needs brackets"),
        ("localhost:80", False, r"'localhost' is not an IP address$"),
        ("[db]:80", True, r"'\[db\]' is not an IP address or host name"),
        ("bad_host!:80", True, r"'bad_host!' is not an IP address or host name"),
        ("a..b:80", True, r"'a\.\.b' is not an IP address or host name"),
        ("1.2.3.999:80", True, r"'1\.2\.3\.999' is not an IP address or host name"),
        (f"{'a' * 64}.svc:80", True, r"'a+\.svc' is not an IP address or host name"),
    ],
)
def test_parse_listen_addr_errors(value: object, allow_name: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^admin\.listen: {message}"):
        parse_listen_addr(value, "admin.listen", allow_name=allow_name)


# --- whole configs ------------------------------------------------------------------------------------------------


TD = "spiffe://cluster.local"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, Config()),
        ({"outbound": None, "inbound": None, "timeouts": None, "log": None, "authorization": None}, Config()),
        ({"credentials": None, "explicit": [], "inbound": {"ports": None}}, Config()),
        ({"trust_domain": "spiffe://example.org"}, Config(trust_domain=TrustDomain("example.org"))),
        ({"admin": None, "health": {"listen": None}, "metrics": {}}, Config(admin_listen=None, health_listen=None)),
        ({"inbound": {"app_source": "none"}}, Config(inbound=InboundConfig(app_source=None))),
        ({"inbound": {"app_source": None}}, Config(inbound=InboundConfig(app_source=None))),
        ({"inbound": {"app_source": "::6"}}, Config(inbound=InboundConfig(app_source=ipaddress.ip_address("::6")))),
        ({"inbound": {"ports": {"8080": None}}}, Config(inbound=InboundConfig(ports={8080: PortConfig()}))),
        ({"timeouts": {"idle": "5m", "drain": 0}}, Config(timeouts=Timeouts(idle=300.0, drain=0.0))),
        ({"timeouts": {"idle": "0s"}}, Config(timeouts=Timeouts(idle=None))),
        (
            {"authorization": [{"action": "ALLOW", "principals": ["SPIFFE://cluster.local/ns/a/*", "*", f"{TD}/*"]}]},
            Config(authorization=(AuthzRule(Action.ALLOW, (f"{TD}/ns/a/*", "*", f"{TD}/*")),)),
        ),
        (
            # listeners may share a port when one is disabled, or bind ephemeral ports
            {"inbound": {"enabled": False, "listen": "0.0.0.0:15021"}, "outbound": {"listen": "127.0.0.1:0"},
             "admin": {"listen": "127.0.0.1:0"}},
            Config(
                inbound=InboundConfig(enabled=False, listen=ListenAddr("0.0.0.0", 15021)),
                outbound=OutboundConfig(listen=ListenAddr("127.0.0.1", 0)),
                admin_listen=ListenAddr("127.0.0.1", 0),
            ),
        ),
        ({"log": {"level": "debug"}, "max_connections": 1}, Config(log_level="debug", max_connections=1)),
        ({"workers": 3}, Config(workers=3)),
        ({"workers": "auto"}, Config(workers=0)),
        ({"workers": 1}, Config(workers=1)),
    ],
)  # fmt: skip
def test_parse_config(data: dict[str, Any], expected: Config) -> None:
    assert parse_config(data, "config.yaml") == expected


PRINCIPAL = f"{TD}/ns/default/sa/a"

ERRORS: list[tuple[object, str]] = [
    (None, "expected a mapping (got null)"),
    ([], "expected a mapping (got a list)"),
    ({"inbund": {}}, "unknown key 'inbund' (expected one of trust_domain, credentials, outbound, inbound, "),
    ({1: {}}, "unknown key '1' (expected one of"),
    (
        {"trust_domain": "Cluster.Local"},
        "trust_domain: invalid SPIFFE ID 'Cluster.Local': the trust domain must be lowercase (ID-4)",
    ),
    ({"trust_domain": 5}, "trust_domain: expected a non-empty string (got 5)"),
    (
        {"trust_domain": "spiffe://td/path"},
        "trust_domain: invalid SPIFFE ID 'spiffe://td/path': a trust domain has no path",
    ),
    ({"credentials": {"cert": "c", "key": "k"}}, "credentials: missing required key 'bundle'"),
    ({"credentials": {"cert": 5, "key": "k", "bundle": "b"}}, "credentials.cert: expected a non-empty string (got 5)"),
    ({"credentials": {"cert": "c", "key": "", "bundle": "b"}}, "credentials.key: expected a non-empty string (got '')"),
    (
        {"credentials": {"cert": "c", "key": "k", "bundle": "b", "ca": "x"}},
        "credentials: unknown key 'ca' (expected one of cert, key, bundle, reload_interval)",
    ),
    (
        {"credentials": {"cert": "c", "key": "k", "bundle": "b", "reload_interval": -1}},
        "credentials.reload_interval: a duration must be finite and not negative (got -1)",
    ),
    (
        {"credentials": {"cert": "c", "key": "k", "bundle": "b", "reload_interval": 0}},
        "credentials.reload_interval: must be greater than zero",
    ),
    ({"credentials": "/etc/svid"}, "credentials: expected a mapping (got '/etc/svid')"),
    ({"outbound": []}, "outbound: expected a mapping (got a list)"),
    ({"outbound": {"enabled": "true"}}, "outbound.enabled: expected true or false (got 'true')"),
    (
        {"outbound": {"policy": "allow_any"}},
        "outbound.policy: expected one of ALLOW_ANY, REGISTRY_ONLY (got 'allow_any')",
    ),
    ({"outbound": {"listen": "0.0.0.0"}}, "outbound.listen: expected host:port"),
    ({"outbound": {"destinations": {"cidrs": []}}}, "outbound.destinations: expected a list (got a mapping)"),
    (
        {"outbound": {"destinations": ["198.18.0.0/15"]}},
        "outbound.destinations[0]: expected a mapping (got '198.18.0.0/15')",
    ),
    (
        {"outbound": {"destinations": [{"cidr": []}]}},
        "outbound.destinations[0]: unknown key 'cidr' (expected one of cidrs, ports, identities)",
    ),
    (
        {"outbound": {"destinations": [{"cidrs": []}]}},
        "outbound.destinations[0].cidrs: must not be empty (omit the key to match any)",
    ),
    ({"outbound": {"destinations": [{"cidrs": None}]}}, "outbound.destinations[0].cidrs: expected a list (got null)"),
    (
        {"outbound": {"destinations": [{}, {"cidrs": ["198.18.0.0/15", "198.18.0.1/15"]}]}},
        "outbound.destinations[1].cidrs[1]: invalid CIDR: 198.18.0.1/15 has host bits set",
    ),
    (
        {"outbound": {"destinations": [{"cidrs": ["nope"]}]}},
        "outbound.destinations[0].cidrs[0]: invalid CIDR: 'nope' does not appear to be an IPv4 or IPv6 network",
    ),
    (
        {"outbound": {"destinations": [{"cidrs": [10]}]}},
        "outbound.destinations[0].cidrs[0]: expected a non-empty string (got 10)",
    ),
    (
        {"outbound": {"destinations": [{"ports": [80, 65536]}]}},
        "outbound.destinations[0].ports[1]: 65536 is out of range 1-65535",
    ),
    (
        {"outbound": {"destinations": [{"ports": ["80"]}]}},
        "outbound.destinations[0].ports[0]: expected an integer (got '80')",
    ),
    (
        {"outbound": {"destinations": [{"identities": [TD]}]}},
        "outbound.destinations[0].identities[0]: invalid SPIFFE ID 'spiffe://cluster.local': "
        "a workload ID needs a path",
    ),
    (
        {"outbound": {"destinations": [{"identities": ["reviews"]}]}},
        "outbound.destinations[0].identities[0]: invalid SPIFFE ID 'reviews': the scheme must be 'spiffe://' (ID-1)",
    ),
    (
        {"inbound": {"mdoe": "strict"}},
        "inbound: unknown key 'mdoe' (expected one of enabled, listen, mode, app_source, sniff_timeout, ports,"
        " interception_mode)",
    ),
    (
        {"inbound": {"interception_mode": "tproxy"}},
        "inbound.interception_mode: expected one of REDIRECT, TPROXY (got 'tproxy')",
    ),
    ({"inbound": {"mode": "STRICT"}}, "inbound.mode: expected one of strict, permissive, disable (got 'STRICT')"),
    (
        {"inbound": {"ports": {9080: {"mode": "strictt"}}}},
        "inbound.ports.9080.mode: expected one of strict, permissive, disable (got 'strictt')",
    ),
    (
        {"inbound": {"ports": {"9080": {"mode": False}}}},
        "inbound.ports.9080.mode: expected one of strict, permissive, disable (got False)",
    ),
    (
        {"inbound": {"ports": {9080: {"server_first": "yes"}}}},
        "inbound.ports.9080.server_first: expected true or false (got 'yes')",
    ),
    (
        {"inbound": {"ports": {3306: {"mode": "permissive", "server_first": True}}}},
        "inbound.ports.3306: server_first cannot be permissive: its plaintext client sends nothing until the app"
        " speaks, so there is nothing to tell it from mTLS by; use mode strict (mesh callers) or disable (plaintext"
        " callers)",
    ),
    (
        {"inbound": {"ports": {9080: {"sniff": True}}}},
        "inbound.ports.9080: unknown key 'sniff' (expected one of mode, server_first)",
    ),
    ({"inbound": {"ports": {9080: "permissive"}}}, "inbound.ports.9080: expected a mapping (got 'permissive')"),
    ({"inbound": {"ports": {0: {}}}}, "inbound.ports.0: 0 is out of range 1-65535"),
    ({"inbound": {"ports": {"http": {}}}}, "inbound.ports.http: expected an integer (got 'http')"),
    ({"inbound": {"ports": {9080: {}, "9080": {}}}}, "inbound.ports.9080: port 9080 is listed twice"),
    ({"inbound": {"ports": [9080]}}, "inbound.ports: expected a mapping (got a list)"),
    ({"inbound": {"app_source": "localhost"}}, "inbound.app_source: expected an IP address or none (got 'localhost')"),
    ({"inbound": {"app_source": 127}}, "inbound.app_source: expected a non-empty string (got 127)"),
    ({"inbound": {"sniff_timeout": "0s"}}, "inbound.sniff_timeout: must be greater than zero"),
    (
        {"inbound": {"listen": "[::]15006"}},
        "inbound.listen: expected host:port, e.g. 0.0.0.0:15001 or [::]:15001 (got '[::]15006')",
    ),
    ({"authorization": {"action": "ALLOW"}}, "authorization: expected a list (got a mapping)"),
    (
        {"authorization": [{"action": "allow", "principals": ["*"]}]},
        "authorization[0].action: expected one of ALLOW, DENY (got 'allow')",
    ),
    (
        {"authorization": [{"action": "ALLOW"}]},
        "authorization[0]: missing required key 'principals' (a rule needs action and principals)",
    ),
    ({"authorization": [{"principals": ["*"]}]}, "authorization[0]: missing required key 'action'"),
    ({"authorization": [{"action": "DENY", "principals": []}]}, "authorization[0].principals: must not be empty"),
    (
        {"authorization": [{"action": "DENY", "principals": "*"}]},
        "authorization[0].principals: expected a list (got '*')",
    ),
    (
        {"authorization": [{"action": "DENY", "principal": ["*"]}]},
        "authorization[0]: unknown key 'principal' (expected one of action, principals, ports)",
    ),
    (
        {
            "authorization": [
                {"action": "ALLOW", "principals": ["*"]},
                {"action": "DENY", "principals": ["spiffe://cluster.local/ns/default/sa/x y"]},
            ]
        },
        "authorization[1].principals[0]: invalid SPIFFE ID 'spiffe://cluster.local/ns/default/sa/x y': "
        "path segment 'x y' may hold only a-z A-Z 0-9 . - _ (ID-10)",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": [PRINCIPAL, "spiffe://Cluster.local/x"]}]},
        "authorization[0].principals[1]: invalid SPIFFE ID 'spiffe://Cluster.local/x': "
        "the trust domain must be lowercase",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": [TD]}]},
        "authorization[0].principals[0]: invalid SPIFFE ID 'spiffe://cluster.local': a workload ID needs a path",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": [f"{TD}/ns/*/sa/x"]}]},
        "authorization[0].principals[0]: invalid SPIFFE ID 'spiffe://cluster.local/ns/*/sa/x': "
        "path segment '*' may hold only",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": [f"{TD}/ns/a*"]}]},
        "authorization[0].principals[0]: invalid SPIFFE ID 'spiffe://cluster.local/ns/a*': "
        "path segment 'a*' may hold only",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": ["/*"]}]},
        "authorization[0].principals[0]: invalid SPIFFE ID '': the scheme must be",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": [""]}]},
        "authorization[0].principals[0]: expected a non-empty string (got '')",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": ["*"], "ports": [0]}]},
        "authorization[0].ports[0]: 0 is out of range 1-65535",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": ["*"], "ports": [True]}]},
        "authorization[0].ports[0]: expected an integer (got True)",
    ),
    (
        {"authorization": [{"action": "ALLOW", "principals": ["*"], "ports": 9080}]},
        "authorization[0].ports: expected a list (got 9080)",
    ),
    (
        {"explicit": [{"name": "db", "listen": "127.0.0.1:5432", "forward_to": "db:5432"}]},
        "explicit[0]: missing required key 'mode'",
    ),
    (
        {"explicit": [{"name": "db", "listen": "127.0.0.1:5432", "forward_to": "db:5432", "mode": "both"}]},
        "explicit[0].mode: expected one of originate, terminate (got 'both')",
    ),
    (
        {"explicit": [{"name": "db s", "listen": "127.0.0.1:5432", "forward_to": "db:5432", "mode": "originate"}]},
        "explicit[0].name: 'db s' may hold only letters, digits and . _ -",
    ),
    (
        {"explicit": [{"name": "db", "listen": "127.0.0.1:5432", "forward_to": "db:0", "mode": "originate"}]},
        "explicit[0].forward_to: port 0 is out of range 1-65535",
    ),
    (
        {"explicit": [{"name": "db", "listen": "db:5432", "forward_to": "db:1", "mode": "originate"}]},
        "explicit[0].listen: 'db' is not an IP address",
    ),
    (
        {
            "explicit": [
                {"name": "db", "listen": "127.0.0.1:1", "forward_to": "db:1", "mode": "terminate", "identities": [5]}
            ]
        },
        "explicit[0].identities[0]: expected a non-empty string (got 5)",
    ),
    (
        {
            "explicit": [
                {"name": "db", "listen": "127.0.0.1:1", "forward_to": "db:1", "mode": "originate"},
                {"name": "db", "listen": "127.0.0.1:2", "forward_to": "db:1", "mode": "originate"},
            ]
        },
        "explicit[1].name: duplicate name 'db'",
    ),
    (
        {"explicit": [{"name": "db", "listen": "127.0.0.1:1", "forward_to": "db:1", "mode": "originate", "id": []}]},
        "explicit[0]: unknown key 'id' (expected one of name, listen, forward_to, mode, identities, min_tls_version, "
        "record_layer)",
    ),
    (
        {
            "explicit": [
                {
                    "name": "db",
                    "listen": "127.0.0.1:1",
                    "forward_to": "db:1",
                    "mode": "originate",
                    "min_tls_version": "1.1",
                }
            ]
        },
        'explicit[0].min_tls_version: expected "1.2" or "1.3" (got \'1.1\')',
    ),
    (
        {
            "explicit": [
                {
                    "name": "db",
                    "listen": "127.0.0.1:1",
                    "forward_to": "db:1",
                    "mode": "originate",
                    "min_tls_version": 1.0,
                }
            ]
        },
        'explicit[0].min_tls_version: expected "1.2" or "1.3" (got 1.0)',
    ),
    (
        {
            "explicit": [
                {
                    "name": "db",
                    "listen": "127.0.0.1:1",
                    "forward_to": "db:1",
                    "mode": "terminate",
                    "min_tls_version": "1.2",
                    "record_layer": "own",
                }
            ]
        },
        'explicit[0].record_layer: min_tls_version "1.2" needs record_layer openssl',
    ),
    (
        {
            "explicit": [
                {
                    "name": "db",
                    "listen": "127.0.0.1:1",
                    "forward_to": "db:1",
                    "mode": "terminate",
                    "record_layer": "boringssl",
                }
            ]
        },
        "explicit[0].record_layer: expected one of own, openssl (got 'boringssl')",
    ),
    (
        {"min_tls_version": "1.2"},
        "min_tls_version: only an explicit listener may set it (between sidecars the mesh is TLS 1.3 only)",
    ),
    ({"inbound": {"min_tls_version": "1.2"}}, "inbound.min_tls_version: only an explicit listener may set it"),
    ({"outbound": {"min_tls_version": "1.2"}}, "outbound.min_tls_version: only an explicit listener may set it"),
    ({"record_layer": "fast"}, "record_layer: expected one of own, openssl (got 'fast')"),
    ({"key_exchange": "pq"}, "key_exchange: expected one of hybrid, classic (got 'pq')"),
    ({"key_exchange": None}, "key_exchange: expected one of hybrid, classic (got null)"),
    ({"timeouts": {"handshake": 0}}, "timeouts.handshake: must be greater than zero"),
    ({"timeouts": {"connect": "0ms"}}, "timeouts.connect: must be greater than zero"),
    (
        {"timeouts": {"idle": "forever"}},
        "timeouts.idle: expected a duration like 500ms, 90s, 1h30m or 24h, or a number of seconds (got 'forever')",
    ),
    ({"timeouts": {"drain": -5}}, "timeouts.drain: a duration must be finite and not negative (got -5)"),
    ({"timeouts": {"read": 5}}, "timeouts: unknown key 'read' (expected one of handshake, connect, idle, drain)"),
    ({"max_connections": 0}, "max_connections: 0 is out of range 1-2147483648"),
    ({"max_connections": "many"}, "max_connections: expected an integer (got 'many')"),
    ({"max_connections": 1.5}, "max_connections: expected an integer (got 1.5)"),
    ({"workers": 0}, "workers: 0 is out of range 1-64"),
    ({"workers": "many"}, "workers: expected auto or an integer from 1 to 64 (got 'many')"),
    ({"workers": True}, "workers: expected auto or an integer from 1 to 64 (got True)"),
    ({"admin": "127.0.0.1:15000"}, "admin: expected a mapping (got '127.0.0.1:15000')"),
    ({"admin": {"listen": "localhost:15000"}}, "admin.listen: 'localhost' is not an IP address"),
    ({"metrics": {"port": 15090}}, "metrics: unknown key 'port' (expected one of listen)"),
    ({"health": {"listen": "0.0.0.0:15006"}}, "health.listen: 0.0.0.0:15006 overlaps inbound.listen ([::]:15006)"),
    ({"admin": {"listen": "[::]:15001"}}, "admin.listen: [::]:15001 overlaps outbound.listen ([::]:15001)"),
    (
        {"explicit": [{"name": "x", "listen": "127.0.0.1:15090", "forward_to": "db:1", "mode": "originate"}]},
        "explicit[0].listen: 127.0.0.1:15090 overlaps metrics.listen",
    ),
    ({"log": {"level": "verbose"}}, "log.level: expected one of debug, info, warning, error (got 'verbose')"),
    ({"log": {"format": "xml"}}, "log.format: expected one of text, json (got 'xml')"),
    ({"log": {"svid_warning": 1}}, "log.svid_warning: expected a number from 0 (off) up to 1, e.g. 0.2 (got 1)"),
    (
        {"log": {"svid_warning": "20%"}},
        "log.svid_warning: expected a number from 0 (off) up to 1, e.g. 0.2 (got '20%')",
    ),
    ({"log": "info"}, "log: expected a mapping (got 'info')"),
]


def test_a_listener_records_follow_its_version_then_its_own_setting_then_the_global_one() -> None:
    def listener(**options: Any) -> ExplicitListener:
        entry = {"name": "x", "listen": "127.0.0.1:1", "forward_to": "db:1", "mode": "terminate"} | options
        return parse_config({"explicit": [entry]}).explicit[0]

    assert listener().records(RecordLayer.OWN) is RecordLayer.OWN
    assert listener().records(RecordLayer.OPENSSL) is RecordLayer.OPENSSL
    assert listener(record_layer="openssl").records(RecordLayer.OWN) is RecordLayer.OPENSSL
    assert listener(record_layer="own").records(RecordLayer.OPENSSL) is RecordLayer.OWN
    tls12 = listener(min_tls_version=1.2)  # YAML's unquoted 1.2 is a number: taken as "1.2"
    assert tls12.min_tls_version == "1.2"
    assert tls12.records(RecordLayer.OWN) is RecordLayer.OPENSSL
    assert listener(min_tls_version="1.3").min_tls_version == "1.3"


@pytest.mark.parametrize(("data", "message"), ERRORS, ids=[message.split(":")[0] for _, message in ERRORS])
def test_parse_config_errors(data: object, message: str) -> None:
    # `message` is the literal start of the error text (a whole message, or a long one's beginning).
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        parse_config(data)


@pytest.mark.parametrize(
    ("data", "message", "path"),
    [
        (None, r"^/etc/mtlsmesh/config\.yaml: expected a mapping \(got null\)$", "/etc/mtlsmesh/config.yaml"),
        (
            {"inbound": {"ports": {9080: {"mode": "x"}}}},
            r"^/etc/mtlsmesh/config\.yaml: inbound\.ports\.9080\.mode: expected one of strict, permissive, disable",
            "/etc/mtlsmesh/config.yaml: inbound.ports.9080.mode",
        ),
    ],
)
def test_errors_name_the_source(data: object, message: str, path: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(data, "/etc/mtlsmesh/config.yaml")
    assert info.value.path == path


# --- files --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"inbound:\n  mode: strict\n   listen: x\n", r"^{file}:3:\d+: YAML syntax error: "),
        (b"inbound: {mode: strict\n", r"^{file}:2:1: YAML syntax error: "),
        (
            b"outbound:\n  enabled: true\ninbound: {}\ninbound: {}\n",
            r"^{file}:4:1: YAML syntax error: duplicate key 'inbound'$",
        ),
        (
            b"inbound:\n  ports:\n    9080: {}\n    9080: {mode: strict}\n",
            r"^{file}:4:5: YAML syntax error: duplicate key 9080$",
        ),
        (b"x: !!python/object:os.system 1\n", r"^{file}:1:4: YAML syntax error: could not determine a constructor"),
        (b"trust_domain: caf\xe9\n", r"^{file}: the config file is not UTF-8 text \(byte 17\)$"),
        (b"", r"^{file}: expected a mapping \(got null\)$"),
        (b"- a\n", r"^{file}: expected a mapping \(got a list\)$"),
        (
            b"inbound:\n  mode: off\n",
            r"^{file}: inbound\.mode: expected one of strict, permissive, disable \(got False\)$",
        ),
    ],
)
def test_load_config_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("{file}", str(path).replace(".", r"\."))):
        load_config(str(path))


def test_load_config_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the config file: No such file or directory$"):
        load_config(str(missing))
    with pytest.raises(ConfigError, match=r": cannot read the config file: Is a directory$"):
        load_config(str(tmp_path))


def test_load_config_reads_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "trust_domain: example.org\ninbound:\n  mode: permissive\n  ports:\n    3306: {server_first: true}\n"
    )
    assert load_config(str(path)) == Config(
        trust_domain=TrustDomain("example.org"),
        inbound=InboundConfig(mode=Mode.PERMISSIVE, ports={3306: PortConfig(server_first=True)}),
    )


def test_workers_default_to_auto() -> None:
    # No `workers:` key: auto (0), which `workers.resolve` turns into the CPUs the process may use, at most 2.
    assert parse_config({"trust_domain": "cluster.local"}).workers == 0


def test_interception_mode_defaults_to_redirect_and_reads_tproxy() -> None:
    assert parse_config({"trust_domain": "cluster.local"}).inbound.interception_mode is InterceptionMode.REDIRECT
    cfg = parse_config({"trust_domain": "cluster.local", "inbound": {"interception_mode": "TPROXY"}})
    assert cfg.inbound.interception_mode is InterceptionMode.TPROXY
    assert render_config(cfg)["inbound"]["interception_mode"] == "TPROXY"


def test_a_server_first_port_inheriting_permissive_is_warned_about_once() -> None:
    inbound = InboundConfig(
        mode=Mode.PERMISSIVE,
        ports={3306: PortConfig(server_first=True), 25: PortConfig(mode=Mode.STRICT, server_first=True)},
    )
    assert inbound.warnings() == (
        "inbound.ports.3306: server_first under inbound.mode permissive accepts mesh mTLS only (its plaintext client"
        " sends nothing to sniff); set its mode to strict to say so, or disable for plaintext callers",
    )
    assert InboundConfig(ports={3306: PortConfig(server_first=True)}).warnings() == ()  # STRICT: nothing to say


# --- render_config round-trips ------------------------------------------------------------------------------------

ROUND_TRIP = [
    Config(),
    EXAMPLE,
    Config(
        trust_domain=TrustDomain("example.org"),
        credentials=CredentialFiles("c.pem", "k.pem", "b.pem", reload_interval=0.25),
        outbound=OutboundConfig(
            enabled=False,
            listen=ListenAddr("::", 15001),
            policy=OutboundPolicy.REGISTRY_ONLY,
            destinations=(
                Destination((), frozenset({443, 80})),
                Destination((ipaddress.ip_network("::/0"),), frozenset()),
            ),
        ),
        inbound=InboundConfig(
            mode=Mode.DISABLE,
            listen=ListenAddr("::1", 0),
            app_source=None,
            sniff_timeout=0.1,
            ports={1: PortConfig(Mode.STRICT, True), 65535: PortConfig(Mode.DISABLE)},
        ),
        authorization=(AuthzRule(Action.DENY, ("*",), frozenset({1, 2, 3})),),
        timeouts=Timeouts(handshake=0.5, connect=1e-3, idle=3600.0, drain=0.0),
        max_connections=1,
        key_exchange=KeyExchange.CLASSIC,
        admin_listen=None,
        health_listen=ListenAddr("127.0.0.1", 15021),
        metrics_listen=None,
        log_level="error",
    ),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=["default", "example", "unusual"])
def test_render_config_round_trips(cfg: Config) -> None:
    rendered = render_config(cfg)
    assert parse_config(rendered) == cfg
    # and through YAML text, as the admin endpoint would serve it
    assert parse_config(yaml.safe_load(yaml.safe_dump(rendered))) == cfg


def test_key_exchange_is_hybrid_unless_classic_is_asked_for() -> None:
    assert parse_config({}).key_exchange is KeyExchange.HYBRID
    assert parse_config({"key_exchange": "hybrid"}).key_exchange is KeyExchange.HYBRID
    assert parse_config({"key_exchange": "classic"}).key_exchange is KeyExchange.CLASSIC


def test_render_config_is_plain_values() -> None:
    rendered = render_config(EXAMPLE)
    assert rendered["inbound"]["ports"] == {
        3306: {"server_first": True},
        9080: {"mode": "permissive", "server_first": False},
    }
    assert rendered["timeouts"]["idle"] == 0
    assert rendered["outbound"]["destinations"][1] == {"cidrs": ["198.18.0.0/15", "fd00:198:18::/64"]}
    assert rendered["authorization"][1] == {"action": "ALLOW", "principals": ["spiffe://cluster.local/ns/default/*"]}


# --- identity: the SVID from the CA service -------------------------------------------------------------------

IDENTITY = {"ca_address": "mtlsmesh-ca.mtlsmesh-system.svc:15012", "token": "/t/token", "bundle": "/b/bundle.pem"}


def test_the_example_identity_block_parses_to_what_its_comments_say() -> None:
    lines = EXAMPLE_FILE.read_text().splitlines()
    start = lines.index("#identity:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[1:])
    data = yaml.safe_load("\n".join(block))
    assert parse_config(data) == Config(
        identity=IdentityConfig(
            ca_address=ListenAddr("mtlsmesh-ca.mtlsmesh-system.svc", 15012),
            token="/var/run/secrets/tokens/mtlsmesh-token",
            bundle="/etc/mtlsmesh/bundle/bundle.pem",
            ca_identity=parse_spiffe_id("spiffe://cluster.local/ns/mtlsmesh-system/sa/mtlsmesh-ca"),
            ttl=86400.0,
            renew_fraction=0.5,
        )
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, IdentityConfig(ListenAddr("mtlsmesh-ca.mtlsmesh-system.svc", 15012), "/t/token", "/b/bundle.pem")),
        (
            {"ca_address": "[fd00::1]:15012", "ttl": "4s", "renew_fraction": 0.7, "ca_identity": "spiffe://td/ns/x/sa/ca"},
            IdentityConfig(ListenAddr("fd00::1", 15012), "/t/token", "/b/bundle.pem",
                           parse_spiffe_id("spiffe://td/ns/x/sa/ca"), 4.0, 0.7),
        ),
        ({"ca_identity": None, "ttl": 60}, IdentityConfig(ListenAddr("mtlsmesh-ca.mtlsmesh-system.svc", 15012),
                                                          "/t/token", "/b/bundle.pem", None, 60.0)),
    ],
)  # fmt: skip
def test_parse_identity(changes: dict[str, Any], expected: IdentityConfig) -> None:
    cfg = parse_config({"identity": {**IDENTITY, **changes}})
    assert cfg.identity == expected and cfg.credentials is None
    assert parse_config(render_config(cfg)) == cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ca_address": None}, "identity: missing required key 'ca_address' (ca_address, token and bundle are"),
        ({"token": None}, "identity: missing required key 'token'"),
        ({"bundle": None}, "identity: missing required key 'bundle'"),
        ({"ca_address": "mtlsmesh-ca"}, "identity.ca_address: expected host:port"),
        ({"ca_address": "ca:0"}, "identity.ca_address: port 0 is out of range 1-65535"),
        ({"ca_address": "ca_!:15012"}, "identity.ca_address: 'ca_!' is not an IP address or host name"),
        ({"ca_address": 15012}, "identity.ca_address: expected host:port as a string (got 15012)"),
        ({"token": ""}, "identity.token: expected a non-empty string (got '')"),
        ({"bundle": ["a"]}, "identity.bundle: expected a non-empty string (got a list)"),
        ({"ca_identity": "spiffe://cluster.local"}, "identity.ca_identity: invalid SPIFFE ID 'spiffe://cluster.local'"),
        ({"ca_identity": "https://ca"}, "identity.ca_identity: invalid SPIFFE ID 'https://ca': the scheme must be"),
        (
            {"ttl": "1 day"},
            "identity.ttl: expected a duration like 500ms, 90s, 1h30m or 24h, or a number of seconds (got '1 day')",
        ),
        ({"ttl": 0}, "identity.ttl: must be greater than zero"),
        ({"renew_fraction": 1}, "identity.renew_fraction: expected a number between 0 and 1 (got 1)"),
        ({"renew_fraction": 0}, "identity.renew_fraction: expected a number between 0 and 1 (got 0)"),
        ({"renew_fraction": "half"}, "identity.renew_fraction: expected a number between 0 and 1 (got 'half')"),
        ({"renew_fraction": True}, "identity.renew_fraction: expected a number between 0 and 1 (got True)"),
        ({"cert": "/c"}, "identity: unknown key 'cert' (expected one of ca_address, ca_identity, token, bundle, ttl, "),
    ],
)
def test_parse_identity_errors(changes: dict[str, Any], message: str) -> None:
    section = {key: value for key, value in {**IDENTITY, **changes}.items() if value is not None}
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        parse_config({"identity": section})


def test_identity_and_credentials_exclude_each_other() -> None:
    data = {"identity": IDENTITY, "credentials": {"cert": "c", "key": "k", "bundle": "b"}}
    with pytest.raises(ConfigError, match=r"^config\.yaml: identity: give either credentials \(SVID files\) or"):
        parse_config(data, "config.yaml")
    with pytest.raises(ConfigError, match=r"^identity: expected a mapping"):
        parse_config({"identity": "ca:15012"})

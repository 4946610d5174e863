"""The sidecar's configuration: one YAML file parsed once into frozen values before anything binds.

The dataclasses below are the contract between the parser and the listeners. `load_config(path)` reads a file,
`parse_config(mapping, source)` validates a mapping; every error is a `ConfigError` whose path names the place in
the file (`inbound.ports.9080.mode: expected one of strict, permissive, disable`). Flags and environment variables
override a few per-pod values through `dataclasses.replace` in the CLI.

Durations are seconds as floats (YAML may write `500ms`, `90s`, `1h30m`, `24h` or a number; see `durations`).
Addresses are `ListenAddr`.
`render_config(cfg)` turns a `Config` back into plain values (the admin config dump) that parse to the same `Config`.

What this module does not do: read the certificate files it names (the credentials loader does, and reloads them),
or decide anything about a connection (see `policy`). Checking single values is `schema`'s job.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from mtlsmesh import schema
from mtlsmesh.addresses import WILDCARD_HOSTS, IPAddress, IPNetwork, host_port, split_host_port
from mtlsmesh.conventions import (
    ADMIN_PORT,
    APP_SOURCE,
    HEALTH_PORT,
    INBOUND_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    METRICS_PORT,
    OUTBOUND_PORT,
    InterceptionMode,
)
from mtlsmesh.errors import ConfigError, IdentityError
from mtlsmesh.identity import (
    DEFAULT_TRUST_DOMAIN,
    SpiffeId,
    TrustDomain,
    parse_spiffe_id,
    parse_trust_domain,
    parse_workload_id,
)


class Mode(enum.Enum):
    """Inbound mTLS mode, per mesh and per port."""

    STRICT = "strict"  # only mesh mTLS (ClientHello with ALPN mtlsmesh) is accepted
    PERMISSIVE = "permissive"  # mesh mTLS is terminated; anything else passes through untouched
    DISABLE = "disable"  # everything passes through untouched, no sniffing


class OutboundPolicy(enum.Enum):
    """What the outbound sidecar does with a destination outside the mesh."""

    ALLOW_ANY = "ALLOW_ANY"  # pass it through as plain TCP
    REGISTRY_ONLY = "REGISTRY_ONLY"  # refuse it (reset the app's connection)


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class ExplicitMode(enum.Enum):
    ORIGINATE = "originate"  # plaintext in, mTLS out (ghostunnel client)
    TERMINATE = "terminate"  # mTLS in, plaintext out (ghostunnel server)


class RecordLayer(enum.Enum):
    """Who seals and opens the records after the handshake (docs/ARCHITECTURE.md §8)."""

    OWN = "own"  # `records`, TLS 1.3 only
    OPENSSL = "openssl"  # OpenSSL's (`sslstream`); what TLS 1.2 always uses


class KeyExchange(enum.Enum):
    """The key exchange groups every mesh handshake of the sidecar offers and accepts (docs/ARCHITECTURE.md §8)."""

    HYBRID = (
        "hybrid"  # X25519MLKEM768 (hybrid post-quantum) first, then X25519 and P-256; classic where OpenSSL lacks it
    )
    CLASSIC = "classic"  # X25519 and P-256 only: cheaper handshakes, no protection against a future quantum computer


TLS_VERSIONS = ("1.2", "1.3")  # what an explicit listener's `min_tls_version` may say


@dataclass(frozen=True, slots=True)
class ListenAddr:
    host: str  # an IP literal, `0.0.0.0`, `::`, or a name for forward_to targets
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    """Where the sidecar reads its SVID; reloaded when any of them changes."""

    cert: str  # leaf first, then intermediates
    key: str
    bundle: str  # one or more trust roots
    reload_interval: float = 2.0  # seconds between polls of the files (stat: inode, mtime, size)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Where the sidecar gets its SVID when no files are given: from the CA service (see `agent`). The key is made
    in memory and never leaves the process."""

    ca_address: ListenAddr  # host:port; the host may be a DNS name
    token: str  # the projected service-account token (audience mtlsmesh-ca), read afresh for every request
    bundle: str  # the roots that the CA's own SVID must chain to on first contact
    ca_identity: SpiffeId | None = None  # None: spiffe://<trust_domain>/ns/mtlsmesh-system/sa/mtlsmesh-ca
    ttl: float = 86400.0  # seconds of lifetime asked for (the CA may grant less)
    renew_fraction: float = 0.5  # renew when this fraction of the lifetime has passed


@dataclass(frozen=True, slots=True)
class Destination:
    """A mesh destination: traffic to these addresses/ports is mTLS, expecting these server identities."""

    cidrs: tuple[IPNetwork, ...]  # empty means any address
    ports: frozenset[int]  # empty means any port
    identities: tuple[SpiffeId, ...] = ()  # empty: any workload of our trust domain (secure naming off)


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    enabled: bool = True
    listen: ListenAddr = ListenAddr("::", OUTBOUND_PORT)  # dual stack; the sidecar falls back to 0.0.0.0 without IPv6
    policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    # Destinations inside the mesh, first match wins. A destination that matches none is outside the mesh.
    destinations: tuple[Destination, ...] = ()


# Why a server-first port is never PERMISSIVE (policy.route_inbound carries it as mesh mTLS only).
SERVER_FIRST_NOT_PERMISSIVE = (
    "server_first cannot be permissive: its plaintext client sends nothing until the app speaks, so there is nothing"
    " to tell it from mTLS by; use mode strict (mesh callers) or disable (plaintext callers)"
)


@dataclass(frozen=True, slots=True)
class PortConfig:
    mode: Mode | None = None  # None: the mesh-wide mode
    server_first: bool = False  # never sniffed (MySQL-like protocols where the server speaks first)


@dataclass(frozen=True, slots=True)
class InboundConfig:
    enabled: bool = True
    listen: ListenAddr = ListenAddr("::", INBOUND_PORT)  # dual stack, as outbound
    mode: Mode = Mode.STRICT
    ports: dict[int, PortConfig] = field(default_factory=dict)  # treat as read-only
    # Source for dialing the app; None: the kernel picks. Under the capture rules it must be 127.0.0.6 (::6 for an
    # IPv6 app): only a dial from there skips the capture, anything else is redirected back to the inbound listener
    # (refused as a loop). 127.0.0.1 or None only suit an inbound listener without iptables.
    app_source: IPAddress | None = APP_SOURCE
    sniff_timeout: float = 1.0
    # How the init step captures inbound (`mtlsmesh iptables --interception-mode`; the two must agree). TPROXY: the
    # listener is transparent, the original destination is the accepted socket's address, and the app is dialed
    # from the caller's own address (so app_source is not used for captured connections).
    interception_mode: InterceptionMode = InterceptionMode.REDIRECT

    def port_mode(self, port: int) -> Mode:
        entry = self.ports.get(port)
        return entry.mode if entry is not None and entry.mode is not None else self.mode

    def is_server_first(self, port: int) -> bool:
        entry = self.ports.get(port)
        return entry is not None and entry.server_first

    def warnings(self) -> tuple[str, ...]:
        """One line per server-first port that inherits PERMISSIVE: it is carried as mesh mTLS only."""
        return tuple(
            f"inbound.ports.{port}: server_first under inbound.mode permissive accepts mesh mTLS only (its plaintext"
            " client sends nothing to sniff); set its mode to strict to say so, or disable for plaintext callers"
            for port, entry in sorted(self.ports.items())
            if entry.server_first and entry.mode is None and self.mode is Mode.PERMISSIVE
        )


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """One authorization rule. A caller matches `principals` exactly, or by a prefix pattern ending in `/*`,
    or `*` for any authenticated caller. Empty `ports` means every port."""

    action: Action
    principals: tuple[str, ...]
    ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class ExplicitListener:
    """A listener used without iptables: `listen` → `forward_to`, originating or terminating mTLS."""

    name: str
    listen: ListenAddr
    forward_to: ListenAddr
    mode: ExplicitMode
    # originate: the expected server IDs; terminate: the callers let through. Empty: any in our trust domain.
    identities: tuple[SpiffeId, ...] = ()
    min_tls_version: str = "1.3"  # "1.2": legacy peers too (its connections then use OpenSSL's record layer)
    record_layer: RecordLayer | None = None  # None: the config's `record_layer`

    def records(self, default: RecordLayer) -> RecordLayer:
        """The record layer this listener's connections use (`default`: the config's)."""
        if self.min_tls_version == "1.2":
            return RecordLayer.OPENSSL
        return self.record_layer or default


@dataclass(frozen=True, slots=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 5.0
    idle: float | None = None  # None: off
    drain: float = 5.0  # how long open connections may finish after SIGTERM


@dataclass(frozen=True, slots=True)
class Config:
    trust_domain: TrustDomain = TrustDomain(DEFAULT_TRUST_DOMAIN)
    credentials: CredentialFiles | None = None  # the sidecar needs this or `identity`; None only in partial configs
    identity: IdentityConfig | None = None  # the SVID from the CA service instead of files; excludes `credentials`
    outbound: OutboundConfig = OutboundConfig()
    inbound: InboundConfig = InboundConfig()
    authorization: tuple[AuthzRule, ...] = ()
    explicit: tuple[ExplicitListener, ...] = ()
    record_layer: RecordLayer = RecordLayer.OWN  # every listener's, unless an explicit one sets its own
    key_exchange: KeyExchange = KeyExchange.HYBRID  # every listener's
    timeouts: Timeouts = Timeouts()
    max_connections: int = 10_000  # per worker
    # Processes serving the relay listeners (SO_REUSEPORT); 0: "auto" (the default), the CPUs this process may use,
    # capped (`workers.DEFAULT_CAP`). 1: one process, no supervisor.
    workers: int = 0
    admin_listen: ListenAddr | None = ListenAddr("127.0.0.1", ADMIN_PORT)
    health_listen: ListenAddr | None = ListenAddr("0.0.0.0", HEALTH_PORT)
    metrics_listen: ListenAddr | None = ListenAddr("0.0.0.0", METRICS_PORT)
    log_level: str = "info"
    log_format: str = "text"  # text: key=value lines; json: one JSON object per line
    # Warn once per SVID when less than this share of its lifetime is left (0: never).
    svid_warning: float = 0.2


# --- parsing: the YAML format (an annotated example is deploy/sidecar-config.example.yaml) ------------------------

parse_duration = schema.parse_duration
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # RFC 1123 §2.1 (plus '_', common in service names)
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_EXPLICIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEFAULT = Config()
_DEFAULT_RELOAD_INTERVAL = CredentialFiles("", "", "").reload_interval
_DEFAULT_IDENTITY = IdentityConfig(ListenAddr("", 0), "", "")
_TOP_KEYS = (
    "trust_domain", "credentials", "outbound", "inbound", "authorization", "explicit", "timeouts", "max_connections",
    "admin", "health", "metrics", "log", "identity", "record_layer", "workers",
    "key_exchange",
)  # fmt: skip
_PER_LISTENER_ONLY = "only an explicit listener may set it (between sidecars the mesh is TLS 1.3 only)"


def load_config(path: str) -> Config:
    """Read and parse a YAML config file; every error names the file (and the line, for YAML syntax errors)."""
    return parse_config(schema.load_yaml(path), path)


def parse_config(data: object, source: str = "") -> Config:
    """Validate a mapping (parsed YAML or JSON) into a `Config`; errors name `source` and the path in it."""
    try:
        return _parse_config(data)
    except ConfigError as exc:
        if not source:
            raise
        raise ConfigError(f"{source}: {exc.path}" if exc.path else source, exc.message) from exc


def parse_listen_addr(value: object, path: str = "listen", *, allow_name: bool = False) -> ListenAddr:
    """`0.0.0.0:15001`, `[::]:15001`; IPv6 needs brackets. With `allow_name`, a DNS name may stand for the host.

    Port 0 (the kernel picks) is accepted for listeners, so tests can bind ephemeral ports; never for a target.
    """
    if not isinstance(value, str):
        raise ConfigError(path, f"expected host:port as a string (got {schema.kind(value)})")
    split = split_host_port(value)
    if split is None:
        raise ConfigError(path, f"expected host:port, e.g. 0.0.0.0:15001 or [::]:15001 (got {value!r})")
    host, port, bracketed = split
    if port > 65535 or (allow_name and port == 0):
        raise ConfigError(path, f"port {port} is out of range {1 if allow_name else 0}-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # An all-digit last label (1.2.3.999) is a mistyped address, never a DNS name (RFC 1123 §2.1).
        if allow_name and not bracketed and _HOST_NAME.fullmatch(host) and not host.rpartition(".")[2].isdigit():
            return ListenAddr(host.lower(), port)
        shown = f"[{host}]" if bracketed else host
        raise ConfigError(path, f"{shown!r} is not an IP address{' or host name' if allow_name else ''}") from None
    if (address.version == 6) != bracketed:
        raise ConfigError(path, "an IPv6 address needs brackets ([::1]:80), an IPv4 address none")
    return ListenAddr(str(address), port)


def _parse_config(data: object) -> Config:
    _check_min_tls_placement(data)
    top = schema.mapping(data, "", _TOP_KEYS)
    log = schema.mapping(schema.section(top, "log"), "log", ("level", "format", "svid_warning"))
    config = Config(
        trust_domain=_trust_domain(top.get("trust_domain", _DEFAULT.trust_domain.name)),
        credentials=_credentials(top["credentials"]) if top.get("credentials") is not None else None,
        identity=_identity(top["identity"]) if top.get("identity") is not None else None,
        outbound=_outbound(schema.section(top, "outbound")),
        inbound=_inbound(schema.section(top, "inbound")),
        authorization=tuple(_authz_rule(v, f"authorization[{i}]") for i, v in schema.items(top, "authorization")),
        explicit=tuple(_explicit(v, f"explicit[{i}]") for i, v in schema.items(top, "explicit")),
        record_layer=schema.enum_choice(
            top.get("record_layer", _DEFAULT.record_layer.value), "record_layer", RecordLayer
        ),
        key_exchange=schema.enum_choice(
            top.get("key_exchange", _DEFAULT.key_exchange.value), "key_exchange", KeyExchange
        ),
        timeouts=_timeouts(schema.section(top, "timeouts")),
        max_connections=schema.integer(
            top.get("max_connections", _DEFAULT.max_connections), "max_connections", 1, 2**31
        ),
        workers=_workers(top["workers"]) if "workers" in top else _DEFAULT.workers,
        admin_listen=_optional_listener(top, "admin", _DEFAULT.admin_listen),
        health_listen=_optional_listener(top, "health", _DEFAULT.health_listen),
        metrics_listen=_optional_listener(top, "metrics", _DEFAULT.metrics_listen),
        log_level=schema.choice(log.get("level", _DEFAULT.log_level), "log.level", LOG_LEVELS),
        log_format=schema.choice(log.get("format", _DEFAULT.log_format), "log.format", LOG_FORMATS),
        svid_warning=_share(log.get("svid_warning", _DEFAULT.svid_warning), "log.svid_warning"),
    )
    if config.credentials is not None and config.identity is not None:
        raise ConfigError("identity", "give either credentials (SVID files) or identity (from the CA), not both")
    _check_unique_names(config.explicit)
    _check_listeners_distinct(config)
    return config


MAX_WORKERS = 64


def _workers(value: object) -> int:
    """`auto` (0: decided at start from the CPUs the process may use) or 1 to MAX_WORKERS."""
    if value == "auto":
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("workers", f"expected auto or an integer from 1 to {MAX_WORKERS} (got {schema.kind(value)})")
    return schema.integer(value, "workers", 1, MAX_WORKERS)


def _share(value: object, path: str) -> float:
    """A share of a lifetime: 0 (off) up to, not including, 1."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(path, f"expected a number from 0 (off) up to 1, e.g. 0.2 (got {schema.kind(value)})")
    return float(value)


def _trust_domain(value: object) -> TrustDomain:
    try:
        return parse_trust_domain(schema.string(value, "trust_domain"))
    except IdentityError as exc:
        raise ConfigError("trust_domain", str(exc)) from exc


def _credentials(value: object) -> CredentialFiles:
    section = schema.mapping(value, "credentials", ("cert", "key", "bundle", "reload_interval"))
    for key in ("cert", "key", "bundle"):
        if key not in section:
            raise ConfigError("credentials", f"missing required key {key!r} (cert, key and bundle are file paths)")
    return CredentialFiles(
        cert=schema.string(section["cert"], "credentials.cert"),
        key=schema.string(section["key"], "credentials.key"),
        bundle=schema.string(section["bundle"], "credentials.bundle"),
        reload_interval=schema.duration(
            section.get("reload_interval", _DEFAULT_RELOAD_INTERVAL), "credentials.reload_interval", positive=True
        ),
    )


def _identity(value: object) -> IdentityConfig:
    keys = ("ca_address", "ca_identity", "token", "bundle", "ttl", "renew_fraction")
    section = schema.mapping(value, "identity", keys)
    for key in ("ca_address", "token", "bundle"):
        if key not in section:
            raise ConfigError("identity", f"missing required key {key!r} (ca_address, token and bundle are required)")
    ca_identity = None
    if section.get("ca_identity") is not None:
        try:
            ca_identity = parse_workload_id(schema.string(section["ca_identity"], "identity.ca_identity"))
        except IdentityError as exc:
            raise ConfigError("identity.ca_identity", str(exc)) from exc
    fraction = section.get("renew_fraction", _DEFAULT_IDENTITY.renew_fraction)
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ConfigError("identity.renew_fraction", f"expected a number between 0 and 1 (got {schema.kind(fraction)})")
    return IdentityConfig(
        ca_address=parse_listen_addr(section["ca_address"], "identity.ca_address", allow_name=True),
        token=schema.string(section["token"], "identity.token"),
        bundle=schema.string(section["bundle"], "identity.bundle"),
        ca_identity=ca_identity,
        ttl=schema.duration(section.get("ttl", _DEFAULT_IDENTITY.ttl), "identity.ttl", positive=True),
        renew_fraction=float(fraction),
    )


def _outbound(value: object) -> OutboundConfig:
    section = schema.mapping(value, "outbound", ("enabled", "listen", "policy", "destinations"))
    defaults = _DEFAULT.outbound
    destinations = schema.items(section, "destinations", "outbound")
    return OutboundConfig(
        enabled=schema.boolean(section.get("enabled", defaults.enabled), "outbound.enabled"),
        listen=parse_listen_addr(section.get("listen", str(defaults.listen)), "outbound.listen"),
        policy=schema.enum_choice(section.get("policy", defaults.policy.value), "outbound.policy", OutboundPolicy),
        destinations=tuple(_destination(v, f"outbound.destinations[{i}]") for i, v in destinations),
    )


def _destination(value: object, path: str) -> Destination:
    entry = schema.mapping(value, path, ("cidrs", "ports", "identities"))
    return Destination(
        cidrs=tuple(_cidr(v, f"{path}.cidrs[{i}]") for i, v in schema.items(entry, "cidrs", path, non_empty=True)),
        ports=_ports(entry, path),
        identities=_identities(entry, path),
    )


def _inbound(value: object) -> InboundConfig:
    section = schema.mapping(
        value, "inbound", ("enabled", "listen", "mode", "app_source", "sniff_timeout", "ports", "interception_mode")
    )
    defaults = _DEFAULT.inbound
    ports: dict[int, PortConfig] = {}
    for key, entry in schema.mapping(schema.section(section, "ports"), "inbound.ports", None).items():
        path = f"inbound.ports.{key}"
        port = schema.port(int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key, path)
        if port in ports:
            raise ConfigError(path, f"port {port} is listed twice")
        port_entry = schema.mapping({} if entry is None else entry, path, ("mode", "server_first"))
        ports[port] = PortConfig(
            mode=schema.enum_choice(port_entry["mode"], f"{path}.mode", Mode) if "mode" in port_entry else None,
            server_first=schema.boolean(port_entry.get("server_first", False), f"{path}.server_first"),
        )
        if ports[port].server_first and ports[port].mode is Mode.PERMISSIVE:
            raise ConfigError(path, SERVER_FIRST_NOT_PERMISSIVE)
    return InboundConfig(
        enabled=schema.boolean(section.get("enabled", defaults.enabled), "inbound.enabled"),
        listen=parse_listen_addr(section.get("listen", str(defaults.listen)), "inbound.listen"),
        mode=schema.enum_choice(section.get("mode", defaults.mode.value), "inbound.mode", Mode),
        ports=ports,
        app_source=_app_source(section.get("app_source", str(defaults.app_source))),
        sniff_timeout=schema.duration(
            section.get("sniff_timeout", defaults.sniff_timeout), "inbound.sniff_timeout", positive=True
        ),
        interception_mode=schema.enum_choice(
            section.get("interception_mode", defaults.interception_mode.value),
            "inbound.interception_mode",
            InterceptionMode,
        ),
    )


def _app_source(value: object) -> IPAddress | None:
    if value is None or value == "none":
        return None
    try:
        return ipaddress.ip_address(schema.string(value, "inbound.app_source"))
    except ValueError:
        raise ConfigError("inbound.app_source", f"expected an IP address or none (got {value!r})") from None


def _authz_rule(value: object, path: str) -> AuthzRule:
    entry = schema.mapping(value, path, ("action", "principals", "ports"))
    for key in ("action", "principals"):
        if key not in entry:
            raise ConfigError(path, f"missing required key {key!r} (a rule needs action and principals)")
    principals = schema.items(entry, "principals", path, non_empty=True)
    return AuthzRule(
        action=schema.enum_choice(entry["action"], f"{path}.action", Action),
        principals=tuple(_principal(v, f"{path}.principals[{i}]") for i, v in principals),
        ports=_ports(entry, path),
    )


def _principal(value: object, path: str) -> str:
    """`*`, a workload ID, or an ID followed by `/*`; in canonical form (lowercase scheme) for exact matching."""
    text = schema.string(value, path)
    if text == "*":
        return text
    try:
        return f"{parse_spiffe_id(text[:-2])}/*" if text.endswith("/*") else str(parse_workload_id(text))
    except IdentityError as exc:
        raise ConfigError(path, str(exc)) from exc


def _ports(entry: dict[str, Any], path: str) -> frozenset[int]:
    return frozenset(schema.port(v, f"{path}.ports[{i}]") for i, v in schema.items(entry, "ports", path, True))


def _identities(entry: dict[str, Any], path: str) -> tuple[SpiffeId, ...]:
    found = []
    for i, value in schema.items(entry, "identities", path, non_empty=True):
        try:
            found.append(parse_workload_id(schema.string(value, f"{path}.identities[{i}]")))
        except IdentityError as exc:
            raise ConfigError(f"{path}.identities[{i}]", str(exc)) from exc
    return tuple(found)


def _cidr(value: object, path: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(schema.string(value, path))
    except ValueError as exc:
        raise ConfigError(path, f"invalid CIDR: {exc}") from None


def _check_min_tls_placement(data: object) -> None:
    """`min_tls_version` outside an explicit listener: one line that says where it belongs."""
    if not isinstance(data, dict):
        return
    if "min_tls_version" in data:
        raise ConfigError("min_tls_version", _PER_LISTENER_ONLY)
    for section in ("inbound", "outbound"):
        if isinstance(data.get(section), dict) and "min_tls_version" in data[section]:
            raise ConfigError(f"{section}.min_tls_version", _PER_LISTENER_ONLY)


def _min_tls_version(entry: dict[str, Any], path: str) -> str:
    value = entry.get("min_tls_version", "1.3")
    if isinstance(value, float) and str(value) in TLS_VERSIONS:  # YAML reads an unquoted 1.2 as a number
        value = str(value)
    if not isinstance(value, str) or value not in TLS_VERSIONS:
        shown = repr(value) if isinstance(value, str | int | float) else schema.kind(value)
        raise ConfigError(f"{path}.min_tls_version", f'expected "1.2" or "1.3" (got {shown})')
    return value


def _explicit(value: object, path: str) -> ExplicitListener:
    keys = ("name", "listen", "forward_to", "mode", "identities", "min_tls_version", "record_layer")
    entry = schema.mapping(value, path, keys)
    for key in ("name", "listen", "forward_to", "mode"):
        if key not in entry:
            raise ConfigError(path, f"missing required key {key!r} (name, listen, forward_to and mode are required)")
    name = schema.string(entry["name"], f"{path}.name")
    if not _EXPLICIT_NAME.fullmatch(name):
        raise ConfigError(f"{path}.name", f"{name!r} may hold only letters, digits and . _ -")
    min_tls = _min_tls_version(entry, path)
    record_layer = None
    if entry.get("record_layer") is not None:
        record_layer = schema.enum_choice(entry["record_layer"], f"{path}.record_layer", RecordLayer)
    if min_tls == "1.2" and record_layer is RecordLayer.OWN:
        raise ConfigError(
            f"{path}.record_layer",
            'min_tls_version "1.2" needs record_layer openssl (our own record layer is TLS 1.3 only); '
            "set openssl or leave it out",
        )
    return ExplicitListener(
        name=name,
        listen=parse_listen_addr(entry["listen"], f"{path}.listen"),
        forward_to=parse_listen_addr(entry["forward_to"], f"{path}.forward_to", allow_name=True),
        mode=schema.enum_choice(entry["mode"], f"{path}.mode", ExplicitMode),
        identities=_identities(entry, path),
        min_tls_version=min_tls,
        record_layer=record_layer,
    )


def _timeouts(value: object) -> Timeouts:
    section = schema.mapping(value, "timeouts", ("handshake", "connect", "idle", "drain"))
    defaults = _DEFAULT.timeouts
    return Timeouts(
        handshake=schema.duration(section.get("handshake", defaults.handshake), "timeouts.handshake", positive=True),
        connect=schema.duration(section.get("connect", defaults.connect), "timeouts.connect", positive=True),
        idle=schema.duration(section.get("idle", defaults.idle or 0), "timeouts.idle") or None,  # 0 turns it off
        drain=schema.duration(section.get("drain", defaults.drain), "timeouts.drain"),
    )


def _optional_listener(top: dict[str, Any], key: str, default: ListenAddr | None) -> ListenAddr | None:
    """`admin: {listen: ADDR}`; `admin: null` or `admin: {listen: null}` turns the listener off."""
    if key not in top:
        return default
    if top[key] is None:
        return None
    section = schema.mapping(top[key], key, ("listen",))
    if "listen" not in section:
        return default
    return None if section["listen"] is None else parse_listen_addr(section["listen"], f"{key}.listen")


def _check_unique_names(listeners: tuple[ExplicitListener, ...]) -> None:
    seen: set[str] = set()
    for i, listener in enumerate(listeners):
        if listener.name in seen:
            raise ConfigError(f"explicit[{i}].name", f"duplicate name {listener.name!r}")
        seen.add(listener.name)


def _check_listeners_distinct(cfg: Config) -> None:
    """Two listeners on one port (on the same host, or either on a wildcard) would fail at bind time: say so now."""
    listeners = [
        ("outbound.listen", cfg.outbound.listen if cfg.outbound.enabled else None),
        ("inbound.listen", cfg.inbound.listen if cfg.inbound.enabled else None),
        ("admin.listen", cfg.admin_listen),
        ("health.listen", cfg.health_listen),
        ("metrics.listen", cfg.metrics_listen),
        *((f"explicit[{i}].listen", listener.listen) for i, listener in enumerate(cfg.explicit)),
    ]
    taken: list[tuple[str, ListenAddr]] = []
    for path, addr in listeners:
        if addr is None or addr.port == 0:
            continue
        for other_path, other in taken:
            wildcard = addr.host in WILDCARD_HOSTS or other.host in WILDCARD_HOSTS
            if addr.port == other.port and (addr.host == other.host or wildcard):
                raise ConfigError(path, f"{addr} overlaps {other_path} ({other})")
        taken.append((path, addr))


# --- rendering ----------------------------------------------------------------------------------------------------


def render_config(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON values (the admin config dump); `parse_config` of it gives `cfg` back."""
    out: dict[str, Any] = {"trust_domain": cfg.trust_domain.name}
    if cfg.credentials is not None:
        creds = cfg.credentials
        out["credentials"] = {
            "cert": creds.cert, "key": creds.key, "bundle": creds.bundle, "reload_interval": creds.reload_interval
        }  # fmt: skip
    if cfg.identity is not None:
        identity = cfg.identity
        out["identity"] = {
            "ca_address": str(identity.ca_address), "token": identity.token, "bundle": identity.bundle,
            "ttl": identity.ttl, "renew_fraction": identity.renew_fraction,
        } | ({"ca_identity": str(identity.ca_identity)} if identity.ca_identity is not None else {})  # fmt: skip
    outbound, inbound, timeouts = cfg.outbound, cfg.inbound, cfg.timeouts
    out["outbound"] = {
        "enabled": outbound.enabled,
        "listen": str(outbound.listen),
        "policy": outbound.policy.value,
        "destinations": [
            ({"cidrs": [str(c) for c in d.cidrs]} if d.cidrs else {})
            | _render_ports(d.ports)
            | _render_ids(d.identities)
            for d in outbound.destinations
        ],
    }
    out["inbound"] = {
        "enabled": inbound.enabled,
        "listen": str(inbound.listen),
        "mode": inbound.mode.value,
        "app_source": str(inbound.app_source) if inbound.app_source is not None else "none",
        "sniff_timeout": inbound.sniff_timeout,
        "interception_mode": inbound.interception_mode.value,
        "ports": {
            port: ({"mode": entry.mode.value} if entry.mode is not None else {}) | {"server_first": entry.server_first}
            for port, entry in sorted(inbound.ports.items())
        },
    }
    out["authorization"] = [
        {"action": rule.action.value, "principals": list(rule.principals)} | _render_ports(rule.ports)
        for rule in cfg.authorization
    ]
    out["explicit"] = [
        {"name": x.name, "listen": str(x.listen), "forward_to": str(x.forward_to), "mode": x.mode.value}
        | _render_ids(x.identities)
        | {"min_tls_version": x.min_tls_version}
        | ({"record_layer": x.record_layer.value} if x.record_layer is not None else {})
        for x in cfg.explicit
    ]
    out["record_layer"] = cfg.record_layer.value
    out["key_exchange"] = cfg.key_exchange.value
    out["timeouts"] = {
        "handshake": timeouts.handshake,
        "connect": timeouts.connect,
        "idle": timeouts.idle if timeouts.idle is not None else 0,
        "drain": timeouts.drain,
    }
    out["max_connections"] = cfg.max_connections
    out["workers"] = cfg.workers or "auto"
    for key, addr in (("admin", cfg.admin_listen), ("health", cfg.health_listen), ("metrics", cfg.metrics_listen)):
        out[key] = {"listen": str(addr) if addr is not None else None}
    out["log"] = {"level": cfg.log_level, "format": cfg.log_format, "svid_warning": cfg.svid_warning}
    return out


def _render_ports(ports: frozenset[int]) -> dict[str, Any]:
    return {"ports": sorted(ports)} if ports else {}


def _render_ids(identities: tuple[SpiffeId, ...]) -> dict[str, Any]:
    return {"identities": [str(i) for i in identities]} if identities else {}

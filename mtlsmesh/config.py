"""The sidecar's configuration: one YAML file parsed once into frozen values before anything binds.

The dataclasses below are the contract between the parser and the listeners. `load_config(path)` reads a file,
`parse_config(mapping, source)` validates a mapping; every error is a `ConfigError` whose path names the place in
the file (`inbound.ports.9080.mode: expected one of strict, permissive, disable`). Flags and environment variables
override a few per-pod values through `dataclasses.replace` in the CLI.

Durations are seconds as floats (YAML may write `5s`, `250ms`, `2m`, or a number). Addresses are `ListenAddr`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from mtlsmesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, TrustDomain

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


@dataclass(frozen=True, slots=True)
class ListenAddr:
    host: str  # an IP literal, `0.0.0.0`, `::`, or a name for forward_to targets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    """Where the sidecar reads its SVID; reloaded when any of them changes."""

    cert: str  # leaf first, then intermediates
    key: str
    bundle: str  # one or more trust roots
    reload_interval: float = 2.0  # seconds between polls of the files (stat: inode, mtime, size)


@dataclass(frozen=True, slots=True)
class Destination:
    """A mesh destination: traffic to these addresses/ports is mTLS, expecting these server identities."""

    cidrs: tuple[IPNetwork, ...]  # empty means any address
    ports: frozenset[int]  # empty means any port
    identities: tuple[SpiffeId, ...] = ()  # empty: any workload of our trust domain (secure naming off)


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    enabled: bool = True
    listen: ListenAddr = ListenAddr("0.0.0.0", 15001)
    policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    # Destinations inside the mesh, first match wins. A destination that matches none is outside the mesh.
    destinations: tuple[Destination, ...] = ()


@dataclass(frozen=True, slots=True)
class PortConfig:
    mode: Mode | None = None  # None: the mesh-wide mode
    server_first: bool = False  # never sniffed (MySQL-like protocols where the server speaks first)


@dataclass(frozen=True, slots=True)
class InboundConfig:
    enabled: bool = True
    listen: ListenAddr = ListenAddr("0.0.0.0", 15006)
    mode: Mode = Mode.STRICT
    ports: dict[int, PortConfig] = field(default_factory=dict)  # treat as read-only
    app_source: IPAddress | None = ipaddress.ip_address("127.0.0.6")  # source for dialing the app; None: kernel picks
    sniff_timeout: float = 1.0

    def port_mode(self, port: int) -> Mode:
        entry = self.ports.get(port)
        return entry.mode if entry is not None and entry.mode is not None else self.mode

    def is_server_first(self, port: int) -> bool:
        entry = self.ports.get(port)
        return entry is not None and entry.server_first


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
    identities: tuple[SpiffeId, ...] = ()  # originate: expected server IDs (empty: any in our trust domain)


@dataclass(frozen=True, slots=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 5.0
    idle: float | None = None  # None: off
    drain: float = 5.0  # how long open connections may finish after SIGTERM


@dataclass(frozen=True, slots=True)
class Config:
    trust_domain: TrustDomain = TrustDomain(DEFAULT_TRUST_DOMAIN)
    credentials: CredentialFiles | None = None  # required by the sidecar; None only in partial configs
    outbound: OutboundConfig = OutboundConfig()
    inbound: InboundConfig = InboundConfig()
    authorization: tuple[AuthzRule, ...] = ()
    explicit: tuple[ExplicitListener, ...] = ()
    timeouts: Timeouts = Timeouts()
    max_connections: int = 10_000
    admin_listen: ListenAddr | None = ListenAddr("127.0.0.1", 15000)
    health_listen: ListenAddr | None = ListenAddr("0.0.0.0", 15021)
    metrics_listen: ListenAddr | None = ListenAddr("0.0.0.0", 15090)
    log_level: str = "info"

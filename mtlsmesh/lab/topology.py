"""The pod lab's plan as data: pods, services, their addresses, each sidecar's config and the node's DNAT rules.

A `Topology` names pods (network namespaces on one bridge) and Services (virtual IPs). `plan_topology` gives every
pod an address and every Service a virtual IP; `render_sidecar_config` writes the YAML mapping a pod's sidecar
reads (its keys: deploy/sidecar-config.example.yaml); `render_service_rules` writes the node's kube-proxy-like DNAT
rules as one `iptables-restore` payload per address family.

Address plan, dual stack, never routed out of the lab's node namespace. IPv4 (all of 198.18.0.0/15, the
benchmarking range): pods get /32 addresses from 198.18.0.0/24 with 198.18.0.1 on the node's bridge as their only
gateway, so even pod-to-pod traffic is routed through the node and its nat PREROUTING (that is how Service DNAT
and its reverse apply without br_netfilter); Service virtual IPs come from 198.19.0.0/24 and exist only as DNAT
rules. IPv6 (all of 2001:db8::/32, the documentation range): the same plan with /128 pod addresses from
2001:db8:18::/64 behind the gateway 2001:db8:18::1, and Service VIPs from 2001:db8:19::/64. Pod n has host n in
both (198.18.0.10 and 2001:db8:18::a), Service n the same (198.19.0.10 and 2001:db8:19::a): a dual-stack Service
has one ClusterIP per family, both in front of the same pod.

Hairpin: a pod calling its own Service VIP is DNATed on the node back to itself. As kube-proxy does
(KUBE-MARK-MASQ on a Service endpoint's own source, MASQUERADE in KUBE-POSTROUTING), the node then also SNATs that
connection to its bridge address, so the pod sees a caller other than itself and its answers go back through the
node, where conntrack undoes both translations. Without it the pod would receive a packet with its own address as
the source (IPv4 drops it as a martian; IPv6 answers it locally, past the node's reverse DNAT), and the call would
time out.

What this module does not do: run anything (`lab` builds the namespaces, starts the processes and applies these).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mtlsmesh.addresses import IPAddress, host_port
from mtlsmesh.caproto import CA_PORT
from mtlsmesh.conventions import (
    ADMIN_PORT,
    APP_SOURCE,
    HEALTH_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    PROXY_UID,
)
from mtlsmesh.errors import LabError
from mtlsmesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, workload_id

POD_NETWORK = ipaddress.IPv4Network("198.18.0.0/24")
GATEWAY = ipaddress.IPv4Address("198.18.0.1")
FIRST_POD_HOST = 10  # 198.18.0.10 is the first pod; low addresses stay free for the node
SERVICE_NETWORK = ipaddress.IPv4Network("198.19.0.0/24")
FIRST_SERVICE_HOST = 10
POD_NETWORK_V6 = ipaddress.IPv6Network("2001:db8:18::/64")
GATEWAY_V6 = ipaddress.IPv6Address("2001:db8:18::1")
SERVICE_NETWORK_V6 = ipaddress.IPv6Network("2001:db8:19::/64")
FAMILIES = (4, 6)  # the lab is dual stack: every pod and every Service has an address of each
SERVICES_CHAIN = "MTLSMESH_LAB_SERVICES"  # the node's KUBE-SERVICES
POSTROUTING_CHAIN = "MTLSMESH_LAB_POSTROUTING"  # the node's KUBE-POSTROUTING
MASQ_MARK = 0x4000  # kube-proxy's masquerade bit: set on a hairpin connection, SNATed on the way out
DEFAULT_APP_UID = 1000
# Identity mode: the CA service listens on the node's bridge address, which every pod routes through. It is no mesh
# destination (those are pod addresses and Service VIPs), and the sidecars' own connections (uid 1337) are never
# captured, so they reach it directly.
CA_ADDRESS = GATEWAY

_POD_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")


@dataclass(frozen=True, slots=True)
class AppSpec:
    """A process in a pod: `python -m mtlsmesh.lab.demoapps ARGS...` as `uid`; `ports` are waited for before use."""

    name: str
    args: tuple[str, ...]
    ports: tuple[int, ...] = ()
    uid: int = DEFAULT_APP_UID


@dataclass(frozen=True, slots=True)
class PodSpec:
    """One pod. `mesh=False` is a pod outside the mesh: no capture rules, no sidecar, no certificate.

    `sidecar` is merged over the rendered sidecar config (nested mappings merge, everything else replaces), so a
    test sets `{"inbound": {"mode": "permissive"}}` without repeating the rest. `capture_args` are extra flags for
    `mtlsmesh iptables`.
    """

    name: str
    apps: tuple[AppSpec, ...] = ()
    mesh: bool = True
    service_account: str = ""  # empty: the pod's name
    namespace: str = "default"
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    capture_args: tuple[str, ...] = ()
    sidecar: Mapping[str, object] = field(default_factory=dict)

    @property
    def account(self) -> str:
        return self.service_account or self.name


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A Service: `vip:port` is DNATed on the node to `pod:target_port` (one endpoint, as the lab needs no more)."""

    name: str
    port: int
    pod: str
    target_port: int


@dataclass(frozen=True, slots=True)
class IdentitySpec:
    """Identity mode: the lab plays the cluster (a token issuer, `mtlsmesh ca serve` on the node) and every mesh
    sidecar enrols with its projected token instead of reading SVID files. `ttl` is both what the sidecars ask for
    and the longest lifetime the CA grants; `renew_fraction` is the sidecars' renewal point. `token_lifetime`
    (seconds) is the longest projected token the lab's API server mints (a cluster's
    `--service-account-max-token-expiration`); the lab projects each token again at 80 % of its life."""

    ttl: str = "1h"
    renew_fraction: float = 0.5
    token_lifetime: int = 3600


@dataclass(frozen=True, slots=True)
class Topology:
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...] = ()
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    identity: IdentitySpec | None = None  # None: each pod gets SVID files from the lab's CA (file mode)


@dataclass(frozen=True, slots=True)
class PlannedPod:
    spec: PodSpec
    index: int
    ip: ipaddress.IPv4Address
    spiffe_id: SpiffeId | None  # None outside the mesh
    ip6: ipaddress.IPv6Address

    def address(self, family: int = 4) -> IPAddress:
        """The pod's address of IP version `family` (4 or 6)."""
        return self.ip if _family(family) == 4 else self.ip6


@dataclass(frozen=True, slots=True)
class PlannedService:
    spec: ServiceSpec
    vip: ipaddress.IPv4Address
    target_ip: ipaddress.IPv4Address
    target_id: SpiffeId | None
    vip6: ipaddress.IPv6Address
    target_ip6: ipaddress.IPv6Address

    def address(self, family: int = 4) -> IPAddress:
        """The Service's virtual IP of IP version `family` (4 or 6): its two ClusterIPs."""
        return self.vip if _family(family) == 4 else self.vip6

    def target(self, family: int = 4) -> IPAddress:
        return self.target_ip if _family(family) == 4 else self.target_ip6


def _family(family: int) -> int:
    if family not in FAMILIES:
        raise LabError(f"IP version {family}: the lab has IPv4 (4) and IPv6 (6) addresses")
    return family


@dataclass(frozen=True, slots=True)
class Plan:
    topology: Topology
    pods: tuple[PlannedPod, ...]
    services: tuple[PlannedService, ...]

    def pod(self, name: str) -> PlannedPod:
        for pod in self.pods:
            if pod.spec.name == name:
                return pod
        raise LabError(f"no pod named {name!r} in this lab")

    def service(self, name: str) -> PlannedService:
        for service in self.services:
            if service.spec.name == name:
                return service
        raise LabError(f"no service named {name!r} in this lab")


def plan_topology(topology: Topology) -> Plan:
    """Check names and give every pod an address and every Service a virtual IP, in declaration order."""
    max_pods = POD_NETWORK.num_addresses - FIRST_POD_HOST - 1
    if not topology.pods:
        raise LabError("a topology needs at least one pod")
    if len(topology.pods) > max_pods:
        raise LabError(f"at most {max_pods} pods fit in {POD_NETWORK}")
    seen: set[str] = set()
    pods: list[PlannedPod] = []
    for index, spec in enumerate(topology.pods):
        if not _POD_NAME.fullmatch(spec.name):
            raise LabError(f"pod name {spec.name!r}: use 1-20 characters a-z 0-9 -, starting with a letter")
        if spec.name in seen:
            raise LabError(f"pod name {spec.name!r} is used twice")
        seen.add(spec.name)
        for app in spec.apps:
            if app.uid in (0, PROXY_UID):
                raise LabError(f"pod {spec.name}: app {app.name} must not run as uid {app.uid}")
        ip = POD_NETWORK.network_address + FIRST_POD_HOST + index
        ip6 = POD_NETWORK_V6.network_address + FIRST_POD_HOST + index
        spiffe_id = workload_id(topology.trust_domain, spec.namespace, spec.account) if spec.mesh else None
        pods.append(PlannedPod(spec, index, ip, spiffe_id, ip6))
    plan_pods = tuple(pods)
    services: list[PlannedService] = []
    for index, svc in enumerate(topology.services):
        target = next((p for p in plan_pods if p.spec.name == svc.pod), None)
        if target is None:
            raise LabError(f"service {svc.name}: no pod named {svc.pod!r}")
        vip = SERVICE_NETWORK.network_address + FIRST_SERVICE_HOST + index
        vip6 = SERVICE_NETWORK_V6.network_address + FIRST_SERVICE_HOST + index
        services.append(PlannedService(svc, vip, target.ip, target.spiffe_id, vip6, target.ip6))
    return Plan(topology, plan_pods, tuple(services))


def merge_config(base: Mapping[str, object], override: Mapping[str, object]) -> dict[str, object]:
    """Nested mappings merge key by key; any other value in `override` replaces the one in `base`."""
    merged: dict[str, object] = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = merge_config(current, value)
        else:
            merged[key] = value
    return merged


def render_sidecar_config(plan: Plan, pod_name: str, cert: str, key: str, bundle: str) -> dict[str, object]:
    """The sidecar config mapping for one mesh pod reading its SVID from files (serialize with yaml.safe_dump).

    See `_render_config` for the rest of it.
    """
    source = {"credentials": {"cert": cert, "key": key, "bundle": bundle, "reload_interval": "500ms"}}
    return _render_config(plan, pod_name, source)


def render_identity_config(plan: Plan, pod_name: str, token: str, bundle: str) -> dict[str, object]:
    """The sidecar config mapping for one mesh pod in identity mode: its SVID from the CA service at
    `CA_ADDRESS`, enrolling with the projected token file `token`, trusting `bundle` on first contact."""
    spec = plan.topology.identity
    if spec is None:
        raise LabError("this topology is not in identity mode")
    section: dict[str, object] = {
        "ca_address": host_port(str(CA_ADDRESS), CA_PORT),
        "token": token,
        "bundle": bundle,
        "ttl": spec.ttl,
        "renew_fraction": spec.renew_fraction,
    }
    return _render_config(plan, pod_name, {"identity": section})


def _render_config(plan: Plan, pod_name: str, source: Mapping[str, object]) -> dict[str, object]:
    """The config around the SVID source `source` (a `credentials:` or an `identity:` section).

    Every mesh pod's address is a mesh destination expecting that pod's identity, and every Service VIP in front
    of a mesh pod expects its backend's identity (secure naming); anything else is outside the mesh.
    """
    pod = plan.pod(pod_name)
    if pod.spiffe_id is None:
        raise LabError(f"pod {pod_name} is outside the mesh and has no sidecar")
    destinations: list[dict[str, object]] = []
    for other in plan.pods:
        if other.spiffe_id is not None:
            cidrs = [f"{other.ip}/32", f"{other.ip6}/128"]
            destinations.append({"cidrs": cidrs, "identities": [str(other.spiffe_id)]})
    for service in plan.services:
        if service.target_id is not None:
            cidrs = [f"{service.vip}/32", f"{service.vip6}/128"]
            destinations.append({"cidrs": cidrs, "ports": [service.spec.port], "identities": [str(service.target_id)]})
    base: dict[str, object] = {
        "trust_domain": plan.topology.trust_domain,
        **source,
        "outbound": {
            "enabled": True,
            "listen": host_port("::", OUTBOUND_PORT),  # dual stack: both families' captured connections
            "policy": "ALLOW_ANY",
            "destinations": destinations,
        },
        "inbound": {
            "enabled": True,
            "listen": host_port("::", INBOUND_PORT),
            "mode": "strict",
            "app_source": str(APP_SOURCE),
        },
        "timeouts": {"handshake": "10s", "connect": "5s", "idle": 0, "drain": "1s"},
        "admin": {"listen": host_port("127.0.0.1", ADMIN_PORT)},
        "health": {"listen": host_port("::", HEALTH_PORT)},
        "metrics": {"listen": host_port("::", METRICS_PORT)},
        "log": {"level": "info"},
    }
    return merge_config(base, pod.spec.sidecar)


def render_capture_args(spec: PodSpec) -> tuple[str, ...]:
    """Flags for the pod's init step, `mtlsmesh iptables`."""
    args: list[str] = []
    if spec.exclude_inbound_ports:
        args += ["--exclude-inbound-ports", ",".join(str(p) for p in spec.exclude_inbound_ports)]
    if spec.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", ",".join(str(p) for p in spec.exclude_outbound_ports)]
    return (*args, *spec.capture_args)


def render_service_rules(plan: Plan, family: int = 4) -> str:
    """The node's Service DNAT rules for IP version `family` as an `iptables-restore --noflush` payload (for 6,
    `ip6tables-restore`).

    As kube-proxy does, the rules hang off the node's PREROUTING (pod traffic routed through the bridge gateway)
    and OUTPUT (the node's own connections). Conntrack rewrites the replies back to the VIP, which works because
    pods route every packet, replies included, through the node. A connection from a Service's own backend pod to
    that Service is marked before its DNAT and SNATed to the node on the way out (the hairpin, see the module
    docstring), as kube-proxy's KUBE-MARK-MASQ and KUBE-POSTROUTING do.
    """
    host_bits = "32" if _family(family) == 4 else "128"
    mark = f"{MASQ_MARK:#x}/{MASQ_MARK:#x}"
    lines = ["*nat", f":{SERVICES_CHAIN} - [0:0]", f":{POSTROUTING_CHAIN} - [0:0]"]
    lines.append(f"-A PREROUTING -j {SERVICES_CHAIN}")
    lines.append(f"-A OUTPUT -j {SERVICES_CHAIN}")
    lines.append(f"-A POSTROUTING -j {POSTROUTING_CHAIN}")
    for service in plan.services:
        vip, target = service.address(family), service.target(family)
        endpoint = host_port(target, service.spec.target_port)
        match = f"-d {vip}/{host_bits} -p tcp -m tcp --dport {service.spec.port}"
        comment = f'-m comment --comment "service {service.spec.name}'
        hairpin = f'-s {target}/{host_bits} {match} {comment} hairpin"'
        lines.append(f"-A {SERVICES_CHAIN} {hairpin} -j MARK --set-xmark {mark}")
        lines.append(f'-A {SERVICES_CHAIN} {match} {comment}" -j DNAT --to-destination {endpoint}')
    lines.append(f"-A {POSTROUTING_CHAIN} -m mark --mark {mark} -j MASQUERADE")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"

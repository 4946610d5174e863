"""The tunnel pairs under test, each an originator in namespace A and a terminator in namespace B, and the
no-tunnel path beside them.

    ns A: client tool -> 127.0.0.1:<front> [originator] == TLS 1.3, mutual ==> 198.18.9.2:<front> [terminator]
    ns B: [terminator] -> 127.0.0.1:<backend>
    no tunnel: client tool in A -> 198.18.9.2:<backend>

The three pairs (stunnel, haproxy, mtlsmesh) carry the same three services (echo, http, iperf3), use the same
certificates (ECDSA P-256 SVIDs from the mtlsmesh CA), verify the peer's chain against the same root and require a
client certificate. Session resumption is off everywhere (stunnel `sessionResume = no`; haproxy `no-ssl-reuse` on
the client side and `no-tls-tickets` on the server side; mtlsmesh never resumes), so every new connection costs a
full handshake. Each tool keeps its default logging (stunnel: notice; haproxy: none, as no log target is set;
mtlsmesh: info) and its default threading (stunnel: a thread per connection; haproxy: one thread per CPU).

Differences that remain and are part of what is measured: mtlsmesh also checks the SPIFFE ID of each peer
(the server's against the expected identity, the client's against the authorization policy); the C peers check
only the chain.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.certs import BenchCerts
from bench.netns import ADDR_B, Lab, Proc

SERVICES = ("echo", "http", "iperf")
BACKEND_PORTS = {"echo": 7001, "http": 7002, "iperf": 7003}


@dataclass(frozen=True, slots=True)
class PairSpec:
    tool: str  # "stunnel", "haproxy", "mtlsmesh", "mtlsmesh-1w", "mtlsmesh-openssl", "mtlsmesh-classic" or "direct"
    front_ports: dict[str, int]  # per service: originator port on 127.0.0.1 in A == terminator port on ADDR_B in B
    front_host: str = "127.0.0.1"  # where the load tools in A connect
    record_layer: str = "own"  # mtlsmesh's `record_layer`
    workers: int | None = None  # mtlsmesh's `workers`; None: no such line, the sidecar's default (auto)
    key_exchange: str = "hybrid"  # mtlsmesh's `key_exchange`


STUNNEL = PairSpec("stunnel", {"echo": 8101, "http": 8102, "iperf": 8103})
MTLSMESH = PairSpec("mtlsmesh", {"echo": 8201, "http": 8202, "iperf": 8203})
HAPROXY = PairSpec("haproxy", {"echo": 8301, "http": 8302, "iperf": 8303})
DIRECT = PairSpec("direct", dict(BACKEND_PORTS), front_host=ADDR_B)  # no tunnel: straight to the backends
# The same sidecars with OpenSSL's record layer; only when asked for (`--tools ...,mtlsmesh-openssl`).
MTLSMESH_OPENSSL = PairSpec("mtlsmesh-openssl", {"echo": 8401, "http": 8402, "iperf": 8403}, record_layer="openssl")
# The same sidecars as one process each (`workers: 1`), beside the default in every default run (`mtlsmesh-1w`).
MTLSMESH_1W = PairSpec("mtlsmesh-1w", {"echo": 8501, "http": 8502, "iperf": 8503}, workers=1)
# The same sidecars with `key_exchange: classic` (X25519, no ML-KEM); only when asked for.
MTLSMESH_CLASSIC = PairSpec("mtlsmesh-classic", {"echo": 8601, "http": 8602, "iperf": 8603}, key_exchange="classic")
# The order every round runs them in.
PAIRS = (STUNNEL, HAPROXY, MTLSMESH, MTLSMESH_1W, MTLSMESH_OPENSSL, MTLSMESH_CLASSIC, DIRECT)


def render_stunnel_conf(spec: PairSpec, certs: BenchCerts, *, client: bool) -> str:
    svid = certs.client if client else certs.server
    lines = ["foreground = yes", "pid =", "syslog = no", ""]
    for service in SERVICES:
        port = spec.front_ports[service]
        if client:
            accept, connect = f"127.0.0.1:{port}", f"{ADDR_B}:{port}"
        else:
            accept, connect = f"{ADDR_B}:{port}", f"127.0.0.1:{BACKEND_PORTS[service]}"
        lines += [
            f"[{service}]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {accept}",
            f"connect = {connect}",
            f"cert = {svid.cert}",
            f"key = {svid.key}",
            f"CAfile = {svid.bundle}",
            "verifyChain = yes",
            "requireCert = yes",
            "sslVersionMin = TLSv1.3",
            "sessionResume = no",
            "",
        ]
    return "\n".join(lines)


def haproxy_maxconn() -> int:
    """As many connections as haproxy can open under this process's file limit (two descriptors each)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 20000 if hard == resource.RLIM_INFINITY else (hard - 100) // 2
    return max(256, min(20000, ceiling))


def render_haproxy_conf(spec: PairSpec, certs: BenchCerts, *, client: bool, pem: Path) -> str:
    """haproxy in TCP mode: TLS 1.3 only, client certificates required and verified, no resumption.

    `pem` is the SVID's certificate and key in one file, the form haproxy's `crt` takes.
    """
    svid = certs.client if client else certs.server
    lines = [
        "global",
        f"    maxconn {haproxy_maxconn()}",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 10m",
        "    timeout server 10m",
        "",
    ]
    for service in SERVICES:
        port = spec.front_ports[service]
        if client:
            lines += [
                f"listen {service}",
                f"    bind 127.0.0.1:{port}",
                f"    server peer {ADDR_B}:{port} ssl crt {pem} ca-file {svid.bundle} verify required "
                "ssl-min-ver TLSv1.3 no-ssl-reuse",
                "",
            ]
        else:
            lines += [
                f"listen {service}",
                f"    bind {ADDR_B}:{port} ssl crt {pem} ca-file {svid.bundle} verify required ssl-min-ver TLSv1.3 "
                "no-tls-tickets",
                f"    server app 127.0.0.1:{BACKEND_PORTS[service]}",
                "",
            ]
    return "\n".join(lines)


def render_mtlsmesh_conf(spec: PairSpec, certs: BenchCerts, *, client: bool) -> str:
    """A sidecar config with only explicit listeners: no capture, no admin/health/metrics ports."""
    svid = certs.client if client else certs.server
    lines = [
        "trust_domain: cluster.local",
        f"credentials: {{cert: {svid.cert}, key: {svid.key}, bundle: {svid.bundle}}}",
        "outbound: {enabled: false}",
        "inbound: {enabled: false}",
        "admin: null",
        "health: null",
        "metrics: null",
        f"record_layer: {spec.record_layer}",
        f"key_exchange: {spec.key_exchange}",
        *([] if spec.workers is None else [f"workers: {spec.workers}"]),
        "explicit:",
    ]
    for service in SERVICES:
        port = spec.front_ports[service]
        if client:
            lines.append(
                f"  - {{name: {service}, listen: 127.0.0.1:{port}, forward_to: {ADDR_B}:{port}, mode: originate, "
                f"identities: [{certs.server.spiffe_id}]}}"
            )
        else:
            lines.append(
                f"  - {{name: {service}, listen: {ADDR_B}:{port}, forward_to: 127.0.0.1:{BACKEND_PORTS[service]}, "
                "mode: terminate}"
            )
    return "\n".join(lines) + "\n"


def python_env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(slots=True)
class RunningPair:
    spec: PairSpec
    procs: tuple[Proc, ...]  # (originator, terminator); empty for the no-tunnel path

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(proc.pid for proc in self.procs)


def _haproxy_pem(svid_cert: Path, svid_key: Path, target: Path) -> Path:
    target.touch(mode=0o600)
    target.write_bytes(svid_cert.read_bytes() + svid_key.read_bytes())
    return target


def start_pair(lab: Lab, spec: PairSpec, certs: BenchCerts, workdir: Path, repo_root: Path, label: str) -> RunningPair:
    """Start the terminator in B and the originator in A, and wait until every listener accepts."""
    if spec.tool == "direct":
        return RunningPair(spec, ())
    procs: list[Proc] = []
    for client, ns, role in ((False, lab.ns_b, "terminator"), (True, lab.ns_a, "originator")):
        conf = workdir / f"{label}-{role}.conf"
        if spec.tool == "stunnel":
            conf.write_text(render_stunnel_conf(spec, certs, client=client))
            argv = ["stunnel", str(conf)]
        elif spec.tool == "haproxy":
            svid = certs.client if client else certs.server
            pem = _haproxy_pem(svid.cert, svid.key, workdir / f"{label}-{role}.pem")
            conf.write_text(render_haproxy_conf(spec, certs, client=client, pem=pem))
            argv = ["haproxy", "-db", "-f", str(conf)]
        else:
            conf.write_text(render_mtlsmesh_conf(spec, certs, client=client))
            argv = [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(conf)]
        proc = lab.start(ns, f"{label}-{role}", argv, env=python_env(repo_root))
        procs.append(proc)
        lab.wait_listening(proc, list(spec.front_ports.values()))
    return RunningPair(spec, (procs[1], procs[0]))


def stop_pair(lab: Lab, pair: RunningPair) -> None:
    for proc in pair.procs:
        lab.stop(proc)

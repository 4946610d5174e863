"""The demo behind `mtlsmesh demo`: the bookinfo mesh in a pod lab, traffic through it, and the evidence.

Topology: productpage -> details, productpage -> reviews -> ratings, each behind a Service VIP; a `sleep` pod in
the mesh sends the requests; a `legacy` pod outside the mesh (no capture, no sidecar) shows STRICT refusing it,
an excluded port (details:9090) letting it through, and a mesh pod reaching its app as plain TCP (ALLOW_ANY).
The demo prints what a person investigating wants to see and checks it: the apps logged plaintext, the sidecars
logged the peer identity of each hop, their metrics name both principals of each hop under mutual TLS (and
`security_policy="none"` for legacy's plaintext call), the wire (a tcpdump on the node-side veth of the reviews
pod) carried only TLS records and never the plaintext marker, and the capture rules' packet counters moved. It ends
with PASS or FAIL and the matching exit status (0 or 1; 2 when the lab cannot be built).

It shows what the original investigation looked at by hand inside a pod, as tables (`mtlsmesh.lab.report`): the
processes of each pod with their uid (`ps`), who listens on which port as which uid (`netstat -lntp`, read from
/proc/net/tcp{,6} and each process's open sockets), the capture rules with the counters of the ones that carry the
story called out (the uid-1337 RETURN, the 127.0.0.6 RETURN, the two REDIRECTs) and our chain names beside Istio's;
then what it could not see: the identities on each hop, as both sidecars logged them and as their metrics label
them. It ends with the operator's commands, run as a person would: `mtlsmesh check --pod` in each mesh pod and
`mtlsmesh explain --live` for each hop, each checked against what happened. `--report FILE.html` writes all of it
as one self-contained page.

The mesh runs in identity mode: the lab plays the cluster, `mtlsmesh ca serve` runs on the node, and each sidecar
enrols with it using its pod's service-account token (no SVID file exists); the demo shows and checks each pod's
enrolment and, since the demo's SVIDs live `DEMO_TTL` and are renewed at `DEMO_RENEW_FRACTION` of that, a renewal
of every sidecar (a new serial, taken into use by new connections) while it runs. `--files` runs the same mesh
with SVID files from the lab's CA instead (the offline mode, no CA service). `--keep` leaves the lab running and
prints how to step into a pod; Ctrl-C tears it down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mtlsmesh.conventions import (
    ADMIN_PORT,
    APP_SOURCE,
    HEALTH_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    PROXY_UID,
    SIDECAR_PORTS,
)
from mtlsmesh.errors import LabError
from mtlsmesh.lab import netns, pcap, report
from mtlsmesh.lab.demoapps import MARKER_HEADER
from mtlsmesh.lab.pods import DEFAULT_TAG, Lab, child_env, http_get, log_records
from mtlsmesh.lab.topology import (
    FIRST_SERVICE_HOST,
    SERVICE_NETWORK,
    AppSpec,
    IdentitySpec,
    PodSpec,
    ServiceSpec,
    Topology,
)

APP_PORT = 9080
EXCLUDED_PORT = 9090
LEGACY_PORT = 8080
SERVICES = ("productpage", "details", "reviews", "ratings")
# A cluster's SVIDs live 24 h, renewed at half; the demo's live a minute and are renewed at a tenth of that
# (about every 6 s), so a renewal happens while it runs.
DEMO_TTL = "60s"
DEMO_RENEW_FRACTION = 0.1
RENEWAL_TIMEOUT = 20.0  # the demo waits this long for every sidecar's first renewal (due after about 6 s)
# The calls one request to productpage makes, the first from the sleep pod: (caller, callee).
HOPS = (("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"), ("reviews", "ratings"))


def service_url(name: str, path: str) -> str:
    vip = SERVICE_NETWORK.network_address + FIRST_SERVICE_HOST + SERVICES.index(name)
    return f"{name}=http://{vip}:{APP_PORT}/{path}"


def bookinfo(*, identity: bool = True) -> Topology:
    def http_app(name: str, *extra: str, ports: tuple[int, ...] = (APP_PORT,)) -> AppSpec:
        port_args = [arg for port in ports for arg in ("--port", str(port))]
        return AppSpec(name, ("http", "--name", name, *port_args, *extra), ports=ports)

    return Topology(
        pods=(
            PodSpec(
                "productpage",
                apps=(
                    http_app(
                        "productpage",
                        "--call",
                        service_url("details", "details"),
                        "--call",
                        service_url("reviews", "reviews"),
                    ),
                ),
            ),
            PodSpec(
                "details",
                apps=(http_app("details", ports=(APP_PORT, EXCLUDED_PORT)),),
                exclude_inbound_ports=(EXCLUDED_PORT,),
            ),
            PodSpec("reviews", apps=(http_app("reviews", "--call", service_url("ratings", "ratings")),)),
            PodSpec("ratings", apps=(http_app("ratings"),)),
            PodSpec("sleep"),
            PodSpec("legacy", mesh=False, apps=(http_app("legacy", ports=(LEGACY_PORT,)),)),
        ),
        services=tuple(ServiceSpec(name, APP_PORT, name, APP_PORT) for name in SERVICES),
        identity=IdentitySpec(ttl=DEMO_TTL, renew_fraction=DEMO_RENEW_FRACTION) if identity else None,
    )


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Gathered:
    """What the demo saw, for the HTML page (`--report`); filled as the sections run."""

    pods: list[report.Pod] = field(default_factory=list)
    hops: list[report.Hop] = field(default_factory=list)
    flows: list[report.Flow] = field(default_factory=list)
    sockets: list[report.Socket] = field(default_factory=list)
    processes: list[report.Process] = field(default_factory=list)
    rules_pod: str = ""
    rules: list[report.Rule] = field(default_factory=list)
    evidence: list[report.Evidence] = field(default_factory=list)

    def evidence_of(self, title: str, text: str) -> None:
        self.evidence.append(report.Evidence(title, text))


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.seen = Gathered()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f" — {detail}" if detail else ""))
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)


def section(title: str) -> None:
    print(f"\n=== {title} ===")


def attempt(fn: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes] | str:
    try:
        return fn()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("\n".join(report.table(headers, rows)))


def run_demo(lab: Lab, rep: Report, requests: int) -> None:
    plan = lab.plan
    seen = rep.seen
    section("pods (network namespaces on one bridge, node namespace " + lab.node_ns + ")")
    rows = []
    for pod in plan.pods:
        identity = str(pod.spiffe_id) if pod.spiffe_id else "outside the mesh (no capture, no sidecar)"
        rows.append((pod.spec.name, str(pod.ip), lab.pod_ns(pod.spec.name), identity))
        apps = tuple(app.name for app in pod.spec.apps)
        seen.pods.append(report.Pod(pod.spec.name, str(pod.ip), str(pod.spiffe_id) if pod.spiffe_id else None, apps))
    print_table(("pod", "address", "namespace", "identity"), rows)
    print_table(
        ("service", "VIP", "pod"),
        [(s.spec.name, f"{s.vip}:{s.spec.port}", str(s.target_ip)) for s in plan.services],
    )

    if plan.topology.identity is not None:
        show_enrolments(lab, rep)
    show_processes(lab, rep)
    show_sockets(lab, rep)

    marker = f"SECRET-PLAINTEXT-{os.getpid()}-{time.time_ns()}"
    section(f"{requests} requests: sleep -> productpage VIP (marker {marker})")
    answers: list[tuple[int, bytes] | str] = []
    with lab.capture("reviews") as pcap_path:
        for index in range(requests):
            request = functools.partial(
                http_get,
                lab.pod_ns("sleep"),
                lab.vip("productpage"),
                APP_PORT,
                f"/productpage?request={index}",
                timeout=15.0,
                headers={MARKER_HEADER: marker},
            )
            answers.append(attempt(request))
    good = 0
    for index, answer in enumerate(answers):
        if isinstance(answer, str):
            print(f"  request {index} failed: {answer}")
            continue
        status, body = answer
        nested = _nested_ok(body)
        good += status == 200 and nested
        print(f"  request {index}: HTTP {status}, details+reviews+ratings answered: {'yes' if nested else 'NO'}")
    if answers and not isinstance(answers[0], str):
        print("  the first answer, service by service (each app reports who called it and whether the marker came):")
        print_table(("service", "called by", "HTTP", "app saw the call from", "marker"), _answer_rows(answers[0][1]))
        seen.evidence_of("the first answer (JSON)", answers[0][1].decode(errors="replace"))
    rep.check("every request answered through all four services", good == requests, f"{good}/{requests}")

    section(f"what the apps received (plaintext, from {APP_SOURCE} = delivered by their inbound sidecar)")
    app_rows = []
    app_ok: list[tuple[str, bool, int]] = []
    for name in SERVICES:
        lines = [line for line in lab.app_log(name, name).splitlines() if marker in line]
        sources = sorted({_field(line, "peer").rpartition(":")[0] for line in lines})
        first = _field(lines[0], "request").strip("'") if lines else "-"
        app_rows.append((name, str(len(lines)), ", ".join(sources) or "-", first))
        app_ok.append(
            (name, len(lines) >= requests and all(f"peer={APP_SOURCE}:" in line for line in lines), len(lines))
        )
        seen.evidence_of(f"the {name} app's log", "\n".join(lines))
    print_table(("app", "requests with the marker", "from", "first request"), app_rows)
    for name, ok, count in app_ok:
        rep.check(f"{name} logged the plaintext marker, delivered by its sidecar", ok, f"{count} requests")

    section("which sidecar handled each hop, and the identity presented (from the sidecars' key=value logs)")
    hop_rows = []
    for caller, callee in HOPS:
        caller_id, callee_id = str(plan.pod(caller).spiffe_id), str(plan.pod(callee).spiffe_id)
        out_hit = wait_record(lab, caller, _with_peer("outbound", callee_id))
        in_hit = wait_record(lab, callee, _with_peer("inbound", caller_id))
        target = out_hit.get("orig_dst", "?") if out_hit else f"{lab.vip(callee)}:{APP_PORT}"
        decision = in_hit.get("decision", "") if in_hit else ""
        hop_rows.append(
            (
                f"{caller} -> {callee}",
                target,
                out_hit.get("decision", "-") if out_hit else "(not logged)",
                in_hit.get("client", "-") if in_hit else "(not logged)",
                decision or "(not logged)",
            )
        )
        seen.hops.append(
            report.Hop(
                caller,
                callee,
                target,
                decision,
                caller_id,
                callee_id,
                out_hit.get("peer_id", "") if out_hit else "",
                in_hit.get("peer_id", "") if in_hit else "",
            )
        )
        rep.check(
            f"{caller} -> {callee}: both sidecars logged the other's identity",
            out_hit is not None and in_hit is not None,
        )
    print_table(("hop", "app dialed", "outbound decision", "inbound saw the client", "inbound decision"), hop_rows)
    print(f"  then each inbound sidecar handed the plaintext to its app from {APP_SOURCE}")
    example = next((line for line in lab.sidecar_log("ratings").splitlines() if "peer_id=" in line), "")
    if example:
        print(f"  a raw log line (ratings): {example.strip()[:300]}")
    for pod in plan.pods:
        if pod.spiffe_id is not None:
            seen.evidence_of(f"the {pod.spec.name} sidecar's log", lab.sidecar_log(pod.spec.name))

    section(f"the wire: tcpdump on {lab.veth('reviews')}, the node side of the reviews pod's veth")
    print(
        f"  productpage -> reviews shows the pod address {lab.ip('reviews')} (the node DNATed the VIP before this"
        f" veth); reviews -> ratings shows the ratings VIP {lab.vip('ratings')} (not yet DNATed). In TLS 1.3 only"
        " the hello messages are in the clear: certificates and data travel in encrypted records."
    )
    _show_capture(pcap_path.read_bytes(), marker, rep)
    raw = _tcpdump_read(pcap_path)
    if raw:
        print(f"  the same capture as tcpdump prints it (tcpdump -r {pcap_path.name} -n, first lines):")
        print("\n".join("    " + line for line in raw.splitlines()[:RAW_CAPTURE_LINES]))
        seen.evidence_of("the capture as tcpdump prints it (tcpdump -r -n -X)", _tcpdump_read(pcap_path, "-X"))

    section("a pod outside the mesh (legacy, plaintext)")
    strict = attempt(lambda: http_get(lab.pod_ns("legacy"), lab.ip("productpage"), APP_PORT, "/legacy", timeout=10))
    print(f"  legacy -> productpage:{APP_PORT} (STRICT): {_describe(strict)}")
    legacy_from = f"{lab.ip('legacy')}:"
    refusal = wait_record(
        lab, "productpage", lambda r: r.get("client", "").startswith(legacy_from) and r.get("decision") == "refuse"
    )
    if refusal is not None:
        print(f"    productpage's sidecar refused it: reason={refusal.get('reason')} ({refusal.get('detail', '')})")
    rep.check("STRICT refuses plaintext from outside the mesh", isinstance(strict, str) or strict[0] != 200)
    excluded = attempt(lambda: http_get(lab.pod_ns("legacy"), lab.ip("details"), EXCLUDED_PORT, "/excl", timeout=10))
    print(f"  legacy -> details:{EXCLUDED_PORT} (excluded from capture): {_describe(excluded)}")
    rep.check("an excluded port bypasses the mesh", not isinstance(excluded, str) and excluded[0] == 200)
    outside = attempt(lambda: http_get(lab.pod_ns("sleep"), lab.ip("legacy"), LEGACY_PORT, "/from-mesh", timeout=10))
    print(f"  sleep -> legacy:{LEGACY_PORT} (a destination outside the mesh, ALLOW_ANY): {_describe(outside)}")
    passthrough = wait_record(
        lab,
        "sleep",
        lambda r: r.get("orig_dst") == f"{lab.ip('legacy')}:{LEGACY_PORT}" and r.get("decision") == "passthrough",
    )
    if passthrough is not None:
        print("    sleep's sidecar passed it through as plain TCP: decision=passthrough (no identity to verify)")
    rep.check(
        "a mesh pod reaches a pod outside the mesh (passthrough)",
        not isinstance(outside, str) and outside[0] == 200 and passthrough is not None,
    )

    _show_metrics(lab, rep)
    show_identities(rep)
    show_rules(lab, rep, "productpage")

    if plan.topology.identity is not None:
        show_renewals(lab, rep)
    show_diagnostics(lab, rep, refused=refusal is not None)


RAW_CAPTURE_LINES = 6
DIAGNOSTIC_TIMEOUT = 60.0


def _field(line: str, key: str) -> str:
    """The value of `key=` in an app's key=value log line ('' when absent; a quoted value keeps its spaces)."""
    start = line.find(f" {key}=")
    if start < 0:
        start = 0 if line.startswith(f"{key}=") else -1
        if start < 0:
            return ""
    else:
        start += 1
    value = line[start + len(key) + 1 :]
    if value.startswith("'"):
        end = value.find("'", 1)
        return value[: end + 1] if end > 0 else value
    return value.split(" ", 1)[0]


def _answer_rows(body: bytes) -> list[tuple[str, str, str, str, str]]:
    """The nested JSON answer (each app's own view and its upstreams' answers) as one row per service."""
    rows: list[tuple[str, str, str, str, str]] = []

    def walk(node: object, caller: str, status: str) -> None:
        if not isinstance(node, dict):
            rows.append(("?", caller, status, "(not JSON)", "-"))
            return
        name = str(node.get("service", "?"))
        marker = "yes" if node.get("marker") else "no"
        rows.append((name, caller, status, str(node.get("peer", "?")), marker))
        upstreams = node.get("upstreams")
        for answer in upstreams.values() if isinstance(upstreams, dict) else ():
            if isinstance(answer, dict):
                walk(answer.get("body"), name, str(answer.get("status", "?")))

    try:
        walk(json.loads(body), "sleep", "200")
    except ValueError:
        rows.append(("?", "sleep", "?", "(not JSON)", "-"))
    return rows


def _tcpdump_read(path: Path, *flags: str) -> str:
    try:
        return netns.run(["tcpdump", "-r", str(path), "-n", "-tt", *flags], timeout=20)
    except LabError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# What the investigation looked at by hand in the pod: the processes (`ps aux`), who listens where (`netstat -anp`),
# the capture rules with their counters (`iptables -t nat -n -L -v`); read here from /proc and iptables.

_ROLES = {
    OUTBOUND_PORT: "the sidecar's outbound listener (the REDIRECT target of the OUTPUT rules)",
    INBOUND_PORT: "the sidecar's inbound listener (the REDIRECT target of the PREROUTING rules)",
    ADMIN_PORT: "the sidecar's admin endpoint (loopback only)",
    HEALTH_PORT: "the sidecar's /healthz/ready (never captured)",
    METRICS_PORT: "the sidecar's /stats/prometheus (never captured)",
}
_TCP_LISTEN = "0A"


def parse_proc_net_tcp(text: str) -> list[tuple[str, int, int, int]]:
    """The listening sockets of a /proc/net/tcp or tcp6 table: (address, port, uid, inode)."""
    found = []
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) < 10 or words[3] != _TCP_LISTEN:
            continue
        host, _, port = words[1].partition(":")
        raw = bytes.fromhex(host)
        # The kernel prints each 32-bit word of the address in host order (little-endian here).
        ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        address = str(ipaddress.ip_address(ordered))
        found.append((address, int(port, 16), int(words[7]), int(words[9])))
    return found


def _netns_inodes(lab: Lab) -> dict[int, str]:
    inodes = {}
    for pod in lab.plan.pods:
        with contextlib.suppress(OSError):
            inodes[os.stat(f"/run/netns/{lab.pod_ns(pod.spec.name)}").st_ino] = pod.spec.name
    return inodes


def _short_command(argv: list[str]) -> str:
    """argv for a person: paths as their last part (they are the lab's temp directory), at most 110 characters."""
    words = [word.rpartition("/")[2] if word.startswith("/") else word for word in argv]
    text = " ".join(words)
    return text if len(text) <= 110 else text[:107] + "..."


def pod_processes(lab: Lab) -> list[report.Process]:
    """Every process whose network namespace is one of the lab's pods (as `ps` would list them in the pod)."""
    inodes = _netns_inodes(lab)
    found = []
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        if not entry.name.isdigit():
            continue
        try:
            pod = inodes.get(os.stat(entry / "ns" / "net").st_ino)
            if pod is None:
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            uid_line = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        found.append(report.Process(pod, int(entry.name), int(uid_line.split()[1]), _short_command(argv[:-1] or argv)))
    order = [pod.spec.name for pod in lab.plan.pods]
    return sorted(found, key=lambda p: (order.index(p.pod), p.pid))


def _socket_owners(pids: Sequence[int]) -> dict[int, int]:
    """socket inode -> pid, from the processes' open files."""
    owners = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owners[int(target[8:-1])] = pid
    return owners


def pod_sockets(lab: Lab, processes: Sequence[report.Process]) -> list[report.Socket]:
    found = []
    commands = {p.pid: p.command for p in processes}
    for pod in lab.plan.pods:
        name = pod.spec.name
        pids = [p.pid for p in processes if p.pod == name]
        if not pids:
            continue
        owners = _socket_owners(pids)
        for table in ("tcp", "tcp6"):
            try:
                text = Path(f"/proc/{pids[0]}/net/{table}").read_text()
            except OSError:
                continue
            for address, port, uid, inode in parse_proc_net_tcp(text):
                pid = owners.get(inode)
                command = commands.get(pid, "?") if pid is not None else "?"
                app = " ".join(command.split()[3:6]) if "demoapps" in command else ""
                role = _ROLES.get(port, f"the app ({app})" if app else "an app")
                shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                found.append(report.Socket(name, shown, uid, pid, command.split(" ")[0] if pid else "?", role))
    order = [pod.spec.name for pod in lab.plan.pods]
    return sorted(found, key=lambda s: (order.index(s.pod), int(s.address.rpartition(":")[2])))


def show_processes(lab: Lab, rep: Report) -> None:
    section("processes in each pod (ps: the sidecar runs as uid 1337, the apps as another uid)")
    processes = pod_processes(lab)
    rep.seen.processes.extend(processes)
    print_table(*report.process_rows(processes))
    mesh = [pod.spec.name for pod in lab.plan.pods if pod.spiffe_id is not None]
    sidecars_ok = all(
        any(p.pod == pod and p.uid == PROXY_UID and " sidecar " in f" {p.command} " for p in processes) for pod in mesh
    )
    apps_ok = all(p.uid != PROXY_UID for p in processes if "demoapps" in p.command)
    rep.check(
        f"every mesh pod runs its sidecar as uid {PROXY_UID}, and no app runs as {PROXY_UID}", sidecars_ok and apps_ok
    )


def show_sockets(lab: Lab, rep: Report) -> None:
    section("who listens where in each pod (netstat -lntp: /proc/net/tcp{,6} with each socket's owner)")
    sockets = pod_sockets(lab, rep.seen.processes)
    rep.seen.sockets.extend(sockets)
    print_table(*report.socket_rows(sockets))
    problems = []
    for pod in lab.plan.pods:
        mine = [s for s in sockets if s.pod == pod.spec.name]
        ports = {int(s.address.rpartition(":")[2]) for s in mine}
        sidecar_uids = {s.uid for s in mine if int(s.address.rpartition(":")[2]) in SIDECAR_PORTS}
        app_ports = {port for app in pod.spec.apps for port in app.ports}
        if pod.spiffe_id is not None and (not ports >= SIDECAR_PORTS or sidecar_uids != {PROXY_UID}):
            problems.append(f"{pod.spec.name}: sidecar ports {sorted(SIDECAR_PORTS - ports)} missing or not uid 1337")
        if not app_ports <= ports:
            problems.append(f"{pod.spec.name}: app ports {sorted(app_ports - ports)} not listening")
    rep.check(
        f"each mesh pod's sidecar listens on {', '.join(map(str, sorted(SIDECAR_PORTS)))} as uid {PROXY_UID},"
        " each app on its ports",
        not problems,
        "; ".join(problems),
    )


def parse_nat_listing(text: str) -> list[report.Rule]:
    """The rules of `iptables -t nat -L -v -n`, each with the note of why it matters (if it carries the story)."""
    rules = []
    chain = ""
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "Chain":
            chain = words[1]
            continue
        if words[0] == "pkts" or len(words) < 9:
            continue
        packets = _count_number(words[0])
        if packets is None:
            continue
        target = words[2]
        # pkts bytes target prot opt in out source destination [match...]
        out_iface, source, destination = words[6], words[7], words[8]
        extra = " ".join(words[9:])
        match = " ".join(
            part
            for part in (
                f"out {out_iface}" if out_iface != "*" else "",
                f"from {source}" if source not in ("0.0.0.0/0", "::/0") else "",
                f"to {destination}" if destination not in ("0.0.0.0/0", "::/0") else "",
                extra,
            )
            if part
        )
        rules.append(report.Rule(chain, packets, target, match, _note(chain, target, source, out_iface, extra)))
    return rules


def _count_number(word: str) -> int | None:
    scale = {"K": 1000, "M": 1000**2, "G": 1000**3}.get(word[-1:], 1)
    digits = word[:-1] if scale > 1 else word
    return int(digits) * scale if digits.isdigit() else None


def _note(chain: str, target: str, source: str, out_iface: str, extra: str) -> str:
    if chain == "OUTPUT" and target == "MTLSMESH_OUTPUT":
        return "every TCP packet the pod sends enters the capture chain (Istio: ISTIO_OUTPUT)"
    if chain == "PREROUTING" and target == "MTLSMESH_INBOUND":
        return "every TCP packet arriving for the pod enters the inbound chain (Istio: ISTIO_INBOUND)"
    if target == "RETURN" and source == str(APP_SOURCE):
        return f"the inbound sidecar's dial to the app, from {APP_SOURCE}, is not captured again"
    if (
        target == "RETURN"
        and out_iface == "*"
        and f"owner UID match {PROXY_UID}" in extra
        and f"! owner UID match {PROXY_UID}" not in extra
    ):
        return f"the sidecar's own connections (uid {PROXY_UID}) leave uncaptured: no loop (Istio: bypass-envoy)"
    if target == "REDIRECT" and f"redir ports {OUTBOUND_PORT}" in extra:
        return f"an app's outbound connection goes to the outbound sidecar on {OUTBOUND_PORT}"
    if target == "REDIRECT" and f"redir ports {INBOUND_PORT}" in extra:
        return f"an inbound connection goes to the inbound sidecar on {INBOUND_PORT}"
    return ""


def show_rules(lab: Lab, rep: Report, pod: str) -> None:
    section(f"capture rules with packet counters: ip netns exec {lab.pod_ns(pod)} iptables -t nat -L -v -n")
    listing = lab.nat_rules(pod)
    rules = parse_nat_listing(listing)
    rep.seen.rules_pod = pod
    rep.seen.rules.extend(rules)
    rep.seen.evidence_of(f"iptables -t nat -L -v -n in {pod}", listing)
    print("  every rule of our chains; the ones that carry the story are marked *")
    rows = [(("* " if r.note else "  ") + r.chain, str(r.packets), r.target, r.match) for r in rules]
    print_table(("chain", "pkts", "target", "match"), rows)
    print("  * what they do:")
    for rule in rules:
        if rule.note:
            print(f"    {rule.chain} {rule.target} [{rule.packets} pkts]: {rule.note}")
    print("  our chains and Istio's:")
    print("\n".join("  " + line for line in report.table(*report.chain_rows())))
    rep.check("the capture chains counted packets", _chain_counted(listing, "MTLSMESH_OUTPUT", "MTLSMESH_INBOUND"))
    story = [rule for rule in rules if rule.note and rule.chain.startswith("MTLSMESH_")]
    counted = [rule for rule in story if rule.packets > 0]
    rep.check(
        f"the uid-{PROXY_UID} RETURN, the {APP_SOURCE} RETURN and both REDIRECTs counted packets",
        len(story) == 4 and counted == story,
        f"{len(counted)}/{len(story)} of them counted",
    )


# ---------------------------------------------------------------------------------------------------------------
# The operator's commands, run as a person would at the end: `mtlsmesh check` in each pod, `mtlsmesh explain` per hop.


def _mtlsmesh(*argv: str) -> tuple[int, str]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mtlsmesh", *argv],
            capture_output=True,
            text=True,
            timeout=DIAGNOSTIC_TIMEOUT,
            check=False,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return -1, f"no answer within {DIAGNOSTIC_TIMEOUT:g}s"
    return done.returncode, (done.stdout + done.stderr).rstrip()


def show_diagnostics(lab: Lab, rep: Report, *, refused: bool) -> None:
    mesh = [pod.spec.name for pod in lab.plan.pods if pod.spiffe_id is not None]
    section("mtlsmesh check in each mesh pod")
    for pod in mesh:
        status, text = _mtlsmesh("check", "--pod", lab.pod_ns(pod))
        print(f"  $ mtlsmesh check --pod {lab.pod_ns(pod)}")
        print("\n".join("    " + line for line in text.splitlines()))
        rep.seen.evidence_of(f"mtlsmesh check --pod {lab.pod_ns(pod)}", text)
        failed = [line for line in text.splitlines() if line.startswith("✗")]
        rep.check(f"mtlsmesh check passes in {pod}", status == 0 and not failed, "; ".join(failed)[:200])

    section("mtlsmesh explain for each hop (the same decision functions the sidecar runs, and the live sidecar)")
    for hop in rep.seen.hops:
        argv = ("explain", "--pod", lab.pod_ns(hop.caller), "--to", f"{lab.vip(hop.callee)}:{APP_PORT}", "--live")
        status, text = _mtlsmesh(*argv, "--json")
        print(f"  $ mtlsmesh {' '.join(argv)}")
        found = _first_json(text) if status == 0 else None
        if found is None:
            print(f"    {text.splitlines()[-1] if text else 'no output'}")
            rep.check(f"explain {hop.caller} -> {hop.callee} agrees with what happened", False, "no answer")
            continue
        rep.seen.evidence_of(f"mtlsmesh {' '.join(argv)} --json", text)
        live = found.get("live") or {}
        capture = found.get("capture") or {}
        recent = live.get("recent") or []
        print(
            f"    capture:   {capture.get('outcome')} to port {capture.get('port')} by {capture.get('deciding_rule')}"
        )
        print(f"    decision:  {found.get('decision')} ({found.get('reason')})")
        print(f"    expecting: {', '.join(found.get('identities') or []) or 'any workload of the trust domain'}")
        print(
            f"    live:      {live.get('decision')}, {'agrees' if live.get('agrees') else 'DISAGREES'};"
            f" last peers seen: {', '.join(sorted({str(r.get('peer_id')) for r in recent})) or 'none'}"
        )
        print(f"    verdict:   {found.get('verdict')}")
        expected = found.get("identities") or []
        ok = (
            found.get("captured") is True
            and found.get("decision") == "mtls" == hop.decision
            and (not expected or hop.destination_id in expected)
            and live.get("agrees") is True
            and any(r.get("peer_id") == hop.destination_id and r.get("decision") == "mtls" for r in recent)
        )
        rep.check(f"explain {hop.caller} -> {hop.callee} agrees with what happened (mTLS to {hop.callee})", ok)
    inbound = ("explain", "--pod", lab.pod_ns("productpage"), "--from", "plaintext", "--port", str(APP_PORT))
    status, text = _mtlsmesh(*inbound, "--json")
    found = _first_json(text) if status == 0 else None
    print(f"  $ mtlsmesh {' '.join(inbound)}   (legacy's call)")
    print(f"    verdict:   {found.get('verdict') if found else text[-200:]}")
    rep.check(
        "explain says STRICT refuses a plaintext caller, as productpage's sidecar did with legacy",
        found is not None and found.get("decision") == "refuse" and refused,
    )


def _first_json(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


def show_enrolments(lab: Lab, rep: Report) -> None:
    """Identity mode: what the CA service logged for each enrolment, checked against the mesh pods."""
    section(f"identities from the CA service ({lab.ca_log_path}), enrolled with each pod's service-account token")
    issued = [r for r in log_records(lab.ca_log()) if r.get("event") == "issued" and r.get("credential") == "token"]
    print_table(
        ("client", "SPIFFE ID issued", "serial"),
        [(r.get("client", "?"), r.get("spiffe_id", "?"), r.get("serial", "?")[:16]) for r in issued],
    )
    rep.seen.evidence_of("the CA service's log", lab.ca_log())
    expected = sorted(str(pod.spiffe_id) for pod in lab.plan.pods if pod.spiffe_id is not None)
    rep.check("each mesh pod enrolled once with its token", sorted(r.get("spiffe_id", "") for r in issued) == expected)
    key_files = list(lab.workdir.rglob("key.pem"))
    rep.check("no SVID key file exists for any pod", not key_files, ", ".join(str(path) for path in key_files))


def _taken_serials(lab: Lab, pod: str) -> list[str]:
    """The serials of the SVIDs the pod's sidecar took into use, enrolment first (from its log)."""
    events = ("svid_issued", "svid_renewed")
    return [r.get("serial", "?") for r in log_records(lab.sidecar_log(pod)) if r.get("event") in events]


def _serving_serial(lab: Lab, pod: str) -> str:
    """The serial of the SVID the sidecar presents now, from its admin endpoint (inside the pod, on loopback)."""
    try:
        status, body = http_get(lab.pod_ns(pod), "127.0.0.1", ADMIN_PORT, "/certs", timeout=5.0)
        serial = json.loads(body).get("serial") if status == 200 else None
    except (OSError, ValueError, AttributeError):
        return "?"
    return serial if isinstance(serial, str) else "?"


def show_renewals(lab: Lab, rep: Report) -> None:
    """Identity mode: every sidecar renews its SVID on its own (over mTLS, with the SVID it has), and new
    connections present the new one."""
    identity = lab.plan.topology.identity
    assert identity is not None
    mesh = [pod.spec.name for pod in lab.plan.pods if pod.spiffe_id is not None]
    section(
        f"rotation: SVIDs live {identity.ttl} here and are renewed at {identity.renew_fraction:g} of their life, "
        "by each sidecar on its own"
    )
    deadline = time.monotonic() + RENEWAL_TIMEOUT
    while time.monotonic() < deadline and not all(len(_taken_serials(lab, pod)) >= 2 for pod in mesh):
        time.sleep(0.2)
    renewed = [pod for pod in mesh if len(_taken_serials(lab, pod)) >= 2]
    serving = 0
    for pod in mesh:
        before = _taken_serials(lab, pod)
        current = _serving_serial(lab, pod)
        taken = _taken_serials(lab, pod)  # read again: a renewal may have come in between
        serving += current in (before[-1:] + taken[-1:])
        print(f"  {pod:<12} serials {' -> '.join(serial[:12] for serial in taken)}  (serving {current[:12]})")
    by_svid = [
        r for r in log_records(lab.ca_log()) if r.get("event") == "issued" and r.get("credential") == "svid"
    ]  # fmt: skip
    rep.check(
        "every sidecar renewed its SVID (a new serial), with its current SVID as credential",
        len(renewed) == len(mesh)
        and {r.get("spiffe_id") for r in by_svid} >= {str(lab.plan.pod(pod).spiffe_id) for pod in mesh},
        f"{len(renewed)}/{len(mesh)} renewed within {RENEWAL_TIMEOUT:g}s",
    )
    rep.check("each sidecar serves its newest SVID (admin /certs)", serving == len(mesh), f"{serving}/{len(mesh)}")
    answer = attempt(
        lambda: http_get(lab.pod_ns("sleep"), lab.vip("productpage"), APP_PORT, "/after-renewal", timeout=15.0)
    )
    ok = not isinstance(answer, str) and answer[0] == 200 and _nested_ok(answer[1])
    print(f"  a request after the renewals, through all four services: {_describe(answer)[:40]}")
    rep.check("the mesh answers with the renewed SVIDs", ok)


def _with_peer(direction: str, peer_id: str) -> Callable[[dict[str, str]], bool]:
    return lambda record: record.get("dir") == direction and record.get("peer_id") == peer_id


def wait_record(
    lab: Lab, pod: str, predicate: Callable[[dict[str, str]], bool], timeout: float = 3.0
) -> dict[str, str] | None:
    """The first record in the pod's sidecar log matching `predicate`; a connection's line is written as it ends,
    which can be just after its client saw the reset."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((r for r in log_records(lab.sidecar_log(pod)) if predicate(r)), None)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _nested_ok(body: bytes) -> bool:
    try:
        data = json.loads(body)
        upstreams = data["upstreams"]
        ratings = upstreams["reviews"]["body"]["upstreams"]["ratings"]
        return bool(upstreams["details"]["status"] == 200 and ratings["status"] == 200)
    except (ValueError, KeyError, TypeError):
        return False


def _scrape(lab: Lab, pod: str) -> list[tuple[str, dict[str, str], float]]:
    """The pod's /stats/prometheus, fetched from the node as Prometheus would and read by prometheus_client."""
    status, body = http_get(lab.node_ns, lab.ip(pod), METRICS_PORT, "/stats/prometheus", timeout=10)
    if status != 200:
        return []
    families = text_string_to_metric_families(body.decode())
    return [(sample.name, sample.labels, sample.value) for family in families for sample in family.samples]


def _count(samples: list[tuple[str, dict[str, str], float]], name: str, labels: dict[str, str]) -> float:
    return sum(value for sample, got, value in samples if sample == name and labels.items() <= got.items())


def _show_metrics(lab: Lab, rep: Report) -> None:
    section(
        f"metrics by identity: mtlsmesh_tcp_connections_opened_total from GET http://<pod>:{METRICS_PORT}/stats/prometheus"
    )
    scrapes = {pod.spec.name: _scrape(lab, pod.spec.name) for pod in lab.plan.pods if pod.spiffe_id is not None}
    every_hop = True
    rows = []
    for index, (caller, callee) in enumerate(HOPS):
        identity = {
            "source_principal": str(lab.plan.pod(caller).spiffe_id),
            "destination_principal": str(lab.plan.pod(callee).spiffe_id),
            "destination_port": str(APP_PORT),
            "security_policy": "mutual_tls",
        }
        counts = []
        for pod, direction in ((caller, "outbound"), (callee, "inbound")):
            opened = _count(scrapes[pod], "mtlsmesh_tcp_connections_opened_total", {**identity, "direction": direction})
            every_hop &= opened >= 1
            counts.append(opened)
            rows.append(
                (
                    pod,
                    direction,
                    identity["source_principal"],
                    identity["destination_principal"],
                    str(APP_PORT),
                    "mutual_tls",
                    f"{opened:g}",
                )
            )
        hops = rep.seen.hops
        if index < len(hops) and (hops[index].caller, hops[index].callee) == (caller, callee):
            hops[index] = dataclasses.replace(hops[index], metrics_out=counts[0], metrics_in=counts[1])
    plaintext = {"direction": "inbound", "security_policy": "none", "source_principal": "unknown", "reason": "not_mesh"}
    refused = _count(scrapes["productpage"], "mtlsmesh_tcp_connections_closed_total", plaintext)
    rows.append(("productpage", "inbound", "unknown", "unknown", str(APP_PORT), "none", f"closed {refused:g}"))
    print_table(
        ("sidecar", "direction", "source_principal", "destination_principal", "port", "security_policy", "opened"), rows
    )
    print("  (the last line: legacy's plaintext call, refused with reason=not_mesh)")
    rep.check("the metrics name both principals and mutual_tls for every hop, on both sidecars", every_hop)
    rep.check("the plaintext call from outside the mesh is counted with security_policy none", refused >= 1)


def show_identities(rep: Report) -> None:
    section("identities on each hop: as both sidecars logged them and as their metrics label them")
    print_table(*report.identity_rows(rep.seen.hops))


def _describe(result: tuple[int, bytes] | str) -> str:
    return result if isinstance(result, str) else f"HTTP {result[0]} {result[1][:80].decode(errors='replace')}"


def _chain_counted(rules: str, *chains: str) -> bool:
    # `-L -v` prints each chain's references in its header and each rule's packet count first; the jumps from
    # PREROUTING/OUTPUT into our chains count every packet that entered them.
    seen: set[str] = set()
    for line in rules.splitlines():
        words = line.split()
        if len(words) >= 3 and words[2] in chains and words[0].isdigit() and int(words[0]) > 0:
            seen.add(words[2])
    return seen == set(chains)


def _show_capture(data: bytes, marker: str, rep: Report) -> None:
    streams = pcap.reassemble(pcap.parse_pcap(data))
    mesh_flows = pcap.flows_on_port(streams, [APP_PORT])
    app_records = 0
    all_tls = True
    example = ""
    for flow, payload in sorted(mesh_flows.items(), key=lambda item: str(item[0])):
        scan = pcap.tls_records(payload)
        all_tls = all_tls and scan.complete
        kinds: dict[int, int] = {}
        for record in scan.records:
            kinds[record.content_type] = kinds.get(record.content_type, 0) + 1
        app_records += sum(1 for r in scan.records if (r.content_type, r.version) == (0x17, 0x0303))
        summary = ", ".join(f"{_TLS_NAMES.get(kind, kind)} x{count}" for kind, count in sorted(kinds.items()))
        rep.seen.flows.append(report.Flow(str(flow), len(payload), summary))
        if not example and kinds.get(0x17):
            offset = _first_app_record(payload)
            example = payload[offset : offset + 16].hex(" ")
    print_table(*report.flow_rows(rep.seen.flows))
    if example:
        print(f"  an application-data record on the wire begins: {example}  (17 = application data, 03 03 = TLS)")
    leaked = pcap.flows_with(streams, marker.encode())
    rep.check("the wire carried TLS records only", bool(mesh_flows) and all_tls, f"{len(mesh_flows)} flows")
    rep.check("application data went as TLS records (0x17, 0x0303)", app_records > 0, f"{app_records} records")
    shown = ", ".join(str(flow) for flow in leaked[:3]) + (f" and {len(leaked) - 3} more" if len(leaked) > 3 else "")
    rep.check("the plaintext marker never appeared on the wire", not leaked, f"found in {shown}" if leaked else "")


_TLS_NAMES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


def _first_app_record(payload: bytes) -> int:
    offset = 0
    while offset + 5 <= len(payload):
        if payload[offset] == 0x17:
            return offset
        offset += 5 + int.from_bytes(payload[offset + 3 : offset + 5], "big")
    return 0


def wait_for_interrupt(lab: Lab) -> None:
    section("the lab stays up (--keep); Ctrl-C tears it down")
    print(f"  enter a pod:     ip netns exec {lab.pod_ns('sleep')} bash")
    print(f"  call the mesh:   ip netns exec {lab.pod_ns('sleep')} curl -s http://{lab.vip('productpage')}:{APP_PORT}/")
    print(f"  capture rules:   ip netns exec {lab.pod_ns('productpage')} iptables -t nat -L -v -n")
    print(f"  watch the wire:  ip netns exec {lab.node_ns} tcpdump -i {lab.veth('reviews')} -n -X")
    print(f"  sidecar logs:    {lab.workdir}/<pod>/sidecar.log, apps: {lab.workdir}/<pod>/app-<name>.log")
    print("  if this process gets killed: python -m mtlsmesh demo --cleanup-stale")
    sys.stdout.flush()
    # A shell without job control starts background commands with SIGINT ignored; Ctrl-C must still end the wait.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        signal.pause()


def run(args: argparse.Namespace) -> int:
    if args.cleanup_stale:
        for prefix in netns.stale_prefixes(DEFAULT_TAG) + netns.stale_prefixes(DEFAULT_TAG + "e"):
            for name in netns.cleanup_stale(prefix):
                print(f"removed {name}")
        return 0
    if args.requests < 1 or args.requests > 100:
        raise LabError("--requests: expected 1 to 100")
    if shutil.which("tcpdump") is None:  # checked before building anything: the wire is half the evidence
        raise LabError("tcpdump is missing: apt-get install -y tcpdump")
    page = Path(args.report) if getattr(args, "report", None) else None
    if page is not None and not page.parent.is_dir():  # checked before building anything too
        raise LabError(f"--report: {page.parent} is not a directory")
    rep = Report()
    print(f"building the lab: node namespace, bridge, pods, capture rules, SVIDs, sidecars (uid {PROXY_UID}), apps ...")
    started = time.monotonic()
    with Lab(bookinfo(identity=not args.files)) as lab:
        print(f"  ready in {time.monotonic() - started:.1f}s (prefix {lab.prefix})")
        run_demo(lab, rep, args.requests)
        section("summary")
        failed = [check for check in rep.checks if not check.ok]
        print(f"  {len(rep.checks) - len(failed)}/{len(rep.checks)} checks passed")
        for check in failed:
            print(f"  FAILED: {check.name} {check.detail}")
        if page is not None:
            write_report(page, rep, "identity mode" if not args.files else "SVID files")
        print("PASS" if rep.passed else "FAIL")
        sys.stdout.flush()
        if args.keep:
            try:
                wait_for_interrupt(lab)
            except KeyboardInterrupt:
                print("\ntearing down ...")
    return 0 if rep.passed else 1


def write_report(page: Path, rep: Report, mode: str) -> None:
    seen = rep.seen
    data = report.DemoReport(
        title=f"mtlsmesh demo: bookinfo in the pod lab ({mode})",
        pods=tuple(seen.pods),
        hops=tuple(seen.hops),
        flows=tuple(seen.flows),
        sockets=tuple(seen.sockets),
        processes=tuple(seen.processes),
        rules_pod=seen.rules_pod,
        rules=tuple(seen.rules),
        checks=tuple(report.CheckLine(c.name, c.ok, c.detail) for c in rep.checks),
        evidence=tuple(seen.evidence),
    )
    try:
        page.write_text(report.render_html(data), encoding="utf-8")
    except OSError as exc:
        raise LabError(f"--report: cannot write {page}: {exc.strerror or exc}") from None
    print(f"  the report: {page} (one self-contained HTML page)")

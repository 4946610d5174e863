"""The demo behind `mtlsmesh demo`: the bookinfo mesh in a pod lab, traffic through it, and the evidence.

Topology: productpage -> details, productpage -> reviews -> ratings, each behind a Service VIP; a `sleep` pod in
the mesh sends the requests; a `legacy` pod outside the mesh (no capture, no sidecar) shows STRICT refusing it,
an excluded port (details:9090) letting it through, and a mesh pod reaching its app as plain TCP (ALLOW_ANY).
The demo prints what a person investigating wants to see and checks it: the apps logged plaintext, the sidecars
logged the peer identity of each hop, their metrics name both principals of each hop under mutual TLS (and
`security_policy="none"` for legacy's plaintext call), the wire (a tcpdump on the node-side veth of the reviews
pod) carried only TLS records and never the plaintext marker, and the capture rules' packet counters moved. It ends
with PASS or FAIL and the matching exit status (0 or 1; 2 when the lab cannot be built).

The mesh runs in identity mode: the lab plays the cluster, `mtlsmesh ca serve` runs on the node, and each sidecar
enrols with it using its pod's service-account token (no SVID file exists); the demo shows and checks each pod's
enrolment and, since the demo's SVIDs live `DEMO_TTL` and are renewed at `DEMO_RENEW_FRACTION` of that, a renewal
of every sidecar (a new serial, taken into use by new connections) while it runs. `--files` runs the same mesh
with SVID files from the lab's CA instead (the offline mode, no CA service). `--keep` leaves the lab running and
prints how to step into a pod; Ctrl-C tears it down.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from mtlsmesh.conventions import ADMIN_PORT, APP_SOURCE, METRICS_PORT, PROXY_UID
from mtlsmesh.errors import LabError
from mtlsmesh.lab import netns, pcap
from mtlsmesh.lab.demoapps import MARKER_HEADER
from mtlsmesh.lab.pods import DEFAULT_TAG, Lab, http_get, log_records
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


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

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


def run_demo(lab: Lab, report: Report, requests: int) -> None:
    plan = lab.plan
    section("pods (network namespaces on one bridge, node namespace " + lab.node_ns + ")")
    for pod in plan.pods:
        identity = str(pod.spiffe_id) if pod.spiffe_id else "outside the mesh (no capture, no sidecar)"
        print(f"  {pod.spec.name:<12} {pod.ip!s:<14} ns={lab.pod_ns(pod.spec.name):<22} {identity}")
    for service in plan.services:
        print(f"  service {service.spec.name:<12} {service.vip}:{service.spec.port} -> {service.target_ip}")

    if plan.topology.identity is not None:
        show_enrolments(lab, report)

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
    for answer in answers:
        if isinstance(answer, str):
            print(f"  request failed: {answer}")
            continue
        status, body = answer
        nested = _nested_ok(body)
        good += status == 200 and nested
        print(f"  HTTP {status}, details+reviews+ratings answered: {nested}")
    if answers and not isinstance(answers[0], str):
        print("  first answer: " + answers[0][1].decode(errors="replace")[:400])
    report.check("every request answered through all four services", good == requests, f"{good}/{requests}")

    section(f"what the apps received (plaintext, from {APP_SOURCE} = delivered by their inbound sidecar)")
    for name in SERVICES:
        lines = [line for line in lab.app_log(name, name).splitlines() if marker in line]
        for line in lines[:2]:
            print(f"  {line}")
        report.check(
            f"{name} logged the plaintext marker, delivered by its sidecar",
            len(lines) >= requests and all(f"peer={APP_SOURCE}:" in line for line in lines),
            f"{len(lines)} requests",
        )

    section("which sidecar handled each hop, and the identity presented (from the sidecars' key=value logs)")
    hops = [("sleep", "productpage"), ("productpage", "details"), ("productpage", "reviews"), ("reviews", "ratings")]
    for caller, callee in hops:
        caller_id, callee_id = str(plan.pod(caller).spiffe_id), str(plan.pod(callee).spiffe_id)
        out_hit = wait_record(lab, caller, _with_peer("outbound", callee_id))
        in_hit = wait_record(lab, callee, _with_peer("inbound", caller_id))
        print(f"  {caller} -> {callee}")
        if out_hit is not None:
            print(f"    {caller}'s sidecar (outbound) dialed {out_hit.get('orig_dst')}, server presented {callee_id}")
        if in_hit is not None:
            print(
                f"    {callee}'s sidecar (inbound) accepted {in_hit.get('client')} presenting {caller_id}"
                f" ({in_hit.get('decision', '?')}), then handed plaintext to the app from {APP_SOURCE}"
            )
        report.check(
            f"{caller} -> {callee}: both sidecars logged the other's identity",
            out_hit is not None and in_hit is not None,
        )
    example = next((line for line in lab.sidecar_log("ratings").splitlines() if "peer_id=" in line), "")
    if example:
        print(f"  a raw log line (ratings): {example.strip()[:300]}")

    section(f"the wire: tcpdump on {lab.veth('reviews')}, the node side of the reviews pod's veth")
    print(
        f"  productpage -> reviews shows the pod address {lab.ip('reviews')} (the node DNATed the VIP before this"
        f" veth); reviews -> ratings shows the ratings VIP {lab.vip('ratings')} (not yet DNATed). In TLS 1.3 only"
        " the hello messages are in the clear: certificates and data travel in encrypted records."
    )
    _show_capture(pcap_path.read_bytes(), marker, report)

    section("a pod outside the mesh (legacy, plaintext)")
    strict = attempt(lambda: http_get(lab.pod_ns("legacy"), lab.ip("productpage"), APP_PORT, "/legacy", timeout=10))
    print(f"  legacy -> productpage:{APP_PORT} (STRICT): {_describe(strict)}")
    legacy_from = f"{lab.ip('legacy')}:"
    refusal = wait_record(
        lab, "productpage", lambda r: r.get("client", "").startswith(legacy_from) and r.get("decision") == "refuse"
    )
    if refusal is not None:
        print(f"    productpage's sidecar refused it: reason={refusal.get('reason')} ({refusal.get('detail', '')})")
    report.check("STRICT refuses plaintext from outside the mesh", isinstance(strict, str) or strict[0] != 200)
    excluded = attempt(lambda: http_get(lab.pod_ns("legacy"), lab.ip("details"), EXCLUDED_PORT, "/excl", timeout=10))
    print(f"  legacy -> details:{EXCLUDED_PORT} (excluded from capture): {_describe(excluded)}")
    report.check("an excluded port bypasses the mesh", not isinstance(excluded, str) and excluded[0] == 200)
    outside = attempt(lambda: http_get(lab.pod_ns("sleep"), lab.ip("legacy"), LEGACY_PORT, "/from-mesh", timeout=10))
    print(f"  sleep -> legacy:{LEGACY_PORT} (a destination outside the mesh, ALLOW_ANY): {_describe(outside)}")
    passthrough = wait_record(
        lab,
        "sleep",
        lambda r: r.get("orig_dst") == f"{lab.ip('legacy')}:{LEGACY_PORT}" and r.get("decision") == "passthrough",
    )
    if passthrough is not None:
        print("    sleep's sidecar passed it through as plain TCP: decision=passthrough (no identity to verify)")
    report.check(
        "a mesh pod reaches a pod outside the mesh (passthrough)",
        not isinstance(outside, str) and outside[0] == 200 and passthrough is not None,
    )

    _show_metrics(lab, report)

    section(
        "capture rules with packet counters: ip netns exec " + lab.pod_ns("productpage") + " iptables -t nat -L -v -n"
    )
    rules = lab.nat_rules("productpage")
    print("\n".join("  " + line for line in rules.splitlines()))
    report.check("the capture chains counted packets", _chain_counted(rules, "MTLSMESH_OUTPUT", "MTLSMESH_INBOUND"))

    if plan.topology.identity is not None:
        show_renewals(lab, report)


def show_enrolments(lab: Lab, report: Report) -> None:
    """Identity mode: what the CA service logged for each enrolment, checked against the mesh pods."""
    section(f"identities from the CA service ({lab.ca_log_path}), enrolled with each pod's service-account token")
    issued = [r for r in log_records(lab.ca_log()) if r.get("event") == "issued" and r.get("credential") == "token"]
    for record in issued:
        print(f"  {record.get('client', '?'):<20} {record.get('spiffe_id')} serial={record.get('serial', '?')[:16]}")
    expected = sorted(str(pod.spiffe_id) for pod in lab.plan.pods if pod.spiffe_id is not None)
    report.check(
        "each mesh pod enrolled once with its token", sorted(r.get("spiffe_id", "") for r in issued) == expected
    )
    key_files = list(lab.workdir.rglob("key.pem"))
    report.check("no SVID key file exists for any pod", not key_files, ", ".join(str(path) for path in key_files))


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


def show_renewals(lab: Lab, report: Report) -> None:
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
    report.check(
        "every sidecar renewed its SVID (a new serial), with its current SVID as credential",
        len(renewed) == len(mesh)
        and {r.get("spiffe_id") for r in by_svid} >= {str(lab.plan.pod(pod).spiffe_id) for pod in mesh},
        f"{len(renewed)}/{len(mesh)} renewed within {RENEWAL_TIMEOUT:g}s",
    )
    report.check("each sidecar serves its newest SVID (admin /certs)", serving == len(mesh), f"{serving}/{len(mesh)}")
    answer = attempt(
        lambda: http_get(lab.pod_ns("sleep"), lab.vip("productpage"), APP_PORT, "/after-renewal", timeout=15.0)
    )
    ok = not isinstance(answer, str) and answer[0] == 200 and _nested_ok(answer[1])
    print(f"  a request after the renewals, through all four services: {_describe(answer)[:40]}")
    report.check("the mesh answers with the renewed SVIDs", ok)


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


def _show_metrics(lab: Lab, report: Report) -> None:
    section(
        f"metrics by identity: mtlsmesh_tcp_connections_*_total from GET http://<pod>:{METRICS_PORT}/stats/prometheus"
    )
    scrapes = {pod.spec.name: _scrape(lab, pod.spec.name) for pod in lab.plan.pods if pod.spiffe_id is not None}
    every_hop = True
    for caller, callee in HOPS:
        identity = {
            "source_principal": str(lab.plan.pod(caller).spiffe_id),
            "destination_principal": str(lab.plan.pod(callee).spiffe_id),
            "destination_port": str(APP_PORT),
            "security_policy": "mutual_tls",
        }
        for pod, direction in ((caller, "outbound"), (callee, "inbound")):
            opened = _count(scrapes[pod], "mtlsmesh_tcp_connections_opened_total", {**identity, "direction": direction})
            every_hop &= opened >= 1
            print(
                f"  {pod:<12} {direction:<8} {identity['source_principal']} -> {identity['destination_principal']}"
                f" port={APP_PORT} security_policy=mutual_tls opened={opened:g}"
            )
    report.check("the metrics name both principals and mutual_tls for every hop, on both sidecars", every_hop)
    plaintext = {"direction": "inbound", "security_policy": "none", "source_principal": "unknown", "reason": "not_mesh"}
    refused = _count(scrapes["productpage"], "mtlsmesh_tcp_connections_closed_total", plaintext)
    print(
        f"  productpage  inbound  unknown -> unknown port={APP_PORT} security_policy=none reason=not_mesh"
        f" closed={refused:g} (legacy's plaintext call, refused)"
    )
    report.check("the plaintext call from outside the mesh is counted with security_policy none", refused >= 1)


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


def _show_capture(data: bytes, marker: str, report: Report) -> None:
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
        print(f"  {flow}: {len(payload)} bytes, TLS records: {summary or 'none'}")
        if not example and kinds.get(0x17):
            offset = _first_app_record(payload)
            example = payload[offset : offset + 16].hex(" ")
    if example:
        print(f"  an application-data record on the wire begins: {example}  (17 = application data, 03 03 = TLS)")
    leaked = pcap.flows_with(streams, marker.encode())
    report.check("the wire carried TLS records only", bool(mesh_flows) and all_tls, f"{len(mesh_flows)} flows")
    report.check("application data went as TLS records (0x17, 0x0303)", app_records > 0, f"{app_records} records")
    shown = ", ".join(str(flow) for flow in leaked[:3]) + (f" and {len(leaked) - 3} more" if len(leaked) > 3 else "")
    report.check("the plaintext marker never appeared on the wire", not leaked, f"found in {shown}" if leaked else "")


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
    report = Report()
    print(f"building the lab: node namespace, bridge, pods, capture rules, SVIDs, sidecars (uid {PROXY_UID}), apps ...")
    started = time.monotonic()
    with Lab(bookinfo(identity=not args.files)) as lab:
        print(f"  ready in {time.monotonic() - started:.1f}s (prefix {lab.prefix})")
        run_demo(lab, report, args.requests)
        section("summary")
        failed = [check for check in report.checks if not check.ok]
        print(f"  {len(report.checks) - len(failed)}/{len(report.checks)} checks passed")
        for check in failed:
            print(f"  FAILED: {check.name} {check.detail}")
        print("PASS" if report.passed else "FAIL")
        sys.stdout.flush()
        if args.keep:
            try:
                wait_for_interrupt(lab)
            except KeyboardInterrupt:
                print("\ntearing down ...")
    return 0 if report.passed else 1

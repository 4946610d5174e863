"""`mtlsmesh check`: is this pod's part of the mesh working? One line per check, a hint for each that fails.

Run in the pod (root, for the capture rules), or in a lab pod with `--pod NAME`. The checks, in order:

- config: the sidecar's config, from its admin endpoint's `/config_dump` (or `--config FILE`);
- capture: the rules of this network namespace send an app's outbound connection to the outbound listener and an
  inbound one to the inbound listener, and leave the health port alone (walked by `mtlsmesh.explain`);
- listening: every listener of the config is bound in this namespace, by uid 1337 (`/proc/net/tcp{,6}`): a
  sidecar under another uid would have its own connections captured again;
- health: `GET /healthz/ready` answers 200;
- svid: the SVID the sidecar serves (admin `/certs`) is valid now and more than `log.svid_warning` of its life is
  left; in file mode the files are read too, and must be what the sidecar serves;
- chain: in file mode, OpenSSL verifies the SVID files' chain against the bundle file;
- bundle: the bundle holds the root that issued the chain (the last certificate's issuer);
- ca: in identity mode, the CA service answers `GET /v1/bundle` over TLS as the expected SPIFFE ID;
- clock: the skew between this clock and the CA's `Date` header (when the CA answered).

Exit status 0 when every check passed (a check that does not apply is skipped, not failed), 1 when any failed, 2
when the command itself could not run. `--json` prints a list of {check, ok, detail, hint}.
"""

from __future__ import annotations

import argparse
import email.utils
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from mtlsmesh import durations, explain, pem, svid
from mtlsmesh.capture import Family
from mtlsmesh.capture_plan import SavedTable
from mtlsmesh.cli import output, pod
from mtlsmesh.cli.ca import verify_chain
from mtlsmesh.config import Config, ListenAddr, load_config, parse_config
from mtlsmesh.conventions import PROXY_UID
from mtlsmesh.errors import CertificateError, MeshError

EXIT_FAILED = 1
CA_TIMEOUT = 5.0
MAX_SKEW = 5.0  # seconds between our clock and the CA's before it is a problem (tokens have 30 s of leeway)
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
SAMPLE_DST = ipaddress.ip_address("198.19.255.254")  # an address no default exclusion names


@dataclass(slots=True)
class Check:
    check: str
    ok: bool | None  # None: does not apply here (skipped)
    detail: str
    hint: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "-"}[self.ok]
        text = f"{mark} {self.check}: {self.detail}"
        return f"{text}\n    hint: {self.hint}" if self.ok is False and self.hint else text


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    parser = subparsers.add_parser(
        "check", help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help="the sidecar's config file (default: from --admin)")
    parser.add_argument("--rules", metavar="FILE", help="check an iptables-save dump instead of this namespace's")
    pod.add_pod_flags(parser)
    output.add_json_flag(parser)
    parser.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------------------------
# The checks, each a function of what it needs; every one answers a Check and never raises.


def check_config(args: argparse.Namespace) -> tuple[Check, Config | None]:
    if args.config:
        try:
            cfg = load_config(args.config)
        except MeshError as exc:
            return Check("config", False, str(exc), "fix the file"), None
        return Check("config", True, f"from {args.config}"), cfg
    address = pod.admin_address(args.admin)
    try:
        cfg = parse_config(pod.admin_json(address, "/config_dump"), f"{address}/config_dump")
    except MeshError as exc:
        hint = "is the sidecar running in this pod? (or give --config FILE)"
        return Check("config", False, str(exc), hint), None
    mode = "identity mode" if cfg.identity is not None else "file mode"
    return Check("config", True, f"from the sidecar ({address}/config_dump), {mode}"), cfg


def check_capture(cfg: Config, tables: dict[str, SavedTable] | None, error: str) -> Check:
    hint = "apply the capture rules again: the init step, `mtlsmesh iptables` with the pod's flags"
    if tables is None:
        return Check("capture", False, error, "read the rules with NET_ADMIN in the pod's namespace, or give --rules")
    problems: list[str] = []
    dst, dport = SAMPLE_DST, 80
    for destination in cfg.outbound.destinations:
        if destination.cidrs:
            network = destination.cidrs[0]
            dst = network.network_address + (1 if network.num_addresses > 2 else 0)
            dport = min(destination.ports) if destination.ports else 80
            break
    if cfg.outbound.enabled:
        out = explain.capture_walk(tables, explain.Packet(dst, dport, out_iface="eth0"), inbound=False)
        if out.outcome != explain.CAPTURED or out.port != cfg.outbound.listen.port:
            problems.append(f"outbound to {dst}:{dport} is not sent to {cfg.outbound.listen.port}: {out.deciding}")
    inbound_ports = sorted(cfg.inbound.ports) or [80]
    if cfg.inbound.enabled:
        for port in inbound_ports[:3]:
            walk = explain.capture_walk(tables, explain.Packet(SAMPLE_DST, port, in_iface="eth0"), inbound=True)
            if walk.outcome != explain.CAPTURED or walk.port != cfg.inbound.listen.port:
                problems.append(f"inbound to port {port} is not sent to {cfg.inbound.listen.port}: {walk.deciding}")
    if cfg.health_listen is not None:
        port = cfg.health_listen.port
        walk = explain.capture_walk(tables, explain.Packet(SAMPLE_DST, port, in_iface="eth0"), inbound=True)
        if walk.outcome == explain.CAPTURED:
            problems.append(f"the health port {port} is captured: the kubelet's probes would hit the sidecar's mTLS")
    if problems:
        return Check("capture", False, "; ".join(problems), hint)
    shown = ", ".join(str(port) for port in inbound_ports[:3])
    return Check(
        "capture",
        True,
        f"outbound {dst}:{dport} → {cfg.outbound.listen.port}, inbound port {shown} → {cfg.inbound.listen.port}, "
        "health port left alone",
    )


def listening_sockets(root: Path = Path("/proc/net")) -> dict[int, set[int]]:
    """port → uids of the sockets listening on it in this network namespace (`/proc/net/tcp` and `tcp6`)."""
    found: dict[int, set[int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (root / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[3] == _LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                found.setdefault(port, set()).add(int(fields[7]))
    return found


def sidecar_listeners(cfg: Config) -> list[tuple[str, ListenAddr]]:
    out = [
        ("outbound", cfg.outbound.listen if cfg.outbound.enabled else None),
        ("inbound", cfg.inbound.listen if cfg.inbound.enabled else None),
        ("admin", cfg.admin_listen),
        ("health", cfg.health_listen),
        ("metrics", cfg.metrics_listen),
        *((f"explicit {x.name}", x.listen) for x in cfg.explicit),
    ]
    return [(name, addr) for name, addr in out if addr is not None and addr.port != 0]


def check_listening(cfg: Config, sockets: dict[int, set[int]]) -> Check:
    problems, shown = [], []
    for name, addr in sidecar_listeners(cfg):
        uids = sockets.get(addr.port)
        if not uids:
            problems.append(f"{name} ({addr.port}) is not listening")
        elif PROXY_UID not in uids:
            problems.append(f"{name} ({addr.port}) is bound by uid {','.join(map(str, sorted(uids)))}, not {PROXY_UID}")
        else:
            shown.append(str(addr.port))
    if problems:
        hint = f"start the sidecar as uid {PROXY_UID} (the capture rules exempt only that uid's connections)"
        return Check("listening", False, "; ".join(problems), hint)
    return Check("listening", True, f"ports {', '.join(shown)} bound by uid {PROXY_UID}")


def check_health(cfg: Config) -> Check:
    if cfg.health_listen is None:
        return Check("health", None, "no health listener configured")
    host = cfg.health_listen.host
    address = ListenAddr("127.0.0.1" if host in ("0.0.0.0", "::") else host, cfg.health_listen.port)
    try:
        status, body = pod.admin_get(address, "/healthz/ready")
    except MeshError as exc:
        return Check("health", False, str(exc), "is the sidecar running? see its log")
    text = body.decode(errors="replace").strip()
    if status == 200:
        return Check("health", True, f"GET /healthz/ready on {address}: 200 {text}")
    return Check("health", False, f"GET /healthz/ready on {address}: {status} {text}", _health_hint(text))


def _health_hint(text: str) -> str:
    if "expired" in text:
        return "the SVID expired: renew it (file mode: write fresh files; identity mode: is the CA reachable?)"
    if "draining" in text:
        return "the sidecar is shutting down"
    return "the sidecar has not bound everything yet, or failed to: see its log"


def check_svid(cfg: Config, served: dict[str, Any] | None, files: tuple[x509.Certificate, ...] | None) -> Check:
    now = datetime.now(UTC)
    if served is None and files is None:
        return Check("svid", False, "neither the admin's /certs nor SVID files could be read", "see the checks above")
    if files:
        not_before, not_after = files[0].not_valid_before_utc, files[0].not_valid_after_utc
        where = "the SVID files"
    else:
        assert served is not None
        not_before = datetime.fromisoformat(str(served["not_before"]).replace("Z", "+00:00"))
        not_after = datetime.fromisoformat(str(served["not_after"]).replace("Z", "+00:00"))
        where = "the sidecar's SVID"
    left = (not_after - now).total_seconds()
    share = left / max(1.0, (not_after - not_before).total_seconds())
    renew = (
        "renew it: `mtlsmesh ca issue` and replace the files"
        if cfg.identity is None
        else "renewal is failing: see the sidecar's log and the CA check"
    )
    if now < not_before:
        return Check("svid", False, f"{where} is not valid before {durations.format_time(not_before)}", "check clocks")
    if left <= 0:
        return Check("svid", False, f"{where} expired at {durations.format_time(not_after)}", renew)
    detail = f"{where}: valid until {durations.format_time(not_after)}, {durations.format_duration(left)} left"
    if files and served is not None and str(served.get("not_after")) != durations.format_time(not_after):
        hint = "the sidecar reloads its files every few seconds: if this stays, see its log (event=reload_refused)"
        return Check("svid", False, f"{detail}, but the sidecar serves another (until {served['not_after']})", hint)
    if share < cfg.svid_warning:
        return Check("svid", False, f"{detail}: less than {cfg.svid_warning:.0%} of its life", renew)
    spiffe_id = served["spiffe_id"] if served is not None else svid.leaf_spiffe_id(files[0]) if files else "?"
    return Check("svid", True, f"{spiffe_id}, {detail} ({share:.0%} of its life)")


def check_chain(chain: tuple[x509.Certificate, ...] | None, roots: tuple[x509.Certificate, ...] | None) -> Check:
    if chain is None or roots is None:
        return Check("chain", None, "identity mode: the sidecar verified the CA's chain when it got it (no files)")
    try:
        verify_chain(chain, roots)
    except CertificateError as exc:
        return Check("chain", False, exc.message, "the SVID and the bundle are from different CAs: reissue or fix")
    return Check("chain", True, f"{len(chain)} certificate(s) chain to the bundle ({len(roots)} root(s))")


def check_bundle(issuer: str | None, roots: tuple[x509.Certificate, ...] | None, bundle: str) -> Check:
    if issuer is None or roots is None:
        return Check("bundle", False, f"cannot tell: no issuer or no bundle read ({bundle})", "see the checks above")
    subjects = [root.subject.rfc4514_string() for root in roots]
    if issuer in subjects:
        return Check("bundle", True, f"{bundle} holds the issuer {issuer!r}")
    hint = "add the CA's root to the bundle (`mtlsmesh ca bundle --add`), or reissue from a CA it holds"
    return Check("bundle", False, f"{bundle} does not hold the issuer {issuer!r} (it has {len(roots)} root(s))", hint)


def check_ca(cfg: Config) -> tuple[Check, Check]:
    if cfg.identity is None:
        skip = Check("ca", None, "file mode: no CA service configured")
        return skip, Check("clock", None, "no CA to compare with")
    import trio

    from mtlsmesh import caclient, caproto, http11

    identity = cfg.identity
    expected = identity.ca_identity or caproto.ca_workload_id(cfg.trust_domain)
    endpoint = caclient.CaEndpoint(identity.ca_address.host, identity.ca_address.port, expected)
    hint = f"is the CA service up, and {endpoint} reachable from the pod? (identity.ca_address)"

    async def ask() -> http11.Answer:
        roots = pem.load_certificates(identity.bundle)
        with trio.fail_after(CA_TIMEOUT):
            stream = await caclient.open_ca(endpoint, roots)
            try:
                return await http11.request(stream, "GET", caproto.BUNDLE_PATH, host=caproto.CA_SERVICE_DNS)
            finally:
                await trio.aclose_forcefully(stream)

    try:
        answer = trio.run(ask)
    except trio.TooSlowError:
        return Check("ca", False, f"{endpoint}: no answer within {CA_TIMEOUT:g}s", hint), _no_clock()
    except MeshError as exc:
        return Check("ca", False, str(exc), hint), _no_clock()
    if answer.status != 200:
        return Check("ca", False, f"{endpoint}: GET {caproto.BUNDLE_PATH} answered {answer.status}", hint), _no_clock()
    ca = Check("ca", True, f"{endpoint} answered as {expected}")
    date = dict(answer.headers).get("date")
    if date is None:
        return ca, Check("clock", None, "the CA sent no Date header")
    skew = (datetime.now(UTC) - email.utils.parsedate_to_datetime(date)).total_seconds()
    if abs(skew) > MAX_SKEW + 1:  # the header has whole seconds
        hint = "sync the clocks (NTP): skewed clocks make fresh certificates look not yet valid, or expired"
        return ca, Check("clock", False, f"{skew:+.0f}s from the CA's clock", hint)
    return ca, Check("clock", True, f"{skew:+.0f}s from the CA's clock (within {MAX_SKEW:g}s)")


def _no_clock() -> Check:
    return Check("clock", None, "the CA did not answer: no clock to compare with")


# ---------------------------------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace) -> list[Check]:
    first, cfg = check_config(args)
    checks = [first]
    if cfg is None:
        return checks
    tables: dict[str, SavedTable] | None = None
    error = ""
    try:
        tables = pod.read_rules_file(args.rules) if args.rules else pod.read_rules(Family.V4)
    except MeshError as exc:
        error = str(exc)
    checks.append(check_capture(cfg, tables, error))
    checks.append(check_listening(cfg, listening_sockets()))
    checks.append(check_health(cfg))
    served: dict[str, Any] | None = None
    if cfg.admin_listen is not None:
        try:
            served = pod.admin_json(cfg.admin_listen, "/certs")
        except MeshError:
            served = None
    chain = roots = None
    bundle_path = cfg.credentials.bundle if cfg.credentials is not None else cfg.identity.bundle if cfg.identity else ""
    try:
        if cfg.credentials is not None:
            chain = pem.load_certificates(cfg.credentials.cert)
        roots = pem.load_certificates(bundle_path)
    except MeshError as exc:
        checks.append(Check("svid files", False, str(exc), "the sidecar's config names files this pod lacks"))
    checks.append(check_svid(cfg, served, chain))
    checks.append(check_chain(chain, roots))
    issuer = chain[-1].issuer.rfc4514_string() if chain else served.get("chain_issuer") if served else None
    checks.append(check_bundle(str(issuer) if issuer else None, roots, bundle_path))
    checks.extend(check_ca(cfg))
    return checks


def run(args: argparse.Namespace) -> int:
    if args.pod:
        return pod.run_in_pod(args.pod, args.argv)
    checks = run_checks(args)
    if args.json:
        output.print_json([{"check": c.check, "ok": c.ok, "detail": c.detail, "hint": c.hint} for c in checks])
    else:
        for check in checks:
            print(check.line())
    return EXIT_FAILED if any(check.ok is False for check in checks) else 0

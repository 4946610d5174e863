"""The pod lab: a small node built from network namespaces, with real capture rules, sidecars and apps.

`Lab(topology)` used as a context manager builds, in this order:
1. the node: a namespace holding a bridge with the pods' gateway addresses (one IPv4, one IPv6: the lab is dual
   stack), forwarding on for both families, ICMP redirects off (pods reach each other through the gateway, so
   the node routes packets back out the bridge they came in on);
2. one namespace per pod with a veth into the bridge (created inside the namespaces, so nothing appears in the
   host's), loopback up, a /32 and a /128 address and a default route of each family via the gateway, ICMPv6
   redirects ignored (IPv6 has no switch to stop the node sending them);
3. the Service DNAT rules in the node for both families, as kube-proxy puts them, with its hairpin masquerade
   (see `topology.render_service_rules`);
4. for each mesh pod, what its pod spec would run: the init step `mtlsmesh iptables` as root, an SVID from the
   lab's CA in a Secret-like directory owned by uid 1337, the sidecar config, `mtlsmesh sidecar` as uid 1337
   with its admin token in a directory of uid 1337 alone (`admin_token_path`), and a wait for `/healthz/ready` on
   15021 from the node, as a kubelet probes;
5. each pod's apps, as their own uids, and a wait for their ports.

In identity mode (`Topology(identity=IdentitySpec(...))`) the lab plays the cluster instead of handing out SVID
files: it keeps a service-account token issuer (`cluster.TokenIssuer`, its key in memory) and writes its JWKS,
saves its CA in a root-only directory and runs `mtlsmesh ca serve` on the node's bridge address
(`topology.CA_ADDRESS`, port 15012), and gives each mesh pod a projected-like token readable by uid 1337 alone
(mode 0400), the CA's bundle for first contact and a sidecar config with an `identity:` section. No certificate
or key is written for a pod: each sidecar makes its key in memory and enrols with the CA service. As a kubelet
does, a thread projects every token again (a new file renamed over the old one) once 80 % of its life has passed,
so a lab running longer than a token lives never holds an expired one; `mint_token` is the lab's TokenRequest for
pods meshed from their own pod specs.

Everything is named `<tag><pid><letter>-...` so parallel runs never collide, and torn down on exit, Ctrl-C,
SIGTERM, interpreter exit and failure part-way: processes first (by PID), then namespaces, then the temp dir.
`netns.cleanup_stale(prefix)` removes what a killed run left.

What this module does not do: decide addresses or render configs (see `topology`), or parse captures (`pcap`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import mtlsmesh
from mtlsmesh import ca, pem
from mtlsmesh.caproto import CA_PORT
from mtlsmesh.conventions import HEALTH_PORT, KEY_FILE, PROXY_GID, PROXY_UID, SVID_FILES
from mtlsmesh.errors import LabError
from mtlsmesh.identity import TrustDomain
from mtlsmesh.lab import netns
from mtlsmesh.lab.cluster import TOKEN_LIFETIME, TokenIssuer
from mtlsmesh.lab.topology import (
    CA_ADDRESS,
    FAMILIES,
    GATEWAY,
    GATEWAY_V6,
    POD_NETWORK_V6,
    AppSpec,
    Plan,
    PlannedPod,
    Topology,
    plan_topology,
    render_capture_args,
    render_identity_config,
    render_service_rules,
    render_sidecar_config,
)

DEFAULT_TAG = "mm"
REQUIRED_TOOLS = ("ip", "iptables", "iptables-restore", "ip6tables", "ip6tables-restore", "setpriv")
READY_TIMEOUT = 30.0  # a sidecar imports trio, OpenSSL and cryptography on a busy machine
APP_TIMEOUT = 15.0
CA_TIMEOUT = 30.0  # the CA service imports as much as a sidecar does
CA_RELOAD_INTERVAL = "500ms"  # how soon the CA service sees a changed CA directory (a root rotation)
TOKEN_FILE = "token"  # in the pod's token directory, as a projected volume names it
TOKEN_REFRESH_FRACTION = 0.8  # the kubelet's token manager: a new token once 80 % of the old one's life is gone
STOP_GRACE = 5.0  # after SIGTERM, before SIGKILL: the sidecars drain for `timeouts.drain` (1s in the lab)

_letters = itertools.count()
_live_labs: list[Lab] = []


def package_parent() -> str:
    """The directory holding the `mtlsmesh` package: PYTHONPATH for every child process."""
    return str(Path(mtlsmesh.__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": package_parent(),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the sidecar's uid cannot write the package's __pycache__
        "LANG": "C.UTF-8",
    }


def as_uid(uid: int, argv: Sequence[str], *, gid: int | None = None, caps: Sequence[str] = ()) -> list[str]:
    """`argv` run as `uid` and `gid` (by default the same number as the uid), with no supplementary groups, and
    with the capabilities `caps` (ambient, so they survive the uid change: `net_admin`) when given."""
    keep = [
        f"--inh-caps={','.join('+' + cap for cap in caps)}",
        f"--ambient-caps={','.join('+' + cap for cap in caps)}",
    ]
    return [
        "setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--clear-groups",
        *(keep if caps else []), *argv,
    ]  # fmt: skip


def preflight(python: str = sys.executable, uids: Sequence[int] = (PROXY_UID,)) -> None:
    """Refuse, with the command that fixes it, to build a lab this machine cannot run."""
    if os.geteuid() != 0:
        raise LabError("the lab builds network namespaces and iptables rules: run it as root (sudo -E ...)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise LabError(f"missing {', '.join(missing)}: install them (apt-get install -y iproute2 iptables util-linux)")
    for uid in sorted(set(uids)):
        probe = as_uid(uid, [python, "-c", "import mtlsmesh.cli, trio, OpenSSL, yaml, cryptography"])
        done = subprocess.run(probe, env=child_env(), capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LabError(
                f"uid {uid} cannot run {python} and import mtlsmesh ({last}): create the venv with the system "
                f"python3 (python3 -m venv .venv) in a directory every user can read, and keep the source there"
            )


@dataclass(slots=True)
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        return self.popen.poll() is None


class Lab:
    """A running pod lab; see the module docstring. Use as `with Lab(topology) as lab: ...`."""

    def __init__(self, topology: Topology, *, tag: str = DEFAULT_TAG, python: str = sys.executable) -> None:
        self.plan: Plan = plan_topology(topology)
        letter = "abcdefghijklmnopqrstuvwxyz"[next(_letters) % 26]
        self.prefix = f"{tag}{os.getpid()}{letter}"  # at most 2+7+1 chars: room for suffixes in 15
        self.python = python
        self.node_ns = f"{self.prefix}-node"
        self.bridge = f"{self.prefix}br"
        self.workdir = Path()
        self.authority: ca.Authority | None = None
        self.issuer: TokenIssuer | None = None  # identity mode only
        self._ca: _Process | None = None  # identity mode: the `mtlsmesh ca serve` process
        self._namespaces: list[str] = []
        self._sidecars: dict[str, _Process] = {}
        self._apps: dict[tuple[str, str], _Process] = {}
        self._others: list[_Process] = []
        self._rotations = itertools.count(1)
        self._closed = False
        self._token_due: dict[str, float] = {}  # identity mode: lab pod -> when its token is projected again
        self.token_projections: dict[str, int] = {}  # lab pod -> how many tokens were written for it
        self._token_stop = threading.Event()
        self._token_thread: threading.Thread | None = None

    # -- names ---------------------------------------------------------------------------------------------------

    def pod_ns(self, pod: str) -> str:
        self.plan.pod(pod)
        return f"{self.prefix}-{pod}"

    def veth(self, pod: str) -> str:
        """The node-side end of the pod's veth (where a capture sees the pod's traffic on the wire)."""
        return f"{self.prefix}v{self.plan.pod(pod).index}"

    def ip(self, pod: str, family: int = 4) -> str:
        """The pod's address of IP version `family` (4 or 6)."""
        return str(self.plan.pod(pod).address(family))

    def vip(self, service: str, family: int = 4) -> str:
        """The Service's virtual IP of IP version `family` (4 or 6)."""
        return str(self.plan.service(service).address(family))

    def pod_dir(self, pod: str) -> Path:
        return self.workdir / pod

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # -- life cycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        uids = {PROXY_UID} | {app.uid for pod in self.plan.pods for app in pod.spec.apps}
        preflight(self.python, sorted(uids))
        _live_labs.append(self)
        _guard_sigterm()
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            self.workdir.chmod(0o755)  # the sidecar and app uids read their configs below it
            self._build_node()
            for pod in self.plan.pods:
                self._build_pod(pod)
            if self.plan.services:
                for family in FAMILIES:
                    restore = "iptables-restore" if family == 4 else "ip6tables-restore"
                    netns.run(netns.ns_exec(self.node_ns, [restore, "--noflush"]), input_text=self._rules(family))
            now = datetime.datetime.now(datetime.UTC)
            self.authority = ca.create_ca(TrustDomain(self.plan.topology.trust_domain), now=now)
            if self.plan.topology.identity is not None:
                self._init_cluster()
            mesh = [pod for pod in self.plan.pods if pod.spiffe_id is not None]
            for pod in mesh:
                self._init_pod(pod)
            if self._token_due:  # started once every token is written: the thread alone changes them from here
                self._token_thread = threading.Thread(target=self._project_tokens, name="lab-tokens", daemon=True)
                self._token_thread.start()
            for pod in mesh:
                self._spawn_sidecar(pod.spec.name)
            for pod in mesh:
                self.wait_ready(pod.spec.name)
            for pod in self.plan.pods:
                for app in pod.spec.apps:
                    self._spawn_app(pod, app.name)
            for pod in self.plan.pods:
                for app in pod.spec.apps:
                    proc = self._apps[(pod.spec.name, app.name)]
                    for port in app.ports:
                        netns.wait_port(
                            self.pod_ns(pod.spec.name),
                            "127.0.0.1",
                            port,
                            timeout=APP_TIMEOUT,
                            alive=proc.running,
                        )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if self._closed:
            return
        self._closed = True
        # Apps and tcpdump first, then the sidecars (they drain) and the CA service, all signalled at once and then
        # waited for.
        self._token_stop.set()
        if self._token_thread is not None:
            self._token_thread.join(timeout=STOP_GRACE)
        procs = [*self._others, *self._apps.values(), *self._sidecars.values(), *self._ca_processes()]
        for proc in procs:
            if proc.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=2)
        for name in reversed(self._namespaces):
            # A process we did not start cannot live here, but a killed sidecar's child could: end them by PID.
            for pid in netns.namespace_pids(name):
                netns.stop_pid(pid, grace=1.0)
            with contextlib.suppress(LabError):
                netns.delete_namespace(name)
        if self.workdir != Path() and self.workdir.is_dir():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self in _live_labs:
            _live_labs.remove(self)
        if not _live_labs:
            _restore_sigterm()

    # -- building ------------------------------------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        if name in netns.list_namespaces():
            raise LabError(f"namespace {name} exists already: remove it with `ip netns del {name}`")
        netns.run(["ip", "netns", "add", name])
        self._namespaces.append(name)  # tracked before anything else can fail, so close() removes it
        netns.run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build_node(self) -> None:
        self._add_ns(self.node_ns)
        netns.run_in_netns(self.node_ns, _node_sysctls)
        netns.run(["ip", "-n", self.node_ns, "link", "add", self.bridge, "type", "bridge"])
        netns.run(["ip", "-n", self.node_ns, "addr", "add", f"{GATEWAY}/24", "dev", self.bridge])
        # nodad: usable at once, not after duplicate address detection (nothing else on the bridge can hold it).
        gateway6 = f"{GATEWAY_V6}/{POD_NETWORK_V6.prefixlen}"
        netns.run(["ip", "-n", self.node_ns, "addr", "add", gateway6, "dev", self.bridge, "nodad"])
        netns.run(["ip", "-n", self.node_ns, "link", "set", self.bridge, "up"])

    def _build_pod(self, pod: PlannedPod) -> None:
        name = pod.spec.name
        ns = self.pod_ns(name)
        self._add_ns(ns)
        netns.run_in_netns(ns, _pod_sysctls)  # before eth0 exists, so its `default` values are eth0's
        veth = self.veth(name)
        netns.run(["ip", "-n", self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        netns.run(["ip", "-n", self.node_ns, "link", "set", veth, "master", self.bridge, "up"])
        # Hairpin mode, as the kubelet sets it on a pod's bridge port: with br_netfilter loaded on the host, a
        # connection DNATed back to the pod it came from is bridged out the port it came in on, which a bridge
        # refuses unless the port is in hairpin mode (see topology's module docstring).
        netns.run(["ip", "-n", self.node_ns, "link", "set", veth, "type", "bridge_slave", "hairpin", "on"])
        netns.run(["ip", "-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0"])
        netns.run(["ip", "-n", ns, "addr", "add", f"{pod.ip6}/128", "dev", "eth0", "nodad"])
        netns.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        netns.run(["ip", "-n", ns, "route", "add", "default", "via", str(GATEWAY), "dev", "eth0", "onlink"])
        netns.run(["ip", "-n", ns, "-6", "route", "add", "default", "via", str(GATEWAY_V6), "dev", "eth0", "onlink"])
        self.pod_dir(name).mkdir(mode=0o755)

    def _rules(self, family: int = 4) -> str:
        return render_service_rules(self.plan, family)

    def _init_pod(self, pod: PlannedPod) -> None:
        name = pod.spec.name
        argv = [self.python, "-m", "mtlsmesh", "iptables", *render_capture_args(pod.spec)]
        self.run_in(name, argv)
        if self.plan.topology.identity is not None:
            self._init_identity_pod(pod)
            return
        svid_dir = self.pod_dir(name) / "svid"
        svid_dir.mkdir(mode=0o700)
        os.chown(svid_dir, PROXY_UID, PROXY_GID)
        self.rotate_svid(name)
        for filename in SVID_FILES:
            link = svid_dir / filename
            link.symlink_to(Path("..data") / filename)
            os.chown(link, PROXY_UID, PROXY_GID, follow_symlinks=False)
        config = render_sidecar_config(self.plan, name, *(str(svid_dir / filename) for filename in SVID_FILES))
        config_path = self.pod_dir(name) / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        config_path.chmod(0o644)

    def rotate_svid(self, pod: str) -> Path:
        """Issue a fresh SVID and swap it in the way a Secret volume does: a new directory, an atomic rename of the
        `..data` symlink, then the old directory removed. Returns the new directory. (Also the first issue.)"""
        planned = self.plan.pod(pod)
        if planned.spiffe_id is None or self.authority is None:
            raise LabError(f"pod {pod} is outside the mesh and has no SVID")
        if self.plan.topology.identity is not None:
            raise LabError(f"pod {pod} gets its SVID from the CA service (identity mode), not from files")
        issued = ca.issue_svid(self.authority, planned.spiffe_id, now=datetime.datetime.now(datetime.UTC))
        svid_dir = self.pod_dir(pod) / "svid"
        version = svid_dir / f"..{next(self._rotations)}"
        version.mkdir(mode=0o700)
        contents = (issued.cert_chain_pem(), issued.key_pem(), issued.bundle_pem())
        for filename, data in zip(SVID_FILES, contents, strict=True):
            path = version / filename
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if filename == KEY_FILE else 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chown(path, PROXY_UID, PROXY_GID)
        os.chown(version, PROXY_UID, PROXY_GID)
        data_link = svid_dir / "..data"
        previous = svid_dir / os.readlink(data_link) if data_link.is_symlink() else None
        tmp_link = svid_dir / "..data_tmp"
        tmp_link.symlink_to(version.name)
        os.chown(tmp_link, PROXY_UID, PROXY_GID, follow_symlinks=False)
        os.replace(tmp_link, data_link)
        if previous is not None:
            shutil.rmtree(previous)  # as the kubelet does once the new version is in place
        return version

    # -- identity mode: the lab plays the cluster -------------------------------------------------------------------

    @property
    def ca_dir(self) -> Path:
        """The CA directory `mtlsmesh ca serve` serves from (identity mode); root only, it holds the CA's key."""
        return self.workdir / "ca"

    @property
    def ca_log_path(self) -> Path:
        return self.workdir / "ca.log"

    def _init_cluster(self) -> None:
        assert self.authority is not None and self.plan.topology.identity is not None
        if self.plan.topology.identity.token_lifetime < 2:
            raise LabError("identity.token_lifetime: at least 2 seconds (tokens are projected again at 80 %)")
        self.ca_dir.mkdir(mode=0o700)
        ca.save_authority(self.authority, self.ca_dir)
        self.issuer = TokenIssuer()
        self.issuer.write_jwks(self.workdir / "jwks.json")
        self.start_ca()

    def start_ca(self) -> None:
        """Run `mtlsmesh ca serve` in the node namespace on the bridge address, as root (it reads the CA's key), and
        wait until it accepts connections. Also after `stop_ca`."""
        identity = self.plan.topology.identity
        if identity is None or self.issuer is None:
            raise LabError("this lab is not in identity mode: it runs no CA service")
        if self._ca is not None and self._ca.running():
            raise LabError("the CA service is running already")
        argv = [
            self.python, "-m", "mtlsmesh", "ca", "serve",
            "--dir", str(self.ca_dir),
            "--listen", f"{CA_ADDRESS}:{CA_PORT}",
            "--token-issuer", self.issuer.issuer,
            "--token-jwks", str(self.workdir / "jwks.json"),
            "--token-audience", self.issuer.audience,
            "--ttl", identity.ttl,
            "--reload-interval", CA_RELOAD_INTERVAL,
        ]  # fmt: skip
        proc = self._ca = self._spawn("ca", self.node_ns, argv, self.ca_log_path)
        netns.wait_port(self.node_ns, str(CA_ADDRESS), CA_PORT, timeout=CA_TIMEOUT, alive=proc.running)

    def stop_ca(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the CA service (by its PID) and wait for it to exit; `start_ca` runs it again."""
        if self._ca is None:
            raise LabError("this lab runs no CA service")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._ca.popen.pid, sig)
        try:
            self._ca.popen.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            netns.stop_pid(self._ca.popen.pid)

    def ca_pid(self) -> int:
        if self._ca is None:
            raise LabError("this lab runs no CA service")
        return self._ca.popen.pid

    def ca_log(self) -> str:
        return self.ca_log_path.read_text(errors="replace")

    def ca_command(self, *args: str) -> str:
        """`mtlsmesh ca ARGS` run as root with the lab's environment and its output: the operator's steps on the CA
        directory (`ca init`, `ca bundle`, `ca rotate`), which the running CA service follows without a restart.
        They touch files only, so they run outside every namespace."""
        return netns.run([self.python, "-m", "mtlsmesh", "ca", *args], env=child_env())

    def _ca_processes(self) -> list[_Process]:
        return [] if self._ca is None else [self._ca]

    def token_path(self, pod: str) -> Path:
        return self.pod_dir(pod) / "token" / TOKEN_FILE

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        pod: str,
        *,
        audience: str | None = None,
        seconds: int = TOKEN_LIFETIME,
    ) -> str:
        """The lab's TokenRequest: a token for `pod` running as `namespace`/`service_account`, lasting `seconds` but
        no longer than the topology's `identity.token_lifetime` (as an API server caps it)."""
        identity = self.plan.topology.identity
        if identity is None or self.issuer is None:
            raise LabError("this lab is not in identity mode: it has no token issuer")
        lifetime = min(seconds, identity.token_lifetime)
        return self.issuer.token(namespace, service_account, pod, lifetime=lifetime, audience=audience)

    def _project_token(self, pod: PlannedPod) -> None:
        """Write the pod's token: a new file, owned by the sidecar's uid and readable by it alone, renamed over the
        old one (a reader sees the old token or the new one, whole); and note when to project it again."""
        identity = self.plan.topology.identity
        assert identity is not None
        name = pod.spec.name
        lifetime = min(TOKEN_LIFETIME, identity.token_lifetime)
        issued = time.time()
        token = self.mint_token(pod.spec.namespace, pod.spec.account, name, seconds=lifetime)
        staged = self.token_path(name).with_name(f".{TOKEN_FILE}.new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "w") as out:
            out.write(token)
        os.chown(staged, PROXY_UID, PROXY_GID)
        os.replace(staged, self.token_path(name))
        self._token_due[name] = issued + TOKEN_REFRESH_FRACTION * lifetime
        self.token_projections[name] = self.token_projections.get(name, 0) + 1

    def _project_tokens(self) -> None:
        # The kubelet's token manager, for the lab's own identity-mode pods (a thread: the lab is synchronous).
        while not self._token_stop.is_set():
            now = time.time()
            for pod in self.plan.pods:
                due = self._token_due.get(pod.spec.name)
                if due is not None and due <= now:
                    try:
                        self._project_token(pod)
                    except OSError:
                        self._token_due[pod.spec.name] = now + 1.0  # tried again in a second
            next_due = min(self._token_due.values(), default=now + 1.0)
            self._token_stop.wait(timeout=min(max(next_due - time.time(), 0.05), 1.0))

    def _init_identity_pod(self, pod: PlannedPod) -> None:
        # What the pod spec's volumes would hold: a projected service-account token only the sidecar's uid reads,
        # and the CA's bundle (public, as a ConfigMap would carry it). No certificate, no key.
        assert self.issuer is not None and self.authority is not None
        name = pod.spec.name
        token_dir = self.token_path(name).parent
        token_dir.mkdir(mode=0o500)
        os.chown(token_dir, PROXY_UID, PROXY_GID)
        self._project_token(pod)
        bundle = self.pod_dir(name) / "ca-bundle.pem"
        bundle.write_bytes(pem.render_certificates(self.authority.roots))
        bundle.chmod(0o644)
        config = render_identity_config(self.plan, name, str(self.token_path(name)), str(bundle))
        config_path = self.pod_dir(name) / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        config_path.chmod(0o644)

    def _spawn(
        self, name: str, ns: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> _Process:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                netns.ns_exec(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**child_env(), **(env or {})},
                start_new_session=True,  # Ctrl-C reaches the lab, which stops them in order
            )
        return _Process(name, popen, log)

    def admin_token_path(self, pod: str) -> Path:
        """Where the pod's sidecar writes its admin token, as an injected pod's `mtlsmesh-admin` emptyDir holds it:
        in a directory only uid 1337 (and root) can enter, so `mtlsmesh drain --pod POD --token-file THIS` works."""
        return self.pod_dir(pod) / "admin" / "token"

    def _spawn_sidecar(self, pod: str) -> None:
        config_path = self.pod_dir(pod) / "sidecar.yaml"
        token_dir = self.admin_token_path(pod).parent
        token_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(token_dir, PROXY_UID, PROXY_GID)
        inbound = (yaml.safe_load(config_path.read_text()) or {}).get("inbound") or {}
        # TPROXY: a transparent listener and transparent, marked dials need CAP_NET_ADMIN, as Istio's proxy gets.
        caps = ("net_admin",) if inbound.get("interception_mode") == "TPROXY" else ()
        sidecar = ["sidecar", "--config", str(config_path), "--admin-token-file", str(self.admin_token_path(pod))]
        argv = as_uid(PROXY_UID, [self.python, "-m", "mtlsmesh", *sidecar], caps=caps)
        self._sidecars[pod] = self._spawn(f"{pod}/sidecar", self.pod_ns(pod), argv, self.pod_dir(pod) / "sidecar.log")

    def _spawn_app(self, pod: PlannedPod, app_name: str) -> None:
        app = next(a for a in pod.spec.apps if a.name == app_name)
        argv = as_uid(app.uid, [self.python, "-m", "mtlsmesh.lab.demoapps", *app.args])
        log = self.pod_dir(pod.spec.name) / f"app-{app.name}.log"
        self._apps[(pod.spec.name, app.name)] = self._spawn(
            f"{pod.spec.name}/{app.name}", self.pod_ns(pod.spec.name), argv, log
        )

    def wait_ready(self, pod: str, timeout: float = READY_TIMEOUT) -> None:
        """Probe the sidecar's /healthz/ready from the node, as a kubelet does, until it answers 200."""
        proc = self._sidecars[pod]
        deadline = time.monotonic() + timeout
        while True:
            if proc.popen.poll() is not None:
                raise LabError(f"the sidecar of pod {pod} exited ({proc.popen.returncode}): {self._tail(proc.log)}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.node_ns, self.ip(pod), HEALTH_PORT, "/healthz/ready", timeout=1.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise LabError(f"the sidecar of pod {pod} is not ready after {timeout:g}s: {self._tail(proc.log)}")
            time.sleep(0.1)

    @staticmethod
    def _tail(log: Path) -> str:
        try:
            lines = log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) if lines else "empty log"

    # -- pods meshed from their own command lines ------------------------------------------------------------------

    def start_pod(
        self,
        pod: str,
        *,
        init: tuple[Sequence[str], Mapping[str, str]],
        proxy: tuple[Sequence[str], Mapping[str, str]],
        proxy_uid: int = PROXY_UID,
        proxy_gid: int = PROXY_GID,
    ) -> None:
        """Mesh a running lab's pod with the command lines its pod spec gives, instead of the lab's own: run the init
        step `init` = (argv, env) as root to completion, start the proxy `proxy` = (argv, env) as `proxy_uid` /
        `proxy_gid`, and wait until it is ready, as the kubelet orders a pod's init containers. The pod is declared
        `mesh=False` in the topology, so the lab left it unmeshed; files the commands name are the caller's.
        (`restart_sidecar` restarts only the lab's own sidecars.)"""
        if self.plan.pod(pod).spiffe_id is not None:
            raise LabError(f"pod {pod} is meshed by the lab itself: declare it mesh=False to mesh it from a pod spec")
        if self._closed or pod in self._sidecars:
            raise LabError(f"pod {pod} already has a sidecar, or the lab is closed")
        init_argv, init_env = init
        self.run_in(pod, init_argv, env=init_env)
        proxy_argv, proxy_env = proxy
        argv = as_uid(proxy_uid, proxy_argv, gid=proxy_gid)
        log = self.pod_dir(pod) / "sidecar.log"
        self._sidecars[pod] = self._spawn(f"{pod}/sidecar", self.pod_ns(pod), argv, log, env=proxy_env)
        self.wait_ready(pod)

    def start_app(self, pod: str, app: AppSpec) -> None:
        """Start an app in a pod of the running lab (after `start_pod`, as app containers follow init containers)
        and wait for its ports."""
        if app.uid in (0, PROXY_UID) or (pod, app.name) in self._apps:
            raise LabError(f"pod {pod}: app {app.name} exists already or runs as uid {app.uid}")
        argv = as_uid(app.uid, [self.python, "-m", "mtlsmesh.lab.demoapps", *app.args])
        log = self.pod_dir(pod) / f"app-{app.name}.log"
        proc = self._apps[(pod, app.name)] = self._spawn(f"{pod}/{app.name}", self.pod_ns(pod), argv, log)
        for port in app.ports:
            netns.wait_port(self.pod_ns(pod), "127.0.0.1", port, timeout=APP_TIMEOUT, alive=proc.running)

    # -- operating -----------------------------------------------------------------------------------------------

    def run_in(
        self,
        pod: str,
        argv: Sequence[str],
        *,
        timeout: float = netns.COMMAND_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a command as root inside a pod and return its output; `env` adds to the lab's child environment."""
        full_env = None if env is None else {**child_env(), **env}
        return netns.run(netns.ns_exec(self.pod_ns(pod), argv), timeout=timeout, env=full_env)

    def connect(self, pod: str, host: str, port: int, *, timeout: float = 10.0) -> socket.socket:
        """A TCP connection made from inside `pod` by this process (root, so the capture rules treat it as an app)."""
        return netns.connect_in(self.pod_ns(pod), host, port, timeout=timeout)

    def listen(self, pod: str, port: int, *, host: str = "::", backlog: int = 256) -> socket.socket:
        """A listening TCP socket inside `pod`, for a test to play the app's server part itself; on `::` it takes
        both families (IPv4 peers show as `::ffff:a.b.c.d`)."""
        ipv6 = ":" in host
        sock = netns.socket_in(self.pod_ns(pod), socket.AF_INET6 if ipv6 else socket.AF_INET)
        try:
            if ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def nat_rules(self, pod: str, family: int = 4) -> str:
        """`iptables -t nat -L -v -n` inside a pod (`ip6tables` for `family` 6): the capture chains with their
        packet counters."""
        tool = "iptables" if family == 4 else "ip6tables"
        return self.run_in(pod, [tool, "-t", "nat", "-L", "-v", "-n"])

    def sidecar_pid(self, pod: str) -> int:
        return self._sidecars[pod].popen.pid

    def sidecar_log(self, pod: str) -> str:
        return (self.pod_dir(pod) / "sidecar.log").read_text(errors="replace")

    def app_log(self, pod: str, app: str) -> str:
        return (self.pod_dir(pod) / f"app-{app}.log").read_text(errors="replace")

    def kill_sidecar(self, pod: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to the pod's sidecar (by its PID) and wait for it to exit."""
        proc = self._sidecars[pod]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.popen.pid, sig)
        proc.popen.wait(timeout=10)

    def restart_sidecar(self, pod: str) -> None:
        """Start the pod's sidecar again (after `kill_sidecar`) and wait until it is ready."""
        if self._sidecars[pod].popen.poll() is None:
            raise LabError(f"the sidecar of pod {pod} is still running")
        self._spawn_sidecar(pod)
        self.wait_ready(pod)

    def processes(self) -> list[int]:
        """PIDs of the processes this lab started that are still running."""
        procs = [*self._others, *self._apps.values(), *self._sidecars.values(), *self._ca_processes()]
        return [proc.popen.pid for proc in procs if proc.popen.poll() is None]

    @contextlib.contextmanager
    def capture(self, pod: str, *, port_filter: str = "tcp") -> Iterator[Path]:
        """Record the pod's traffic with tcpdump on the node-side end of its veth; yields the pcap file's path,
        complete once the block ends."""
        if shutil.which("tcpdump") is None:
            raise LabError("tcpdump is missing: apt-get install -y tcpdump")
        pcap = self.workdir / f"{pod}-{next(self._rotations)}.pcap"
        log = pcap.with_suffix(".log")
        argv = [
            "tcpdump",
            "-i",
            self.veth(pod),
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
            str(pcap),
            port_filter,
        ]
        proc = self._spawn(f"{pod}/tcpdump", self.node_ns, argv, log)
        self._others.append(proc)
        deadline = time.monotonic() + 10
        while "listening on" not in log.read_text(errors="replace"):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"tcpdump did not start: {self._tail(log)}")
            time.sleep(0.05)
        try:
            yield pcap
        finally:
            time.sleep(0.3)  # let the last segments reach the capture
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGINT)  # tcpdump flushes its file on SIGINT
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                netns.stop_pid(proc.popen.pid)
            self._others.remove(proc)


def http_get(
    ns: str, host: str, port: int, path: str, *, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET made from inside namespace `ns`: (status, body)."""
    with netns.connect_in(ns, host, port, timeout=timeout) as sock:
        lines = [f"GET {path} HTTP/1.0", f"Host: {host}:{port}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks: list[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"not an HTTP response from {host}:{port}: {response[:60]!r}")
    return int(status_line[1]), body


def log_records(text: str) -> list[dict[str, str]]:
    """The sidecar's key=value log lines (`runtime.render_kv`) as dicts, values unquoted; lines that do not split
    (a traceback) and words without `=` are skipped."""
    records: list[dict[str, str]] = []
    for line in text.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        fields = dict(word.split("=", 1) for word in words if "=" in word)
        if fields:
            records.append(fields)
    return records


def _node_sysctls() -> None:
    # Runs on a thread inside the node namespace: /proc/sys/net shows that namespace's values.
    settings = {
        "ipv4/ip_forward": "1",
        # Pods reach each other through the gateway; a redirect would teach them to bypass the node's DNAT.
        "ipv4/conf/all/send_redirects": "0",
        "ipv4/conf/default/send_redirects": "0",
        "ipv4/conf/all/rp_filter": "0",
        "ipv4/conf/default/rp_filter": "0",
        "ipv6/conf/all/forwarding": "1",
    }
    for key, value in settings.items():
        Path("/proc/sys/net", key).write_text(value)


def _pod_sysctls() -> None:
    # Runs on a thread inside a pod namespace before its eth0 exists (so `default` covers it). Linux has no switch
    # to stop the node sending ICMPv6 redirects when it routes a packet back out the bridge: the pods ignore them,
    # or they would bypass the node's DNAT (and its reverse) for each other. No router advertisements either: the
    # lab sets the routes.
    for scope in ("all", "default"):
        Path("/proc/sys/net/ipv6/conf", scope, "accept_redirects").write_text("0")
        Path("/proc/sys/net/ipv6/conf", scope, "accept_ra").write_text("0")


def _exit_on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)


_sigterm_guarded = False


def _guard_sigterm() -> None:
    # SIGTERM would otherwise end the process without running `finally`: turn it into SystemExit while labs live.
    global _sigterm_guarded
    with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            _sigterm_guarded = True


def _restore_sigterm() -> None:
    global _sigterm_guarded
    if _sigterm_guarded:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _sigterm_guarded = False


@atexit.register
def _close_live_labs() -> None:
    for lab in list(_live_labs):
        lab.close()

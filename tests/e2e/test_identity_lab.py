"""End-to-end: the lab plays the cluster for identity mode. No SVID file exists; each sidecar (uid 1337, under the
real capture rules) makes its key in memory and enrols with `mtlsmesh ca serve` on the node, using a projected-like
service-account token only it can read, then renews with its SVID.

The pods: `web` (echo on 7000, hash on 7001) and `client`, both in the mesh. Each test builds its own lab, as the
SVID lifetime differs between them; every lab is torn down and checked for leftovers even when a test fails.
Renewals are shown twice: with 4 s SVIDs renewed at half (many renewals in a few seconds), and with the issue's
60 s SVIDs renewed at a tenth of their life (every 6 s), whose lab also caps tokens at 10 s to show each one
projected again before it expires.
A last test kills a lab's process outright: `netns.cleanup_stale` still ends the CA service it left running.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from functools import partial

import pytest

from mtlsmesh import ca, workers
from mtlsmesh.config import Config
from mtlsmesh.conventions import ADMIN_PORT, PROXY_UID
from mtlsmesh.lab import netns
from mtlsmesh.lab.pods import Lab, child_env, http_get, log_records
from mtlsmesh.lab.topology import DEFAULT_APP_UID, AppSpec, IdentitySpec, PodSpec, Topology
from tests.e2e import harness

pytestmark = pytest.mark.root

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
IDS = {"web": WEB_ID, "client": CLIENT_ID}
PODS = (
    PodSpec(
        "web",
        apps=(
            AppSpec("echo", ("tcp", "--name", "web-echo", "--port", "7000", "--mode", "echo"), ports=(7000,)),
            AppSpec("hash", ("tcp", "--name", "web-hash", "--port", "7001", "--mode", "hash"), ports=(7001,)),
        ),
    ),
    PodSpec("client"),
)


def ca_records(lab: Lab, credential: str) -> list[dict[str, str]]:
    return [r for r in log_records(lab.ca_log()) if r.get("event") == "issued" and r.get("credential") == credential]


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not after {timeout:g}s: {what}")
        time.sleep(0.2)


def inbound_mtls(orig_dst: str, peer_id: str) -> Callable[[dict[str, str]], bool]:
    """A connection record of an inbound mTLS connection to `orig_dst` from `peer_id`."""
    return lambda r: (
        r.get("dir") == "inbound"
        and r.get("orig_dst") == orig_dst
        and r.get("peer_id") == peer_id
        and r.get("decision") == "mtls"
    )


def serials(lab: Lab, pod: str) -> list[str]:
    """The serials the CA issued to `pod`'s identity, enrolment first, in order."""
    return [r["serial"] for r in log_records(lab.ca_log()) if r.get("event") == "issued" and r.get("spiffe_id") ==
            IDS[pod]]  # fmt: skip


def trickle(lab: Lab, seconds: float, seed: bytes, stop: threading.Event | None = None) -> tuple[str, str]:
    """One connection from client to web's hash app kept busy for `seconds` (or until `stop` is set): 16 KiB every
    50 ms, then EOF. Returns the hash of what was sent and the app's answer (`<bytes> <sha256>`)."""
    digest = hashlib.sha256()
    total = 0
    with lab.connect("client", lab.ip("web"), 7001, timeout=30.0) as sock:
        deadline = time.monotonic() + seconds
        counter = 0
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            chunk = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() * 512
            sock.sendall(chunk)
            digest.update(chunk)
            total += len(chunk)
            counter += 1
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        answer = harness.read_all(sock).decode().strip()
    return f"{total} {digest.hexdigest()}", answer


def short_calls(lab: Lab, seconds: float) -> int:
    """New connections (new handshakes, so the latest SVIDs) every 250 ms for `seconds`; each must echo intact.
    Returns how many were made."""
    made = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        payload = os.urandom(2048)
        assert harness.exchange(lab, "client", lab.ip("web"), 7000, payload) == harness.echo_answer(payload)
        made += 1
        time.sleep(0.25)
    return made


def test_svids_come_only_from_the_ca_service_and_carry_mtls() -> None:
    for lab in harness.open_lab(Topology(pods=PODS, identity=IdentitySpec(ttl="1h"))):
        # No certificate or key was written for any pod: the only key files are the CA's own, in its directory.
        assert not [path for path in lab.workdir.rglob("*.pem") if path.name in ("key.pem", "cert.pem")]
        assert all(lab.ca_dir in path.parents for path in lab.workdir.rglob("*key*.pem"))
        for pod in IDS:
            token = lab.token_path(pod)
            info = token.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o400, PROXY_UID)
            as_app = ["setpriv", f"--reuid={DEFAULT_APP_UID}", f"--regid={DEFAULT_APP_UID}", "--clear-groups"]
            done = subprocess.run([*as_app, "cat", str(token)], capture_output=True, timeout=10, check=False)
            assert done.returncode != 0 and not done.stdout, "the app's uid can read the sidecar's token"
        # One enrolment per pod, with its token, for the pod's own service account.
        issued = ca_records(lab, "token")
        assert sorted(r["spiffe_id"] for r in issued) == sorted(IDS.values())
        for pod in IDS:
            assert [r for r in log_records(lab.sidecar_log(pod)) if r.get("event") == "svid_issued"]

        payload = os.urandom(4096)
        assert harness.exchange(lab, "client", lab.ip("web"), 7000, payload) == harness.echo_answer(payload)
        harness.wait_records(
            lab,
            "client",
            lambda r: r.get("dir") == "outbound" and r.get("peer_id") == WEB_ID and r.get("decision") == "mtls",
        )
        harness.wait_records(lab, "web", inbound_mtls(f"{lab.ip('web')}:7000", CLIENT_ID))
        assert len(ca_records(lab, "token")) == len(IDS), "a sidecar enrolled twice"


RENEWAL_SECONDS = 12.0  # with a 4 s lifetime renewed at half of it: about six renewals per sidecar


def test_short_lived_svids_renew_under_continuous_traffic() -> None:
    for lab in harness.open_lab(Topology(pods=PODS, identity=IdentitySpec(ttl="4s", renew_fraction=0.5))):
        first = {pod: serials(lab, pod) for pod in IDS}
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            streams = [pool.submit(trickle, lab, RENEWAL_SECONDS, bytes([n])) for n in range(3)]
            calls = short_calls(lab, RENEWAL_SECONDS)
            results = [stream.result(timeout=60) for stream in streams]
        for sent, answer in results:
            assert answer == sent, "a long-lived connection lost or changed bytes across renewals"
        assert calls >= RENEWAL_SECONDS * 2
        for pod in IDS:
            issued = serials(lab, pod)
            # At least four renewals during the traffic, each a new certificate.
            assert len(issued) >= len(first[pod]) + 4, f"{pod}: {issued}"
            assert len(set(issued)) == len(issued)
            records = log_records(lab.sidecar_log(pod))
            assert len([r for r in records if r.get("event") == "svid_renewed"]) >= 4
            assert not [r for r in records if str(r.get("event", "")).endswith("_failing")]
            # The lab's sidecars run the default, `workers: auto` (two on two CPUs), and no worker died.
            (ready,) = [r for r in records if r.get("event") == "ready"]
            assert int(ready.get("workers", 1)) == workers.resolve(Config()), ready
            assert not [r for r in records if r.get("event") == "worker_exited"]
        assert [r for r in ca_records(lab, "svid")], "renewals did not use the SVID as credential"
        assert len(ca_records(lab, "token")) == len(IDS), "a sidecar fell back to its token"
        inbound = [inbound_mtls(f"{lab.ip('web')}:{port}", CLIENT_ID) for port in (7000, 7001)]
        harness.wait_records(lab, "web", inbound[0], count=calls)
        harness.wait_records(lab, "web", inbound[1], count=len(results))


MINUTE_TRAFFIC_SECONDS = 32.0  # a 60 s SVID renewed at a tenth of its life (6 s, +-10 %): five renewals or so
MINUTE_TOKEN_LIFETIME = 10  # the lab's API server caps the pods' tokens at 10 s: re-projected every 8 s


def svid_serials(lab: Lab, pod: str) -> list[str]:
    """The serials of the SVIDs `pod`'s sidecar logged taking into use, enrolment first."""
    records = log_records(lab.sidecar_log(pod))
    return [r["serial"] for r in records if r.get("event") in ("svid_issued", "svid_renewed")]


def token_enrolments_are(lab: Lab, count: int) -> bool:
    return len(ca_records(lab, "token")) == count


def test_a_minute_long_svid_renews_several_times_under_continuous_traffic() -> None:
    # The figure: a 60-second TTL, continuous traffic through the pod pair across several renewals.
    identity = IdentitySpec(ttl="60s", renew_fraction=0.1, token_lifetime=MINUTE_TOKEN_LIFETIME)
    for lab in harness.open_lab(Topology(pods=PODS, identity=identity)):
        for pod in IDS:
            current = certs(lab, pod)
            not_before, not_after = current["not_before"], current["not_after"]
            assert isinstance(not_before, str) and isinstance(not_after, str)
            span = datetime.datetime.fromisoformat(not_after) - datetime.datetime.fromisoformat(not_before)
            # The CA granted the minute asked for (its certificates are backdated by a minute, `ca.BACKDATE`).
            assert span - ca.BACKDATE == datetime.timedelta(seconds=60), f"{pod}: the CA granted {span - ca.BACKDATE}"
        first = {pod: svid_serials(lab, pod) for pod in IDS}
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            streams = [pool.submit(trickle, lab, MINUTE_TRAFFIC_SECONDS, bytes([16 + n])) for n in range(3)]
            calls = short_calls(lab, MINUTE_TRAFFIC_SECONDS)
            results = [stream.result(timeout=90) for stream in streams]
        # Every connection intact: the byte count and SHA-256 the hash app computed are what was sent.
        for sent, answer in results:
            assert answer == sent, "a connection open across the renewals lost or changed bytes"
        assert calls >= MINUTE_TRAFFIC_SECONDS * 2
        for pod in IDS:
            taken = svid_serials(lab, pod)
            # Enrolment, then at least three renewals during the traffic, each a new serial, in the order the CA
            # issued them, and the last one is what the sidecar serves now.
            assert len(taken) >= len(first[pod]) + 3, f"{pod}: {taken}"
            assert len(set(taken)) == len(taken)
            # Read after the sidecar's log, the CA's may hold one renewal more, logged before it was taken into use.
            by_ca = serials(lab, pod)
            assert by_ca[: len(taken)] == taken and len(by_ca) - len(taken) <= 1, (taken, by_ca)
            serving = certs(lab, pod)["serial"]
            assert serving in (taken[-1], *svid_serials(lab, pod)[-1:])
            assert not [r for r in log_records(lab.sidecar_log(pod)) if str(r.get("event", "")).endswith("_failing")]
        assert len(ca_records(lab, "token")) == len(IDS), "a sidecar fell back to its token"
        inbound = [inbound_mtls(f"{lab.ip('web')}:{port}", CLIENT_ID) for port in (7000, 7001)]
        harness.wait_records(lab, "web", inbound[0], count=calls)
        harness.wait_records(lab, "web", inbound[1], count=len(results))
        # The lab projected each pod's token again before it expired, as a kubelet does: a sidecar that must
        # enrol afresh now (restarted, its SVID in memory gone) does so with a token still valid.
        for pod in IDS:
            assert lab.token_projections[pod] >= 3, lab.token_projections
        token = lab.token_path("web").read_text()
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["exp"] > time.time()
        lab.kill_sidecar("web")
        lab.restart_sidecar("web")
        wait_for("web enrolled again with its token", partial(token_enrolments_are, lab, len(IDS) + 1), 10.0)
        payload = os.urandom(2048)
        assert harness.exchange(lab, "client", lab.ip("web"), 7000, payload) == harness.echo_answer(payload)


OUTAGE_SECONDS = 6.0  # longer than one renewal period of an 8 s SVID renewed at half (4 s, +-10 %)


def events(lab: Lab, pod: str, name: str) -> list[dict[str, str]]:
    return [r for r in log_records(lab.sidecar_log(pod)) if r.get("event") == name]


def test_ca_outage_breaks_no_connection_and_renewals_resume() -> None:
    for lab in harness.open_lab(Topology(pods=PODS, identity=IdentitySpec(ttl="8s", renew_fraction=0.5))):
        check_outage(lab)


def has_event(lab: Lab, pod: str, name: str) -> bool:
    return bool(events(lab, pod, name))


def issued_at_least(lab: Lab, pod: str, count: int) -> bool:
    return len(serials(lab, pod)) >= count


def check_outage(lab: Lab) -> None:
    """Two connections stream across a CA outage longer than a renewal period and its restart."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        streams = [pool.submit(trickle, lab, OUTAGE_SECONDS + 20.0, bytes([n])) for n in range(2)]
        time.sleep(1.0)
        old_pid = lab.ca_pid()
        lab.stop_ca()
        issued_before = {pod: len(serials(lab, pod)) for pod in IDS}
        time.sleep(OUTAGE_SECONDS)
        for pod in IDS:
            assert events(lab, pod, "svid_renewal_failing"), f"{pod} did not notice the CA was gone"
            assert len(serials(lab, pod)) == issued_before[pod]
        lab.start_ca()
        assert lab.ca_pid() != old_pid
        for pod in IDS:
            # A retry comes at most 8 s (the fourth backoff step) after the restart; a renewal follows.
            wait_for(f"{pod} recovered", partial(has_event, lab, pod, "svid_renewal_recovered"), 15.0)
            renewed = partial(issued_at_least, lab, pod, issued_before[pod] + 2)
            wait_for(f"{pod} renewed again", renewed, 10.0)
        # New connections handshake with the SVIDs issued after the restart.
        assert short_calls(lab, 1.0) >= 2
        results = [stream.result(timeout=60) for stream in streams]
    for sent, answer in results:
        assert answer == sent, "a connection open across the CA's outage lost or changed bytes"
    harness.wait_records(lab, "web", inbound_mtls(f"{lab.ip('web')}:7001", CLIENT_ID), count=len(results))


def ca_events(lab: Lab, name: str) -> list[dict[str, str]]:
    return [r for r in log_records(lab.ca_log()) if r.get("event") == name]


def certs(lab: Lab, pod: str) -> dict[str, object]:
    """The sidecar's admin `/certs` (its current SVID and the roots it trusts), asked from inside the pod."""
    status, body = http_get(lab.pod_ns(pod), "127.0.0.1", ADMIN_PORT, "/certs")
    assert status == 200
    answer = json.loads(body)
    assert isinstance(answer, dict)
    return answer


def roots_of(lab: Lab, pod: str) -> int:
    roots = certs(lab, pod)["roots"]
    assert isinstance(roots, list)
    return len(roots)


def trusts(lab: Lab, pod: str, count: int) -> bool:
    return roots_of(lab, pod) == count


def test_root_rotation_with_traffic_at_every_step() -> None:
    for lab in harness.open_lab(Topology(pods=PODS, identity=IdentitySpec(ttl="4s", renew_fraction=0.5))):
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            stream = pool.submit(trickle, lab, 90.0, b"rotation", stop)
            try:
                check_rotation(lab)
            finally:
                stop.set()
            sent, answer = stream.result(timeout=60)
        assert answer == sent, "the connection open across the whole rotation lost or changed bytes"


def check_rotation(lab: Lab) -> None:
    """README "Rotating the root", each step followed by the CA and by both sidecars, with new connections after
    each step."""
    ca_dir, next_dir = lab.ca_dir, lab.workdir / "ca-next"
    bundle = str(ca_dir / "bundle.pem")
    (old_signer,) = {r["signer"] for r in ca_events(lab, "ready")}
    assert all(roots_of(lab, pod) == 1 for pod in IDS)

    # (a) the new root is trusted everywhere: the CA serves both, the sidecars get them with their renewals.
    lab.ca_command("init", "--dir", str(next_dir), "--trust-domain", "cluster.local")
    lab.ca_command("bundle", "--bundle", bundle, "--add", str(next_dir / "root.pem"))
    wait_for("the CA serves two roots", lambda: any(r.get("roots") == "2" for r in ca_events(lab, "reloaded")), 10.0)
    for pod in IDS:
        wait_for(f"{pod} trusts both roots", partial(trusts, lab, pod, 2), 15.0)
    assert short_calls(lab, 1.0) >= 2

    # (b) new SVIDs come from the new root; for a while old and new SVIDs meet, both trusted.
    lab.ca_command("rotate", "--dir", str(ca_dir), "--to", str(next_dir))
    wait_for("the CA signs with the new root", lambda: any(r.get("signer") not in (None, old_signer)
             for r in ca_events(lab, "reloaded")), 10.0)  # fmt: skip
    after = {pod: len(serials(lab, pod)) for pod in IDS}
    for pod in IDS:
        # Two renewals: the SVID from before the switch has expired by then (4 s lifetime, renewed at half).
        wait_for(f"{pod} renewed from the new root", partial(issued_at_least, lab, pod, after[pod] + 2), 15.0)
    assert short_calls(lab, 1.0) >= 2

    # (c) the old root goes; only the new one is trusted, and traffic still flows.
    lab.ca_command("bundle", "--bundle", bundle, "--remove", str(ca_dir / "previous-root.pem"))
    wait_for("the CA serves one root again", lambda: ca_events(lab, "reloaded")[-1].get("roots") == "1", 10.0)
    for pod in IDS:
        wait_for(f"{pod} trusts only the new root", partial(trusts, lab, pod, 1), 15.0)
    assert short_calls(lab, 1.0) >= 2
    for pod in IDS:
        assert not [r for r in log_records(lab.sidecar_log(pod)) if str(r.get("event", "")).endswith("_failing")]


# A child process that builds an identity-mode lab, prints its prefix and the CA's and the sidecar's PIDs, then
# waits to be killed.
CHILD = textwrap.dedent(
    """
    import signal
    from mtlsmesh.lab.pods import Lab
    from mtlsmesh.lab.topology import IdentitySpec, PodSpec, Topology
    with Lab(Topology(pods=(PodSpec("a"),), identity=IdentitySpec()), tag="mmi") as lab:
        print(lab.prefix, lab.ca_pid(), lab.sidecar_pid("a"), flush=True)
        signal.pause()
    """
)


def test_cleanup_stale_ends_the_ca_service_of_a_killed_lab() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=child_env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    prefix = ""
    try:
        assert child.stdout is not None
        words = child.stdout.readline().split()
        assert len(words) == 3, "the child lab did not start"
        prefix, pids = words[0], [int(word) for word in words[1:]]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert all(netns.alive(pid) for pid in pids), "the CA and the sidecar outlive a SIGKILLed lab"
        netns.cleanup_stale(prefix)
        assert not harness.leftovers(prefix)
        assert not [pid for pid in pids if netns.alive(pid)]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if prefix:
            netns.cleanup_stale(prefix)

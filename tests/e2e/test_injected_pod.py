"""End-to-end: what the injected manifest says is what works, run in the lab's namespaces instead of a cluster.

Two pods of deploy/examples/bookinfo-injected.yaml (productpage and details) are run from their own pod specs:
`inject.pod_commands` reads back the init container's and the proxy's (argv, env), and the lab runs exactly those,
`mtlsmesh iptables` as root and `mtlsmesh sidecar` as the proxy container's runAsUser/runAsGroup, each in its pod's
network namespace. The only changes are the ones a kubelet makes: the image's entrypoint `mtlsmesh` becomes
`python -m mtlsmesh`, and the in-pod paths of the volume mounts (/etc/mtlsmesh, /var/run/secrets/tokens,
/var/run/mtlsmesh/bundle) become the directories where the test laid out what those volumes hold
(`kubelet.translate_command`):
- the projected service-account token (identity mode, the injector's default), minted by the lab's API server for
  the pod's namespace and service account and written into the proxy container's mount only, re-projected before
  it expires; the sidecar enrols with it at the lab's `mtlsmesh ca serve` and renews with its SVID;
- the trust bundle ConfigMap `mtlsmesh-trust-bundle` with the lab CA's roots;
- the ConfigMap `mtlsmesh-config` that deploy/base's kustomization generates from deploy/base/config.yaml and
  config-secret.yaml, with only the mesh destinations' CIDRs changed from a cluster's pod and Service CIDRs to the
  lab's and the CA service's name to the lab's address for it.
The apps (the demo HTTP app standing in for bookinfo's images) run as uid 1000, after the sidecars are ready.

A third meshed pod, annotated, comes from a small manifest the test injects with `mtlsmesh inject`, to show its
`mtlsmesh.io/*` annotations take effect when run (and, without root, what its init step's `--dry-run` prints).
It is annotated `mtlsmesh.io/identity: secret`: its SVID is the Secret `mtlsmesh-svid-<serviceAccountName>`
exactly as `mtlsmesh ca issue ... --k8s-secret` prints it from the lab's CA directory, its base64 `data` decoded
into files with the volume's mode (so the Secret's name and keys must be the ones the pod mounts).
These pods are declared `mesh=False` in the topology: the lab leaves them alone and `Lab.start_pod` meshes them
from their pod specs. A fourth pod, outside, stays outside the mesh.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from mtlsmesh import inject
from mtlsmesh.conventions import METRICS_PORT
from mtlsmesh.lab import netns
from mtlsmesh.lab.pods import Lab, as_uid, child_env, http_get
from mtlsmesh.lab.topology import DEFAULT_APP_UID, AppSpec, IdentitySpec, PodSpec, ServiceSpec, Topology
from mtlsmesh.manifest import parse_manifests
from tests import kubelet
from tests.e2e import harness, podspecs
from tests.e2e.podspecs import APP_PORT, base_config_map, mesh_pod, mtlsmesh_cli, workload

ROOT = Path(__file__).resolve().parents[2]
INJECTED = ROOT / "deploy" / "examples" / "bookinfo-injected.yaml"
# lab pod -> the Deployment of bookinfo-injected.yaml it runs
WORKLOADS = {"productpage": "productpage-v1", "details": "details-v1"}
EXCLUDED_PORT = 9099
TOKEN_LIFETIME = 6

# Two workloads injected by the test itself, one with every capture annotation, one with the include lists.
ANNOTATED = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: annotated, namespace: default}
spec:
  selector: {matchLabels: {app: annotated}}
  template:
    metadata:
      labels: {app: annotated}
      annotations:
        mtlsmesh.io/exclude-inbound-ports: "9099, 9100"
        mtlsmesh.io/exclude-outbound-ports: "5432"
        mtlsmesh.io/exclude-outbound-cidrs: "198.18.5.0/24"
        mtlsmesh.io/inbound-mode: permissive
        mtlsmesh.io/identity: secret
    spec:
      serviceAccountName: annotated
      containers: [{name: app, image: app:1, ports: [{containerPort: 9080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain, namespace: default}
spec:
  selector: {matchLabels: {app: plain}}
  template:
    metadata:
      labels: {app: plain}
      annotations:
        mtlsmesh.io/include-inbound-ports: "9080"
        mtlsmesh.io/include-outbound-cidrs: "198.18.0.0/15"
    spec:
      serviceAccountName: plain
      containers: [{name: app, image: app:1, ports: [{containerPort: 9080}]}]
"""


TOPOLOGY = Topology(
    pods=(
        PodSpec("productpage", mesh=False),
        PodSpec("details", mesh=False),
        PodSpec("annotated", mesh=False),
        PodSpec("outside", mesh=False),
    ),
    services=(ServiceSpec("details", APP_PORT, "details", APP_PORT),),
    # The lab's API server mints tokens of at most 6 s (the pods ask for an hour), so they are re-projected during
    # the module's tests; SVIDs live a minute.
    identity=IdentitySpec(ttl="60s", token_lifetime=TOKEN_LIFETIME),
)


def inject_annotated(directory: Path) -> list[Any]:
    """ANNOTATED after `mtlsmesh inject -f`."""
    (directory / "app.yaml").write_text(ANNOTATED)
    return parse_manifests(mtlsmesh_cli("inject", "-f", "app.yaml", cwd=directory), "injected")


@pytest.fixture(scope="module", name="projector")
def projector_fixture() -> Iterator[kubelet.TokenProjector]:
    """The kubelet's token manager for the module's identity-mode pods (stopped after the lab)."""
    with kubelet.TokenProjector() as projector:
        yield projector


@pytest.fixture(scope="module", name="lab")
def lab_fixture(tmp_path_factory: pytest.TempPathFactory, projector: kubelet.TokenProjector) -> Iterator[Lab]:
    documents = parse_manifests(INJECTED.read_text(), INJECTED.name)
    config_map = base_config_map()
    lab = Lab(TOPOLOGY, tag="mmk")
    try:
        lab.start()
        for pod, name in WORKLOADS.items():
            mesh_pod(lab, pod, workload(documents, name), lab.ca_dir, config_map, projector)
        annotated = workload(inject_annotated(tmp_path_factory.mktemp("annotated")), "annotated")
        # The Secret-mode pod's SVID from the same CA the service signs with, so both kinds of pod trust each other.
        mesh_pod(lab, "annotated", annotated, lab.ca_dir, config_map)
        annotated_args = ("http", "--name", "annotated", "--port", str(APP_PORT), "--port", str(EXCLUDED_PORT))
        lab.start_app("annotated", AppSpec("http", annotated_args, (APP_PORT, EXCLUDED_PORT)))
        podspecs.start_bookinfo_apps(lab)
        yield lab
    finally:
        # Also when meshing a pod fails part-way: stop what was started, then prove nothing is left.
        pids = lab.processes()
        lab.close()
        harness.assert_nothing_left(lab, pids)


def bookinfo(name: str) -> dict[str, Any]:
    """A Deployment of bookinfo-injected.yaml."""
    return workload(parse_manifests(INJECTED.read_text(), INJECTED.name), name)


def spiffe_id_of(name: str) -> str:
    """The SPIFFE ID of a bookinfo workload, from its namespace and service account in the manifest."""
    return podspecs.spiffe_id(bookinfo(name))


@pytest.mark.root
def test_app_to_app_through_the_injected_sidecars_is_mtls(lab: Lab) -> None:
    productpage, details = spiffe_id_of("productpage-v1"), spiffe_id_of("details-v1")
    podspecs.assert_productpage_reaches_details_over_mtls(lab, productpage, details, "injected")


@pytest.mark.root
def test_plaintext_from_outside_the_mesh_is_refused(lab: Lab) -> None:
    # The shipped config is strict: as deploy/README.md says, a client without a sidecar gets a reset, not a page.
    harness.refused(lambda: harness.get(lab, "outside", lab.ip("details"), APP_PORT, "/from-outside"))
    assert "/from-outside" not in lab.app_log("details", "http")
    harness.wait_records(
        lab,
        "details",
        lambda r: r.get("client", "").startswith(f"{lab.ip('outside')}:") and r.get("decision") == "refuse",
    )


def issued(lab: Lab, spiffe_id: str) -> list[dict[str, str]]:
    records = harness.log_records(lab.ca_log())
    return [r for r in records if r.get("event") == "issued" and r.get("spiffe_id") == spiffe_id]


@pytest.mark.root
def test_each_proxy_gets_the_svid_of_its_service_account_from_the_ca_service(lab: Lab) -> None:
    for pod, name in WORKLOADS.items():
        ready = [r for r in harness.log_records(lab.sidecar_log(pod)) if r.get("event") == "ready"]
        assert [r.get("spiffe_id") for r in ready] == [spiffe_id_of(name)]
        # Enrolled with the projected token (the CA's log line), and no certificate or key file for it anywhere.
        assert [r["credential"] for r in issued(lab, spiffe_id_of(name))][:1] == ["token"]
        assert not [p for p in lab.pod_dir(pod).rglob("*") if p.name in ("key.pem", "cert.pem")]


@pytest.mark.root
def test_the_token_is_in_the_sidecars_view_only_and_kept_fresh(lab: Lab, projector: kubelet.TokenProjector) -> None:
    for pod in WORKLOADS:
        token_dir = lab.pod_dir(pod) / inject.PROXY_CONTAINER / inject.TOKEN_VOLUME
        token = token_dir / inject.TOKEN_FILE
        # Written as the kubelet writes it: root's file with the volume's mode, behind the `..data` link...
        assert token.is_symlink() and (token_dir / kubelet.DATA_LINK).is_symlink()
        assert (token.stat().st_uid, token.stat().st_mode & 0o777) == (0, 0o444)
        # ...in the proxy container's mounts only: no other container of the pod has a token file.
        others = [p for p in lab.pod_dir(pod).rglob(inject.TOKEN_FILE) if inject.PROXY_CONTAINER not in p.parts]
        assert others == []
        as_app = ["setpriv", f"--reuid={DEFAULT_APP_UID}", f"--regid={DEFAULT_APP_UID}", "--clear-groups"]
        done = subprocess.run([*as_app, "cat", str(token)], capture_output=True, timeout=10, check=False)
        assert done.returncode != 0 and not done.stdout, "the app's uid can read the sidecar's token"
        # Re-projected before it expired: the lab's API server mints 6 s tokens, renewed at 80 % of that.
        deadline = time.monotonic() + 4 * TOKEN_LIFETIME
        while len(projector.refreshes(token_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(projector.refreshes(token_dir)) >= 2, projector.errors
        claims = jwt.decode(token.read_bytes(), options={"verify_signature": False})
        assert claims["exp"] > time.time() and claims["aud"] == [inject.TOKEN_AUDIENCE]
    assert projector.errors == []


@pytest.mark.root
def test_the_secret_mode_pod_reads_its_svid_from_the_secret(lab: Lab) -> None:
    # The kubelet writes Secret files as root with the volume's defaultMode; the proxy's uid reads them only
    # because the injector asks for 0444, and reads them through the `..data` symlink a Secret update swaps.
    svid_dir = lab.pod_dir("annotated") / inject.PROXY_CONTAINER / inject.SVID_VOLUME
    key = svid_dir / "key.pem"
    assert key.is_symlink() and (svid_dir / kubelet.DATA_LINK).is_symlink()
    info = key.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o444)
    annotated_id = "spiffe://cluster.local/ns/default/sa/annotated"
    ready = [r for r in harness.log_records(lab.sidecar_log("annotated")) if r.get("event") == "ready"]
    assert [r.get("spiffe_id") for r in ready] == [annotated_id]
    assert issued(lab, annotated_id) == []  # not from the CA service
    # The Secret-mode pod calls an identity-mode pod over mTLS: both chain to the same roots.
    marker = harness.unique_marker("secret-mode")
    status, body = harness.get(lab, "annotated", lab.ip("details"), APP_PORT, "/from-secret-mode", marker)
    assert (status, json.loads(body)["marker"]) == (200, marker)
    harness.wait_records(
        lab,
        "details",
        lambda r: r.get("dir") == "inbound" and r.get("peer_id") == annotated_id and r.get("decision") == "mtls",
    )


@pytest.mark.root
@pytest.mark.parametrize("pod", list(WORKLOADS))
def test_the_proxy_answers_its_manifest_probes_and_ports(lab: Lab, pod: str) -> None:
    # What the kubelet would do with the proxy container: its probes, from the node, must answer 200; every port it
    # declares must be listening on the pod's address.
    proxy = kubelet.container(bookinfo(WORKLOADS[pod])["spec"]["template"]["spec"], inject.PROXY_CONTAINER)
    for probe_name in ("startupProbe", "readinessProbe"):
        probe = proxy[probe_name]
        assert isinstance(probe, dict)
        target = probe["httpGet"]
        status, _ = lab_http_get(lab, pod, target["port"], target["path"])
        assert status == 200, f"{probe_name} {target}"
    ports = proxy["ports"]
    assert isinstance(ports, list) and ports
    for port in ports:
        netns.connect_in(lab.node_ns, lab.ip(pod), port["containerPort"], timeout=5.0).close()
    status, body = lab_http_get(lab, pod, METRICS_PORT, "/stats/prometheus")
    assert status == 200 and body


def lab_http_get(lab: Lab, pod: str, port: int, path: str) -> tuple[int, bytes]:
    return http_get(lab.node_ns, lab.ip(pod), port, path, timeout=5.0)


@pytest.mark.root
def test_annotations_take_effect_when_run(lab: Lab) -> None:
    # inbound-mode: permissive reaches the proxy as MTLSMESH_INBOUND_MODE: plaintext from outside is let through.
    marker = harness.unique_marker("permissive")
    status, body = harness.get(lab, "outside", lab.ip("annotated"), APP_PORT, "/permissive", marker)
    assert (status, json.loads(body)["marker"]) == (200, marker)
    harness.wait_records(
        lab,
        "annotated",
        lambda r: (
            r.get("client", "").startswith(f"{lab.ip('outside')}:")
            and r.get("orig_dst") == f"{lab.ip('annotated')}:{APP_PORT}"
            and r.get("decision") == "passthrough"
        ),
    )
    # exclude-inbound-ports: the init step's rules let the port bypass the sidecar altogether.
    status, _ = harness.get(lab, "outside", lab.ip("annotated"), EXCLUDED_PORT, "/excluded")
    assert status == 200
    assert f"peer={lab.ip('outside')}:" in lab.app_log("annotated", "http")  # no sidecar in between
    assert not [
        r
        for r in harness.log_records(lab.sidecar_log("annotated"))
        if r.get("orig_dst", "").endswith(f":{EXCLUDED_PORT}")
    ]
    rules = lab.nat_rules("annotated")
    assert f"tcp dpt:{EXCLUDED_PORT}" in rules and "MTLSMESH_INBOUND" in rules


INBOUND_RETURN = "-A MTLSMESH_INBOUND -p tcp -m tcp --dport {} -j RETURN"
OUTBOUND_PORT_RETURN = "-A MTLSMESH_OUTPUT -p tcp -m tcp --dport {} -j RETURN"


@pytest.fixture(scope="module", name="annotated")
def annotated_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, str]]]:
    """Inject ANNOTATED with `mtlsmesh inject`, then run each init container's own command with `--dry-run`:
    {deployment: (printed rules, proxy env)}."""
    injected = inject_annotated(tmp_path_factory.mktemp("annotated"))
    results: dict[str, tuple[str, dict[str, str]]] = {}
    for name in ("annotated", "plain"):
        pod_spec = workload(injected, name)["spec"]["template"]["spec"]
        (init_argv, init_env), (_, proxy_env) = inject.pod_commands(pod_spec)
        assert init_argv == ["mtlsmesh", "iptables"]
        argv, env = kubelet.translate_command(
            (init_argv, init_env), {}, entrypoint="mtlsmesh", local_entrypoint=[sys.executable, "-m", "mtlsmesh"]
        )
        done = subprocess.run(
            [*argv, "--dry-run"],
            env={**child_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        results[name] = (done.stdout, proxy_env)
    return results


@pytest.mark.parametrize(
    ("deployment", "present", "absent"),
    [
        (
            "annotated",
            [
                INBOUND_RETURN.format(9099),
                INBOUND_RETURN.format(9100),
                OUTBOUND_PORT_RETURN.format(5432),
                "-A MTLSMESH_OUTPUT -d 198.18.5.0/24 -j RETURN",
                "-A MTLSMESH_INBOUND -p tcp -j MTLSMESH_IN_REDIRECT",  # every other inbound port is captured
                "-A MTLSMESH_OUTPUT -j MTLSMESH_REDIRECT",  # and every other destination
            ],
            ["--dport 9080 -j MTLSMESH_IN_REDIRECT"],
        ),
        (
            "plain",
            [
                "-A MTLSMESH_INBOUND -p tcp -m tcp --dport 9080 -j MTLSMESH_IN_REDIRECT",
                "-A MTLSMESH_OUTPUT -d 198.18.0.0/15 -j MTLSMESH_REDIRECT",
            ],
            [
                INBOUND_RETURN.format(9099),
                OUTBOUND_PORT_RETURN.format(5432),
                "-A MTLSMESH_INBOUND -p tcp -j MTLSMESH_IN_REDIRECT",
                "-A MTLSMESH_OUTPUT -j MTLSMESH_REDIRECT",
            ],
        ),
    ],
)
def test_init_dry_run_prints_the_annotations_rules(
    annotated: dict[str, tuple[str, dict[str, str]]], deployment: str, present: list[str], absent: list[str]
) -> None:
    rules, _ = annotated[deployment]
    ipv4 = rules.split("# ipv6", 1)[0]
    lines = set(ipv4.splitlines())
    for line in present:
        assert line in lines, f"{deployment}: missing {line!r} in:\n{ipv4}"
    for text in absent:
        assert text not in ipv4, f"{deployment}: unexpected {text!r} in:\n{ipv4}"
    # The never-captured health and metrics ports are always excluded.
    assert {INBOUND_RETURN.format(15021), INBOUND_RETURN.format(15090)} <= lines


@pytest.mark.parametrize(("deployment", "mode"), [("annotated", "permissive"), ("plain", None)])
def test_inbound_mode_annotation_reaches_the_proxy(
    annotated: dict[str, tuple[str, dict[str, str]]], deployment: str, mode: str | None
) -> None:
    _, proxy_env = annotated[deployment]
    assert proxy_env.get("MTLSMESH_INBOUND_MODE") == mode


@pytest.mark.root
def test_the_admin_token_is_in_the_proxys_emptydir_and_drain_uses_it(lab: Lab) -> None:
    # Last in this module: it drains details. As `kubectl exec deploy/details-v1 -c mtlsmesh-proxy -- mtlsmesh
    # drain` runs: in the pod, as the proxy container's uid, with the token the sidecar wrote in its emptyDir.
    admin_dir = lab.pod_dir("details") / inject.PROXY_CONTAINER / inject.ADMIN_VOLUME
    token = admin_dir / "token"
    info = token.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (1337, 0o600)
    others = [p for p in lab.pod_dir("details").rglob("token") if inject.PROXY_CONTAINER not in p.parts]
    assert others == []  # no other container of the pod mounts it
    spec = bookinfo(WORKLOADS["details"])["spec"]["template"]["spec"]
    uid, gid = kubelet.run_as(spec, inject.PROXY_CONTAINER)

    def in_pod(run_as: tuple[int, int], *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mtlsmesh", *args, "--token-file", str(token)]
        argv = netns.ns_exec(lab.pod_ns("details"), as_uid(run_as[0], command, gid=run_as[1]))
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env())

    def in_proxy(*args: str) -> subprocess.CompletedProcess[str]:
        return in_pod((uid, gid), *args)

    as_app = in_pod((DEFAULT_APP_UID, DEFAULT_APP_UID), "drain")
    assert as_app.returncode == 2 and "permission denied (run as uid 1337 or root)" in as_app.stderr
    changed = in_proxy("log-level", "info", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)[0]["log_level"] == "info"
    drained = in_proxy("drain", "--json")
    assert drained.returncode == 0, drained.stderr
    assert json.loads(drained.stdout)[0]["draining"] is True
    assert lab_http_get(lab, "details", 15021, "/healthz/ready")[0] == 503
    assert netns.alive(lab.sidecar_pid("details"))

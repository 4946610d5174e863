"""Running a pod from its own pod spec in the lab, as a cluster would, and the bookinfo check both injectors share.

The end-to-end tests of the injected manifest (`test_injected_pod.py`, the CLI's pods) and of the admission webhook
(`test_webhook_pod.py`, the pods it patches) run the same way: the init container's and the proxy's own (argv,
env) from the pod spec (`inject.pod_commands`), their volumes laid out as the kubelet would (`tests.kubelet`) from
the ConfigMaps deploy/base generates, with only the mesh CIDRs and the CA service's address changed to the lab's,
and, by the pod's SVID source:
- identity mode (the default): the projected token minted by the lab's API server (`Lab.mint_token`) for the
  pod's namespace and service account, laid out for the proxy container only, in a directory only the proxy's uid
  may enter (the lab has no mount namespaces: that is what stands in for a mount the app's containers do not
  have), and projected again before it expires (`kubelet.TokenProjector`); the bundle ConfigMap holds the lab
  CA's roots, as the CA service keeps it;
- Secret mode (`mtlsmesh.io/identity: secret`): the SVID Secret `mtlsmesh ca issue --k8s-secret` prints.

`assert_productpage_reaches_details_over_mtls` is deploy/README.md's check:
productpage's app calls the details Service in plaintext, and the wire between them carries only TLS records.

What it does not: build the lab (the test modules' fixtures do, through `harness`) or decide which pods to mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mtlsmesh import inject, pem
from mtlsmesh.addresses import host_port
from mtlsmesh.caproto import CA_PORT
from mtlsmesh.conventions import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE
from mtlsmesh.errors import ConfigError
from mtlsmesh.lab.pods import Lab, child_env
from mtlsmesh.lab.topology import CA_ADDRESS, POD_NETWORK, SERVICE_NETWORK, AppSpec
from tests import kubelet
from tests.e2e import harness

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
APP_PORT = 9080
APP_UID = 1000


def mtlsmesh_cli(*args: str, cwd: Path) -> str:
    """Run the `mtlsmesh` command as a user would, and return its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"mtlsmesh {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}"
    return done.stdout


def workload(documents: list[Any], name: str) -> dict[str, Any]:
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Deployment"]
    matches = [d for d in found if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"Deployment {name} not found once in the manifest"
    return matches[0]


def lab_config_text(text: str) -> str:
    """deploy/base/config.yaml (or config-secret.yaml) for the lab: the config names a cluster's pod and Service
    CIDRs (10.244.0.0/16, 10.96.0.0/12) as the mesh's destinations; the lab's pods and Service VIPs live in
    198.18.0.0/24 and 198.19.0.0/24 instead. The CA service's Service name, which a cluster's DNS resolves, becomes
    the address the lab runs it on. Only those change; everything else is the shipped config."""
    config = yaml.safe_load(text)
    destinations = config["outbound"]["destinations"]
    assert destinations and all("cidrs" in d for d in destinations), "the shipped config has no mesh CIDRs"
    for destination in destinations:
        destination["cidrs"] = [str(POD_NETWORK), str(SERVICE_NETWORK)]
    if "identity" in config:
        assert config["identity"]["ca_address"] == f"mtlsmesh-ca.mtlsmesh-system.svc:{CA_PORT}"
        config["identity"]["ca_address"] = host_port(str(CA_ADDRESS), CA_PORT)
    return yaml.safe_dump(config, sort_keys=False)


def base_config_map() -> dict[str, Any]:
    """The ConfigMap `kubectl apply -k deploy/base` creates for the sidecars (from its configMapGenerator), with the
    lab's CIDRs (`lab_config_text`)."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    generators = [g for g in kustomization["configMapGenerator"] if g["name"] == inject.CONFIG_MAP]
    assert len(generators) == 1, f"deploy/base generates no ConfigMap {inject.CONFIG_MAP}"
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # the pods mount it by this name
    data: dict[str, str] = {}
    for entry in generators[0]["files"]:
        key, _, path = entry.rpartition("=")  # "key=path" or just "path"
        text = (BASE / path).read_text()
        data[key or Path(path).name] = lab_config_text(text) if path.startswith("config") else text
    metadata = {"name": generators[0]["name"], "namespace": generators[0].get("namespace", "default")}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def pod_spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec of a Pod, or of a Deployment's pod template."""
    spec: dict[str, Any] = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def local_config(mount: kubelet.Mount, local_dirs: Mapping[str, str]) -> kubelet.Mount:
    """The config volume with the file paths of each config's `identity` section (the token, the bundle) mapped to
    where the lab laid out those mounts: what `kubelet.translate_command` does for argv, for the one place a path
    is named inside a file. The lab has no mount namespaces; in a pod the paths are right as they are. A config
    naming paths the container does not mount (config.yaml in a Secret-mode pod) is not the one it runs with, and
    is left as it is."""
    files = []
    for item in mount.files:
        config = yaml.safe_load(item.data)
        identity = config.get("identity") if isinstance(config, dict) else None
        if isinstance(identity, dict):
            try:
                local = {key: kubelet.translate_path(identity[key], local_dirs) for key in ("token", "bundle")}
            except ConfigError:
                local = {}
            if local:
                identity.update(local)
                item = kubelet.MountedFile(item.name, yaml.safe_dump(config, sort_keys=False).encode(), item.mode)
        files.append(item)
    return dataclasses.replace(mount, files=tuple(files))


def bundle_config_map(lab: Lab, namespace: str = "default") -> dict[str, Any]:
    """The trust bundle ConfigMap as the CA service keeps it: the lab CA's roots."""
    assert lab.authority is not None
    data = {"bundle.pem": pem.render_certificates(lab.authority.roots).decode()}
    metadata = {"name": inject.BUNDLE_CONFIG_MAP, "namespace": namespace}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def mesh_pod(
    lab: Lab,
    pod: str,
    obj: Mapping[str, Any],
    ca_dir: Path,
    config_map: dict[str, Any],
    projector: kubelet.TokenProjector | None = None,
) -> None:
    """Do for one pod (a Pod, or a Deployment's template) what the cluster would: create its SVID Secret (Secret
    mode) or mint its token (identity mode: the lab must be in identity mode, and `projector` keeps the token
    fresh), mount its volumes, run its mesh containers."""
    namespace = obj["metadata"].get("namespace", "default")
    pod_spec = pod_spec_of(obj)
    account = pod_spec.get("serviceAccountName", "default")
    volumes = {v["name"] for v in pod_spec.get("volumes", [])}
    objects = [config_map]
    if inject.SVID_VOLUME in volumes:
        secret_text = mtlsmesh_cli(
            "ca", "issue", "--ca-dir", str(ca_dir), "--namespace", namespace, "--service-account", account,
            "--k8s-secret", cwd=ca_dir,
        )  # fmt: skip
        objects.append(yaml.safe_load(secret_text))
    if inject.BUNDLE_VOLUME in volumes:
        objects.append(bundle_config_map(lab, namespace))
    pod_name = obj["metadata"].get("name") or obj["metadata"].get("generateName", "pod")

    def mint(audience: str, seconds: int) -> str:
        return lab.mint_token(namespace, account, pod_name, audience=audience, seconds=seconds)

    uid, gid = kubelet.run_as(pod_spec, inject.PROXY_CONTAINER)
    init, proxy = inject.pod_commands(pod_spec)
    local_entrypoint = [lab.python, "-m", "mtlsmesh"]
    commands = []
    for name, command in ((inject.INIT_CONTAINER, init), (inject.PROXY_CONTAINER, proxy)):
        mounts = kubelet.container_mounts(pod_spec, name, objects, namespace=namespace, mint=mint)
        local_dirs = {mount.mount_path: str(lab.pod_dir(pod) / name / mount.volume) for mount in mounts}
        for mount in mounts:
            if mount.volume == inject.CONFIG_VOLUME:
                mount = local_config(mount, local_dirs)
            directory = Path(local_dirs[mount.mount_path])
            kubelet.write_volume(mount, directory)
            if mount.tokens:
                # Only this container has the mount: only its uid may enter the directory.
                assert name == inject.PROXY_CONTAINER, f"{name} mounts the token volume {mount.volume}"
                os.chown(directory, uid, gid)
                directory.chmod(0o500)
                assert projector is not None, "a pod with a projected token needs a TokenProjector"
                projector.add(directory, mount, mint)
            if mount.kind == "emptyDir":
                directory.chmod(0o777)  # as the kubelet makes an emptyDir: any uid of the pod may write there
        argv, env = kubelet.translate_command(
            command, local_dirs, entrypoint="mtlsmesh", local_entrypoint=local_entrypoint
        )
        if name == inject.PROXY_CONTAINER:
            # The sidecar's built-in token path, translated as the paths of its command line are: in the pod the
            # directory exists (the admin emptyDir), here it is that volume's local directory.
            env = {**env, ADMIN_TOKEN_ENV: kubelet.translate_path(ADMIN_TOKEN_FILE, local_dirs)}
        commands.append((argv, env))
    assert kubelet.run_as(pod_spec, inject.INIT_CONTAINER) == (0, 0)  # the lab runs the init step as root
    lab.start_pod(pod, init=commands[0], proxy=commands[1], proxy_uid=uid, proxy_gid=gid)


def spiffe_id(obj: Mapping[str, Any]) -> str:
    """The SPIFFE ID a meshed pod serves: from its namespace and service account."""
    namespace = obj["metadata"].get("namespace", "default")
    return f"spiffe://cluster.local/ns/{namespace}/sa/{pod_spec_of(obj).get('serviceAccountName', 'default')}"


def start_bookinfo_apps(lab: Lab) -> None:
    """The demo HTTP app standing in for details and productpage (which calls the details Service), as uid 1000,
    once both pods' sidecars are up."""
    lab.start_app("details", AppSpec("http", ("http", "--name", "details", "--port", str(APP_PORT)), (APP_PORT,)))
    upstream = f"details=http://{lab.vip('details')}:{APP_PORT}/details/0"
    productpage_args = ("http", "--name", "productpage", "--port", str(APP_PORT), "--call", upstream)
    lab.start_app("productpage", AppSpec("http", productpage_args, (APP_PORT,), uid=APP_UID))


def assert_productpage_reaches_details_over_mtls(lab: Lab, productpage_id: str, details_id: str, tag: str) -> None:
    marker = harness.unique_marker(tag)
    with lab.capture("details") as pcap_path:
        # As deploy/README.md's check does (`kubectl exec ... urlopen('http://localhost:9080/productpage')`): the
        # productpage app, uid 1000, then calls the details Service in plaintext; the mesh does the rest.
        status, body = harness.get(lab, "productpage", "127.0.0.1", APP_PORT, "/productpage", marker)
    assert status == 200
    reply = json.loads(body)
    assert reply["service"] == "productpage"
    details = reply["upstreams"]["details"]
    assert details.get("status") == 200, details  # the productpage app reached details through both sidecars
    assert details["body"]["service"] == "details"
    assert details["body"]["marker"] == marker  # details' app received the marker in plaintext
    details_log = lab.app_log("details", "http")
    assert marker in details_log
    assert "peer=127.0.0.6:" in details_log  # delivered by details' inbound sidecar, not straight from productpage
    # On details' link only TLS records and never the marker; each sidecar authenticated the other as the service
    # account its pod spec gives it.
    harness.assert_encrypted_hop(lab, pcap_path, "details", APP_PORT, marker, productpage_id)
    harness.wait_records(
        lab,
        "productpage",
        lambda r: (
            r.get("dir") == "outbound"
            and r.get("orig_dst") == f"{lab.vip('details')}:{APP_PORT}"
            and r.get("peer_id") == details_id
            and r.get("decision") == "mtls"
        ),
    )

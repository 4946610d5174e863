"""Sidecar injection: Kubernetes manifests in, the same manifests with every pod template meshed out.

For each pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
and those inside a `kind: List`) the injector prepends two init containers:

- `mtlsmesh-init` runs `mtlsmesh iptables` as root with only NET_ADMIN and NET_RAW, and installs the pod's capture
  rules; the `mtlsmesh.io/*` annotations become its `MTLSMESH_*` environment variables.
- `mtlsmesh-proxy` is the sidecar as a *native* sidecar (an init container with `restartPolicy: Always`, Kubernetes
  1.29 and later): it starts before the app, stays up beside it, and stops after it, so Jobs finish. It runs as the
  proxy uid (1337) and reads its config from the ConfigMap `mtlsmesh-config`. An emptyDir in memory
  (`mtlsmesh-admin`) at /var/run/mtlsmesh/admin, in the proxy container only, takes the admin port's POST token
  that the sidecar writes at start (its root filesystem is read-only), which `mtlsmesh drain` run in that
  container reads.

Where the proxy gets its SVID is the pod's `mtlsmesh.io/identity` annotation (default `InjectOptions.identity`):
- `ca` (the default): from the CA service. The pod gets a projected service-account token (audience `mtlsmesh-ca`,
  one hour, refreshed by the kubelet) and the trust bundle ConfigMap `mtlsmesh-trust-bundle`, both mounted into
  the proxy container only, never into the app's; the proxy runs with `config.yaml`, whose `identity:` section
  names the CA service, the token and the bundle. No certificate or key exists outside the proxy's memory.
- `secret`: from the Secret `mtlsmesh-svid-<service account>` that `mtlsmesh ca issue --k8s-secret` writes (for
  clusters without the CA service, offline); the proxy runs with `config-secret.yaml` and the SVID file flags.

A template already injected (it carries the `mtlsmesh.io/status` annotation) is stripped of what the injector added
and injected again, so running the injector twice gives the same bytes, and re-running it after an annotation or
image change updates the pod. Every other field and every other document is left as it was; key order is kept;
YAML comments are lost (PyYAML does not keep them) and empty documents are dropped.

`uninject_documents` is the exact inverse: it removes what the status annotation says was added, the annotation
itself, and the keys injection had to create (the status records which: `created` for keys that were absent,
`replacedNull` for keys that were null), so uninjecting an injected manifest gives back the input. A template that
was never injected is left as it is.

This module is pure: dicts in, dicts out, no files, no cluster; YAML text is `manifest`'s job and the annotations
are `annotations`'s; the admission webhook's review of a Pod is `admission`'s, which calls the same functions. It
does not create the Secrets or the ConfigMaps (see `deploy/README.md`), and it does not rewrite the app's kubelet
probes: it warns when a probe would reach a port the sidecar serves in strict mode.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtlsmesh import __version__
from mtlsmesh.annotations import (
    EXCLUDE_INBOUND_PORTS,
    IDENTITY_SOURCES,
    INBOUND_MODE,
    STATUS_ANNOTATION,
    CaptureSettings,
    identity_source,
    opted_out,
    parse_capture,
    read_annotations,
)
from mtlsmesh.conventions import (
    ADMIN_TOKEN_DIR,
    BUNDLE_FILE,
    CERT_FILE,
    HEALTH_PORT,
    INBOUND_PORT,
    KEY_FILE,
    METRICS_PORT,
    NEVER_CAPTURED_INBOUND,
    OUTBOUND_PORT,
    PROXY_GID,
    PROXY_UID,
    SIDECAR_PORTS,
    SVID_SECRET_PREFIX,
    InterceptionMode,
)
from mtlsmesh.errors import ConfigError
from mtlsmesh.manifest import parse_manifests, render_manifests

INIT_CONTAINER = "mtlsmesh-init"
PROXY_CONTAINER = "mtlsmesh-proxy"
SVID_VOLUME = "mtlsmesh-svid"
TOKEN_VOLUME = "mtlsmesh-token"
BUNDLE_VOLUME = "mtlsmesh-bundle"
CONFIG_VOLUME = "mtlsmesh-config"
INIT_RUN_VOLUME = "mtlsmesh-init-run"
ADMIN_VOLUME = "mtlsmesh-admin"
INJECTED_CONTAINERS = (INIT_CONTAINER, PROXY_CONTAINER)
INJECTED_VOLUMES = (SVID_VOLUME, TOKEN_VOLUME, BUNDLE_VOLUME, CONFIG_VOLUME, INIT_RUN_VOLUME, ADMIN_VOLUME)

IDENTITY_CA = "ca"  # the SVID from the CA service (`mtlsmesh.io/identity`, see the module docstring)
IDENTITY_SECRET = "secret"  # the SVID from the Secret `mtlsmesh ca issue --k8s-secret` writes

# Where the injected containers find their SVID and config (deploy/README.md): the SVID Secret is mounted here.
SVID_DIR = "/var/run/mtlsmesh/svid"
CONFIG_DIR = "/etc/mtlsmesh"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"  # with the `identity:` section
SECRET_CONFIG_FILE = f"{CONFIG_DIR}/config-secret.yaml"  # with the `credentials:` section
CONFIG_MAP = "mtlsmesh-config"
# Identity mode: the projected token (what config.yaml's identity.token names) and the trust bundle ConfigMap
# (identity.bundle), which the CA service keeps current. The audience and lifetime are the CA's and the kubelet's.
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = "mtlsmesh-token"
TOKEN_AUDIENCE = "mtlsmesh-ca"  # caproto.DEFAULT_AUDIENCE
TOKEN_EXPIRATION_SECONDS = 3600
BUNDLE_DIR = "/var/run/mtlsmesh/bundle"
BUNDLE_CONFIG_MAP = "mtlsmesh-trust-bundle"

# Kind -> (API groups it may come from, path from the document to its pod template). A kind from another group
# (a custom resource that happens to be called "Deployment") is not ours to touch.
_TEMPLATE_PATHS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "Pod": (frozenset({""}), ()),
    "ReplicationController": (frozenset({""}), ("spec", "template")),
    "Deployment": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "StatefulSet": (frozenset({"apps"}), ("spec", "template")),
    "DaemonSet": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "ReplicaSet": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "Job": (frozenset({"batch"}), ("spec", "template")),
    "CronJob": (frozenset({"batch"}), ("spec", "jobTemplate", "spec", "template")),
}

_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")

JsonDict = dict[str, Any]
CommandLine = tuple[list[str], dict[str, str]]  # (argv, environment) of one container


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """What the injected containers look like; the defaults follow the mesh's Kubernetes conventions."""

    image: str = f"mtlsmesh/mtlsmesh:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_GID
    proxy_cpu_request: str = "50m"
    proxy_memory_request: str = "64Mi"
    proxy_memory_limit: str = "256Mi"
    init_cpu_request: str = "10m"
    init_memory_request: str = "32Mi"
    init_memory_limit: str = "128Mi"
    identity: str = IDENTITY_CA  # for pods without the mtlsmesh.io/identity annotation: IDENTITY_CA or IDENTITY_SECRET

    def __post_init__(self) -> None:
        if self.identity not in IDENTITY_SOURCES:
            raise ConfigError("identity", f"expected one of {', '.join(IDENTITY_SOURCES)}, got {self.identity!r}")


SKIP_OPTED_OUT = "opted_out"  # mtlsmesh.io/inject: "false"
SKIP_HOST_NETWORK = "host_network"


@dataclass(frozen=True, slots=True)
class InjectResult:
    """The documents after injection, plus what a person should know about them."""

    documents: tuple[object, ...]
    injected: tuple[str, ...]  # "Deployment default/reviews" for each template injected
    warnings: tuple[str, ...]
    # ("Deployment default/reviews", SKIP_OPTED_OUT or SKIP_HOST_NETWORK) for each pod template left alone
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class InjectedText:
    text: str
    injected: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UninjectResult:
    """The documents with the mesh taken out again, and which templates it was taken out of."""

    documents: tuple[object, ...]
    uninjected: tuple[str, ...]  # "Deployment default/reviews" for each template uninjected


@dataclass(frozen=True, slots=True)
class UninjectedText:
    text: str
    uninjected: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Template:
    """One pod template found in a document: the workload that holds it, and the template itself (the same
    mapping for a bare Pod)."""

    kind: str
    name: str  # "namespace/name" of the workload
    label: str  # where it is, for errors: "app.yaml: document 2 (Deployment default/reviews)"
    workload: JsonDict
    template: JsonDict


# ---------------------------------------------------------------------------------------------------------------
# Text in, text out


def inject_text(text: str, *, source: str, options: InjectOptions | None = None) -> InjectedText:
    """Parse, inject and render: what `mtlsmesh inject` does between reading and writing."""
    result = inject_documents(parse_manifests(text, source), source=source, options=options)
    return InjectedText(render_manifests(result.documents), result.injected, result.warnings)


# ---------------------------------------------------------------------------------------------------------------
# Documents


def inject_documents(
    documents: Sequence[object], *, source: str = "<input>", options: InjectOptions | None = None
) -> InjectResult:
    """Inject every pod template in `documents` (not changed: the result holds deep copies)."""
    opts = options if options is not None else InjectOptions()
    tally = _Tally()
    out: list[object] = []
    for index, doc in enumerate(documents, start=1):
        doc_copy = copy.deepcopy(doc)
        for found in _pod_templates(doc_copy, f"{source}: document {index}"):
            _inject_template(found, opts, tally)
        out.append(doc_copy)
    return InjectResult(tuple(out), tuple(tally.injected), tuple(tally.warnings), tuple(tally.skipped))


@dataclass(slots=True)
class _Tally:
    """What `inject_documents` reports, gathered template by template."""

    injected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _pod_templates(doc: object, where: str) -> Iterator[_Template]:
    """Every pod template of a document (the items of a List one by one), in order; kinds from other API groups
    and documents that are not workloads yield nothing. Raises `ConfigError` when the path to a template is broken."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        for index, item in enumerate(doc["items"], start=1):
            yield from _pod_templates(item, f"{where} item {index}")
        return
    if not isinstance(kind, str) or kind not in _TEMPLATE_PATHS:
        return
    groups, path = _TEMPLATE_PATHS[kind]
    api_version = doc.get("apiVersion")
    group = api_version.rpartition("/")[0] if isinstance(api_version, str) else None
    if group not in groups:
        return
    name = _object_name(doc)
    label = f"{where} ({kind} {name})"
    template: object = doc
    walked: list[str] = []
    for key in path:
        walked.append(key)
        template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise ConfigError(label, f"{'.'.join(walked)}: expected a mapping")
    assert isinstance(template, dict)
    yield _Template(kind, name, label, doc, template)


def _inject_template(found: _Template, opts: InjectOptions, tally: _Tally) -> None:
    label, template = found.label, found.template
    workload = f"{found.kind} {found.name}"
    workload_annotations = read_annotations(found.workload, label)
    nested = template is not found.workload
    template_annotations = read_annotations(template, label) if nested else workload_annotations
    if opted_out(workload_annotations, label) or opted_out(template_annotations, label):
        tally.skipped.append((workload, SKIP_OPTED_OUT))
        return
    spec = template.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(label, f"{'.'.join([*_TEMPLATE_PATHS[found.kind][1], 'spec'])}: expected a mapping")
    if spec.get("hostNetwork") is True:
        tally.warnings.append(
            f"{label}: skipped: hostNetwork pods share the node's network, capture would hit the node"
        )
        tally.skipped.append((workload, SKIP_HOST_NETWORK))
        return
    merged = {**workload_annotations, **template_annotations}
    capture = parse_capture(merged, label)
    source = identity_source(merged, label, opts.identity)
    record = _Record()
    if STATUS_ANNOTATION in template_annotations:
        # What the first injection had to create is still ours to remove on uninject: carry its record over.
        record = _read_status(template_annotations[STATUS_ANNOTATION], label).record
        _strip(spec)
    _check_pod(spec, label, opts)
    tally.warnings.extend(_probe_warnings(spec, capture, label))
    record = record.merged(_inject_spec(spec, capture, opts, source))
    _set_status(template, opts, record, source)
    tally.injected.append(workload)


def _object_name(doc: JsonDict) -> str:
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        return "<unnamed>"
    name = str(metadata.get("name", "<unnamed>"))
    namespace = metadata.get("namespace")
    return f"{namespace}/{name}" if namespace else name


# ---------------------------------------------------------------------------------------------------------------
# Checks on the app's pod spec


def _containers(spec: JsonDict, label: str) -> Iterator[tuple[str, JsonDict]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        items = spec.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ConfigError(label, f"spec.{key}: expected a list")
        for item in items:
            if not isinstance(item, dict):
                raise ConfigError(label, f"spec.{key}: expected a list of mappings")
            yield key, item


def _check_run_as(context: object, who: str, label: str, opts: InjectOptions) -> None:
    """A securityContext (the pod's or a container's) must not run as the proxy's uid or gid."""
    if not isinstance(context, dict):
        return
    for key, what, proxy_id in (("runAsUser", "uid", opts.proxy_uid), ("runAsGroup", "gid", opts.proxy_gid)):
        if context.get(key) == proxy_id:
            raise ConfigError(
                label,
                f"{who} runs as {what} {proxy_id}, the proxy's {what}: the capture "
                f"rules let that {what}'s traffic bypass the mesh; choose another {what}",
            )


def _check_pod(spec: JsonDict, label: str, opts: InjectOptions) -> None:
    """Refuse what would break the mesh: the proxy's uid or gid, our names, our ports."""
    _check_run_as(spec.get("securityContext"), "the pod's securityContext", label, opts)
    for key, container in _containers(spec, label):
        name = container.get("name", "<unnamed>")
        if name in INJECTED_CONTAINERS:
            raise ConfigError(label, f"spec.{key} already has a container named {name!r}, a name the injector uses")
        _check_run_as(container.get("securityContext"), f"container {name!r}", label, opts)
        ports = container.get("ports")
        if ports is not None and not isinstance(ports, list):
            raise ConfigError(label, f"container {name!r}: ports: expected a list (got {ports!r})")
        for entry in ports or ():
            port = _port_entry(entry, name, label)
            # The sidecar binds these in the pod's network namespace: an app container must not claim them.
            if port.get("containerPort") in SIDECAR_PORTS:
                raise ConfigError(
                    label,
                    f"container {name!r} declares port {port['containerPort']}, which the proxy binds "
                    f"(reserved: {', '.join(map(str, sorted(SIDECAR_PORTS)))})",
                )
    volumes = spec.get("volumes")
    for volume in volumes if isinstance(volumes, list) else ():
        if isinstance(volume, dict) and volume.get("name") in INJECTED_VOLUMES:
            raise ConfigError(
                label, f"spec.volumes already has a volume named {volume['name']!r}, a name the injector uses"
            )


def _port_entry(port: object, name: object, label: str) -> JsonDict:
    """A container's ports entry is a mapping with an integer containerPort and a string name (the Kubernetes
    schema): anything else is refused here rather than failing somewhere later."""
    if not isinstance(port, dict):
        raise ConfigError(label, f"container {name!r}: ports: expected a list of mappings (got {port!r})")
    number, port_name = port.get("containerPort"), port.get("name")
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(label, f"container {name!r}: containerPort: expected an integer (got {number!r})")
    if port_name is not None and not isinstance(port_name, str):
        raise ConfigError(label, f"container {name!r}: ports name: expected a string (got {port_name!r})")
    return port


def _probe_warnings(spec: JsonDict, capture: CaptureSettings, label: str) -> list[str]:
    """Kubelet probes come in plaintext from the node: in strict mode the sidecar refuses them on captured ports."""
    if capture.inbound_mode in ("permissive", "disable"):
        return []
    excluded = {*(int(p) for p in capture.exclude_inbound_ports.split(",") if p), *NEVER_CAPTURED_INBOUND}
    included = None if capture.inbound_ports == "*" else {int(p) for p in capture.inbound_ports.split(",") if p}
    warnings: list[str] = []
    for key, container in _containers(spec, label):
        if key != "containers":
            continue
        named = {
            port.get("name"): port.get("containerPort")
            for port in container.get("ports") or ()
            if isinstance(port, dict) and port.get("name")
        }
        for probe_name in _PROBES:
            probe = container.get(probe_name)
            if not isinstance(probe, dict):
                continue
            for action in ("httpGet", "tcpSocket", "grpc"):
                target = probe.get(action)
                if not isinstance(target, dict):
                    continue
                port = target.get("port")
                port = named.get(port, port) if isinstance(port, str) else port
                if not isinstance(port, int) or port in excluded or (included is not None and port not in included):
                    continue
                warnings.append(
                    f"{label}: container {container.get('name')!r}: {probe_name} reaches port {port} in plaintext "
                    f"from the kubelet; in strict inbound mode the sidecar refuses it: set {INBOUND_MODE}: "
                    f"permissive or add the port to {EXCLUDE_INBOUND_PORTS}"
                )
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Adding and removing the mesh


def _strip(spec: JsonDict) -> None:
    """Remove what an earlier injection added, keeping the keys (and so their place in the mapping)."""
    init_containers = spec.get("initContainers")
    if isinstance(init_containers, list):
        init_containers[:] = [
            c for c in init_containers if not (isinstance(c, dict) and c.get("name") in INJECTED_CONTAINERS)
        ]
    volumes = spec.get("volumes")
    if isinstance(volumes, list):
        volumes[:] = [v for v in volumes if not (isinstance(v, dict) and v.get("name") in INJECTED_VOLUMES)]


def _env(pairs: Sequence[tuple[str, str]]) -> list[JsonDict]:
    return [{"name": name, "value": value} for name, value in pairs]


def _init_container(capture: CaptureSettings, opts: InjectOptions) -> JsonDict:
    env = [
        ("MTLSMESH_PROXY_UID", str(opts.proxy_uid)),
        ("MTLSMESH_PROXY_GID", str(opts.proxy_gid)),
        ("MTLSMESH_OUTBOUND_PORT", str(OUTBOUND_PORT)),
        ("MTLSMESH_INBOUND_PORT", str(INBOUND_PORT)),
        ("MTLSMESH_INBOUND_PORTS", capture.inbound_ports),
        ("MTLSMESH_EXCLUDE_INBOUND_PORTS", capture.exclude_inbound_ports),
        ("MTLSMESH_EXCLUDE_OUTBOUND_PORTS", capture.exclude_outbound_ports),
        ("MTLSMESH_INCLUDE_OUTBOUND_CIDRS", capture.include_outbound_cidrs),
        ("MTLSMESH_EXCLUDE_OUTBOUND_CIDRS", capture.exclude_outbound_cidrs),
        # Named only for TPROXY (REDIRECT is the init step's default), with the same value as the proxy's.
        *(
            [("MTLSMESH_INTERCEPTION_MODE", capture.interception_mode)]
            if capture.interception_mode != "REDIRECT"
            else []
        ),
    ]
    return {
        "name": INIT_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["mtlsmesh"],
        "args": ["iptables"],
        "env": _env(env),
        "resources": {
            "requests": {"cpu": opts.init_cpu_request, "memory": opts.init_memory_request},
            "limits": {"memory": opts.init_memory_limit},
        },
        "securityContext": {
            # Root, but with nothing beyond what installing netfilter rules needs.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        # iptables-legacy takes its lock in /run; a small tmpfs keeps the root filesystem read-only.
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
    }


def _proxy_container(capture: CaptureSettings, opts: InjectOptions, source: str) -> JsonDict:
    env = [("MTLSMESH_INBOUND_MODE", capture.inbound_mode)] if capture.inbound_mode is not None else []
    tproxy = capture.interception_mode == InterceptionMode.TPROXY.value
    if tproxy:  # the same mode as the init step's; only TPROXY is named, REDIRECT is the config's default
        env.append(("MTLSMESH_INTERCEPTION_MODE", capture.interception_mode))
    probe = {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}}
    container: JsonDict = {
        "name": PROXY_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        # A native sidecar: runs beside the app for the pod's whole life (Kubernetes >= 1.29).
        "restartPolicy": "Always",
        "command": ["mtlsmesh"],
        "args": ["sidecar", "--config", CONFIG_FILE]
        if source == IDENTITY_CA
        else [
            "sidecar",
            "--config",
            SECRET_CONFIG_FILE,
            "--cert",
            f"{SVID_DIR}/{CERT_FILE}",
            "--key",
            f"{SVID_DIR}/{KEY_FILE}",
            "--bundle",
            f"{SVID_DIR}/{BUNDLE_FILE}",
        ],
    }
    if env:
        container["env"] = _env(env)
    container.update(
        {
            "ports": [
                {"name": "mesh-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                {"name": "mesh-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            # The app starts only once the sidecar is ready, so its first connections are not refused.
            "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 60},
            "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
            "resources": {
                "requests": {"cpu": opts.proxy_cpu_request, "memory": opts.proxy_memory_request},
                "limits": {"memory": opts.proxy_memory_limit},
            },
            "securityContext": {
                "runAsUser": opts.proxy_uid,
                "runAsGroup": opts.proxy_gid,
                "runAsNonRoot": True,
                "privileged": False,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                # TPROXY: a transparent listener and transparent, marked dials to the app need NET_ADMIN (as
                # Istio's proxy gets in that mode); REDIRECT needs no capability at all.
                "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]} if tproxy else {"drop": ["ALL"]},
                # The proxy makes only ordinary socket and file calls; the runtime's default filter suffices.
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                *(
                    [
                        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
                        {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": True},
                    ]
                    if source == IDENTITY_CA
                    else [{"name": SVID_VOLUME, "mountPath": SVID_DIR, "readOnly": True}]
                ),
                # Where the sidecar writes its admin token (the root filesystem is read-only), for
                # `kubectl exec -c mtlsmesh-proxy -- mtlsmesh drain`; the app's containers never mount it.
                {"name": ADMIN_VOLUME, "mountPath": ADMIN_TOKEN_DIR},
            ],
        }
    )
    return container


def _volumes(spec: JsonDict, source: str) -> list[JsonDict]:
    config = {"name": CONFIG_VOLUME, "configMap": {"name": CONFIG_MAP}}
    init_run = {"name": INIT_RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    admin = {"name": ADMIN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    if source == IDENTITY_CA:
        token = {
            "serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": TOKEN_FILE,
            }
        }
        return [
            # Only the proxy mounts the token, so the file may be readable by every uid: the app never sees it.
            # Without a pod-wide fsGroup the kubelet writes it as root with this mode, readable by uid 1337.
            {"name": TOKEN_VOLUME, "projected": {"sources": [token], "defaultMode": 0o444}},
            {"name": BUNDLE_VOLUME, "configMap": {"name": BUNDLE_CONFIG_MAP}},
            config,
            init_run,
            admin,
        ]
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return [
        # Only the proxy mounts the SVID, so the files may be readable by every uid: the app never sees them.
        # Secret files are owned by root; 0444 lets uid 1337 read the key without a pod-wide fsGroup.
        {"name": SVID_VOLUME, "secret": {"secretName": f"{SVID_SECRET_PREFIX}{account}", "defaultMode": 0o444}},
        config,
        init_run,
        admin,
    ]


def _inject_spec(spec: JsonDict, capture: CaptureSettings, opts: InjectOptions, source: str) -> _Record:
    """Add our containers and volumes; the record says which of the two lists had to be created."""
    ours = [_init_container(capture, opts), _proxy_container(capture, opts, source)]
    record = _Record()
    init_containers = spec.get("initContainers")
    if isinstance(init_containers, list):
        # First: the capture rules exist, and the sidecar is up, before any of the app's own init containers runs.
        init_containers[:0] = ours
    else:
        record = record.noting("spec.initContainers", was_null="initContainers" in spec)
        spec["initContainers"] = ours
    volumes = spec.get("volumes")
    if isinstance(volumes, list):
        volumes.extend(_volumes(spec, source))
    else:
        record = record.noting("spec.volumes", was_null="volumes" in spec)
        spec["volumes"] = _volumes(spec, source)
    return record


def _set_status(template: JsonDict, opts: InjectOptions, record: _Record, source: str) -> None:
    """Write the status annotation: what was added, and the record of every key injection created (this one's
    own `metadata` and `metadata.annotations` included, so uninjecting removes them too)."""
    metadata = template.get("metadata")
    if not isinstance(metadata, dict):
        record = record.noting("metadata", was_null="metadata" in template)
        metadata = template["metadata"] = {}
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        record = record.noting("metadata.annotations", was_null="annotations" in metadata)
        annotations = metadata["annotations"] = {}
    status: JsonDict = {
        "version": __version__,
        "image": opts.image,
        "initContainers": list(INJECTED_CONTAINERS),
        "volumes": [volume["name"] for volume in _volumes({}, source)],
    }
    if record.created:
        status["created"] = list(record.created)
    if record.replaced_null:
        status["replacedNull"] = list(record.replaced_null)
    annotations[STATUS_ANNOTATION] = json.dumps(status, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------------------
# The status annotation, and taking the mesh out again

# The keys injection may have to create, relative to the pod template; deepest first, the order uninject removes
# them in (an emptied `annotations` goes before the `metadata` holding it).
_CREATABLE = ("metadata.annotations", "metadata", "spec.initContainers", "spec.volumes")


@dataclass(frozen=True, slots=True)
class _Record:
    """Which keys of a template injection created: absent before (`created`) or null before (`replaced_null`)."""

    created: tuple[str, ...] = ()
    replaced_null: tuple[str, ...] = ()

    def noting(self, path: str, *, was_null: bool) -> _Record:
        if was_null:
            return _Record(self.created, (*self.replaced_null, path))
        return _Record((*self.created, path), self.replaced_null)

    def merged(self, other: _Record) -> _Record:
        return _Record(
            (*self.created, *(p for p in other.created if p not in self.created)),
            (*self.replaced_null, *(p for p in other.replaced_null if p not in self.replaced_null)),
        )


@dataclass(frozen=True, slots=True)
class _Status:
    """The `mtlsmesh.io/status` annotation, read back."""

    init_containers: tuple[str, ...]
    volumes: tuple[str, ...]
    record: _Record


def _read_status(text: str, label: str) -> _Status:
    """Parse the status annotation; anything but what `_set_status` writes is a `ConfigError`."""
    where = f"annotation {STATUS_ANNOTATION}"
    try:
        status = json.loads(text)
    except ValueError:
        raise ConfigError(label, f"{where}: not JSON, so not written by the injector") from None
    if not isinstance(status, dict):
        raise ConfigError(label, f"{where}: expected a JSON object")

    def names(key: str, allowed: Sequence[str]) -> tuple[str, ...]:
        value = status.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(label, f"{where}: {key}: expected a list of strings")
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ConfigError(label, f"{where}: {key}: {unknown[0]!r} is not something the injector adds")
        return tuple(value)

    return _Status(
        names("initContainers", INJECTED_CONTAINERS),
        names("volumes", INJECTED_VOLUMES),
        _Record(names("created", _CREATABLE), names("replacedNull", _CREATABLE)),
    )


def uninject_text(text: str, *, source: str) -> UninjectedText:
    """Parse, uninject and render: what `mtlsmesh uninject` does between reading and writing."""
    result = uninject_documents(parse_manifests(text, source), source=source)
    return UninjectedText(render_manifests(result.documents), result.uninjected)


def uninject_documents(documents: Sequence[object], *, source: str = "<input>") -> UninjectResult:
    """Take the mesh out of every injected pod template in `documents` (not changed: the result holds deep copies).

    Templates without the status annotation are left alone, so uninjecting twice is uninjecting once; one that
    holds a container or volume with one of our names but no status annotation was not made by the injector and
    is a `ConfigError` (as injecting it would be)."""
    uninjected: list[str] = []
    out: list[object] = []
    for index, doc in enumerate(documents, start=1):
        doc_copy = copy.deepcopy(doc)
        for found in _pod_templates(doc_copy, f"{source}: document {index}"):
            if _uninject_template(found):
                uninjected.append(f"{found.kind} {found.name}")
        out.append(doc_copy)
    return UninjectResult(tuple(out), tuple(uninjected))


def _uninject_template(found: _Template) -> bool:
    label, template = found.label, found.template
    metadata = template.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    spec = template.get("spec")
    if not isinstance(annotations, dict) or STATUS_ANNOTATION not in annotations:
        if isinstance(spec, dict):
            _refuse_lookalikes(spec, label)
        return False
    status_text = annotations[STATUS_ANNOTATION]
    if not isinstance(status_text, str):
        raise ConfigError(label, f"annotation {STATUS_ANNOTATION}: annotation values are strings")
    status = _read_status(status_text, label)
    if not isinstance(spec, dict):
        raise ConfigError(label, f"{'.'.join([*_TEMPLATE_PATHS[found.kind][1], 'spec'])}: expected a mapping")
    for key, names in (("initContainers", status.init_containers), ("volumes", status.volumes)):
        items = spec.get(key)
        if isinstance(items, list):
            items[:] = [item for item in items if not (isinstance(item, dict) and item.get("name") in names)]
    del annotations[STATUS_ANNOTATION]
    for path in _CREATABLE:
        created, was_null = path in status.record.created, path in status.record.replaced_null
        if not (created or was_null):
            continue
        parent_path, _, key = path.rpartition(".")
        parent = template.get(parent_path) if parent_path else template
        # Only what is still empty goes: something added after injection (an init container of the app's) stays.
        if isinstance(parent, dict) and parent.get(key) in ([], {}):
            if created:
                del parent[key]
            else:
                parent[key] = None
    return True


def _refuse_lookalikes(spec: JsonDict, label: str) -> None:
    for key, names in (("initContainers", INJECTED_CONTAINERS), ("volumes", INJECTED_VOLUMES)):
        items = spec.get(key)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict) and item.get("name") in names:
                raise ConfigError(
                    label,
                    f"spec.{key} has {item['name']!r} but the template has no {STATUS_ANNOTATION} annotation: "
                    "it was not added by the injector; remove it by hand",
                )


# ---------------------------------------------------------------------------------------------------------------
# Reading an injected pod back


def pod_commands(pod_spec: Mapping[str, object]) -> tuple[CommandLine, CommandLine]:
    """The (argv, env) of the injected init container and of the proxy, exactly as the pod spec gives them.

    For running an injected pod without a cluster (a lab namespace): argv is `command + args`, env the literal
    `value`s. Raises `ConfigError` when the spec is not injected or the commands come from somewhere else
    (an env `valueFrom`, no `command`).
    """
    containers = pod_spec.get("initContainers")
    found: dict[str, CommandLine] = {}
    for container in containers if isinstance(containers, list) else ():
        if isinstance(container, dict) and container.get("name") in INJECTED_CONTAINERS:
            found[container["name"]] = _command_line(container)
    for name in INJECTED_CONTAINERS:
        if name not in found:
            raise ConfigError("spec.initContainers", f"no container {name!r}: the pod spec is not injected")
    return found[INIT_CONTAINER], found[PROXY_CONTAINER]


def _command_line(container: Mapping[str, Any]) -> CommandLine:
    name = container["name"]
    command, args = container.get("command"), container.get("args", [])
    if not isinstance(command, list) or not command or not isinstance(args, list):
        raise ConfigError(f"{name}", "expected command (a non-empty list) and args (a list)")
    argv = [str(part) for part in [*command, *args]]
    env: dict[str, str] = {}
    for entry in container.get("env") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            raise ConfigError(f"{name}.env", f"{entry!r}: only literal string values can be read back")
        env[entry["name"]] = entry["value"]
    return argv, env

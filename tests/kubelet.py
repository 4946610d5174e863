"""The kubelet's part in running a container, as far as the injected mesh containers need it, without a cluster.

A pod spec says which volumes a container mounts where, and a volume names a Secret or a ConfigMap by name; the
kubelet looks them up in the pod's namespace, writes their keys as files (a Secret's `data` base64-decoded) with
the volume's file mode, and starts the container's `command + args` as its `runAsUser`/`runAsGroup`. This module
does the same from plain dicts, so a lab can run an injected pod's `mtlsmesh iptables` and `mtlsmesh sidecar` in a
network namespace:

- `container_mounts(pod_spec, container, objects)`: every volume mount of the container, with the files it shows,
  resolved against the Secrets and ConfigMaps given (a missing object or key is an error, as it would leave the
  pod stuck in ContainerCreating);
- `translate_path` / `translate_command`: the in-pod paths of an argv and an environment mapped to where the lab
  put each mount, and the image's entrypoint to a local command — the only changes made to the pod's command lines;
- `write_volume(mount, directory)`: the files of one mount laid out as the kubelet's atomic writer does
  (`..<version>/` holding the files, a `..data` symlink to it, and one symlink per key to `..data/<key>`), which is
  what makes a Secret update one atomic rename. It is the only function here that touches the file system.

What it does not do: other volume types than secret, configMap and emptyDir; `items`, `subPath`, `optional`,
projected volumes, `stringData` (the API server folds it into `data` before a kubelet sees it), fsGroup ownership;
or run anything (`lab.Lab.start_pod` does).
"""

from __future__ import annotations

import base64
import binascii
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtlsmesh.errors import ConfigError

# k8s.io/api/core/v1: SecretVolumeSourceDefaultMode and ConfigMapVolumeSourceDefaultMode are both 0644.
DEFAULT_VOLUME_MODE = 0o644
DATA_LINK = "..data"  # kubernetes pkg/volume/util/atomic_writer.go: the symlink a Secret update swaps

CommandLine = tuple[list[str], dict[str, str]]  # (argv, environment), as inject.pod_commands returns them


@dataclass(frozen=True, slots=True)
class MountedFile:
    name: str
    data: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class Mount:
    """One volume mount of a container: where it appears in the pod and which files it shows there."""

    mount_path: str
    volume: str
    kind: str  # "secret", "configMap" or "emptyDir"
    read_only: bool
    files: tuple[MountedFile, ...]


def container(pod_spec: Mapping[str, object], name: str) -> Mapping[str, object]:
    """The container (init or app) named `name` in a pod spec."""
    for key in ("initContainers", "containers"):
        items = pod_spec.get(key)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict) and item.get("name") == name:
                return item
    raise ConfigError("spec", f"no container named {name!r}")


def run_as(pod_spec: Mapping[str, object], name: str) -> tuple[int, int]:
    """(uid, gid) the container runs as: its securityContext, else the pod's. The lab refuses to guess the image's
    user, so both must be set somewhere."""
    found: dict[str, int] = {}
    pod_context = pod_spec.get("securityContext")
    container_context = container(pod_spec, name).get("securityContext")
    for context in (pod_context, container_context):  # the container's wins
        if isinstance(context, dict):
            for field in ("runAsUser", "runAsGroup"):
                value = context.get(field)
                if isinstance(value, int) and not isinstance(value, bool):
                    found[field] = value
    missing = [field for field in ("runAsUser", "runAsGroup") if field not in found]
    if missing:
        raise ConfigError(f"{name}.securityContext", f"no {missing[0]}: the image's own user is not known here")
    return found["runAsUser"], found["runAsGroup"]


def _find_object(objects: Sequence[Mapping[str, object]], kind: str, name: str, namespace: str) -> Mapping[str, object]:
    for obj in objects:
        metadata = obj.get("metadata")
        if obj.get("kind") != kind or not isinstance(metadata, dict):
            continue
        if metadata.get("name") == name and metadata.get("namespace", "default") == namespace:
            return obj
    raise ConfigError(kind, f"{namespace}/{name} not found: the pod would wait in ContainerCreating")


def secret_files(secret: Mapping[str, object]) -> dict[str, bytes]:
    """A Secret's keys and their base64-decoded values."""
    data = secret.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError("Secret.data", "expected a mapping of keys to base64 values")
    files: dict[str, bytes] = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"Secret.data.{key}", "expected a base64 string")
        try:
            files[str(key)] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"Secret.data.{key}", f"not base64: {exc}") from exc
    return files


def configmap_files(config_map: Mapping[str, object]) -> dict[str, bytes]:
    """A ConfigMap's text keys as UTF-8 files."""
    data = config_map.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError("ConfigMap.data", "expected a mapping of keys to text")
    files: dict[str, bytes] = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"ConfigMap.data.{key}", "expected text")
        files[str(key)] = value.encode()
    return files


def _volume_files(
    volume: Mapping[str, object], objects: Sequence[Mapping[str, object]], namespace: str
) -> tuple[str, tuple[MountedFile, ...]]:
    """(kind, files) of one volume of the pod."""
    name = str(volume.get("name"))
    for kind, source_key, name_key, reader in (
        ("secret", "secret", "secretName", secret_files),
        ("configMap", "configMap", "name", configmap_files),
    ):
        source = volume.get(source_key)
        if not isinstance(source, dict):
            continue
        unsupported = sorted(set(source) & {"items", "optional"})
        if unsupported:
            raise ConfigError(f"volumes.{name}.{source_key}", f"{unsupported[0]} is not supported here")
        mode = source.get("defaultMode", DEFAULT_VOLUME_MODE)
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ConfigError(f"volumes.{name}.{source_key}.defaultMode", f"{mode!r} is not a file mode")
        obj = _find_object(objects, "Secret" if kind == "secret" else "ConfigMap", str(source.get(name_key)), namespace)
        return kind, tuple(MountedFile(key, data, mode) for key, data in sorted(reader(obj).items()))
    if isinstance(volume.get("emptyDir"), dict):
        return "emptyDir", ()
    raise ConfigError(f"volumes.{name}", "only secret, configMap and emptyDir volumes are supported here")


def container_mounts(
    pod_spec: Mapping[str, object], name: str, objects: Sequence[Mapping[str, object]], *, namespace: str = "default"
) -> tuple[Mount, ...]:
    """Every volume mount of container `name`, with its files, resolved against `objects` in `namespace`."""
    declared = pod_spec.get("volumes")
    volumes = {v.get("name"): v for v in (declared if isinstance(declared, list) else ()) if isinstance(v, dict)}
    entries = container(pod_spec, name).get("volumeMounts")
    mounts: list[Mount] = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("mountPath"), str):
            raise ConfigError(f"{name}.volumeMounts", f"{entry!r}: expected a mapping with a mountPath")
        if "subPath" in entry:
            raise ConfigError(f"{name}.volumeMounts", "subPath is not supported here")
        mount_path = entry["mountPath"]
        if not posixpath.isabs(mount_path):
            raise ConfigError(f"{name}.volumeMounts", f"mountPath {mount_path!r} must be absolute")
        volume = volumes.get(entry.get("name"))
        if volume is None:
            raise ConfigError(f"{name}.volumeMounts", f"volume {entry.get('name')!r} is not in spec.volumes")
        kind, files = _volume_files(volume, objects, namespace)
        read_only = bool(entry.get("readOnly"))
        mounts.append(Mount(posixpath.normpath(mount_path), str(volume["name"]), kind, read_only, files))
    return tuple(mounts)


def translate_path(path: str, mounts: Mapping[str, str]) -> str:
    """Map an in-pod absolute path to the local one: the longest mount path it lies under, replaced by the local
    directory of that mount (`{"/etc/mtlsmesh": "/tmp/x/config"}`: `/etc/mtlsmesh/config.yaml` ->
    `/tmp/x/config/config.yaml`). An absolute path under no mount would come from the image: an error."""
    if not posixpath.isabs(path):
        raise ConfigError(path, "not an absolute path")
    normal = posixpath.normpath(path)
    best = ""
    for mount_path in mounts:
        root = posixpath.normpath(mount_path)
        if (normal == root or normal.startswith(root.rstrip("/") + "/")) and len(root) > len(best):
            best = root
    if not best:
        raise ConfigError(path, f"under no volume mount ({', '.join(sorted(mounts)) or 'none'})")
    local = next(local for mount_path, local in mounts.items() if posixpath.normpath(mount_path) == best)
    rest = posixpath.relpath(normal, best)
    return local if rest == "." else posixpath.join(local, rest)


def translate_command(
    command: CommandLine, mounts: Mapping[str, str], *, entrypoint: str, local_entrypoint: Sequence[str]
) -> CommandLine:
    """The container's (argv, env) with argv[0] `entrypoint` replaced by `local_entrypoint` and every absolute
    path, in argv or in an env value, translated (`translate_path`); nothing else changes."""
    argv, env = command
    if not argv or argv[0] != entrypoint:
        raise ConfigError("command", f"{argv[:1]!r}: expected the image's entrypoint {entrypoint!r}")

    def local(value: str) -> str:
        return translate_path(value, mounts) if value.startswith("/") else value

    return [*local_entrypoint, *(local(arg) for arg in argv[1:])], {key: local(value) for key, value in env.items()}


def write_volume(mount: Mount, directory: Path, *, version: str = "..1") -> None:
    """Lay `mount`'s files out in `directory` (created, owned by the caller) as the kubelet does; see the module
    docstring. The files belong to the calling user, with the volume's mode."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=False)
    if not mount.files:
        return
    version_dir = directory / version
    version_dir.mkdir(mode=0o755)
    for item in mount.files:
        # Names starting with ".." are the writer's own (versions, ..data); "/" would leave the directory.
        if "/" in item.name or item.name.startswith("..") or item.name in ("", "."):
            raise ConfigError(f"volumes.{mount.volume}", f"key {item.name!r} cannot be a file name")
        fd = os.open(version_dir / item.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(item.data)
        os.chmod(version_dir / item.name, item.mode)  # after the write: the umask must not narrow the mode
    (directory / DATA_LINK).symlink_to(version)
    for item in mount.files:
        (directory / item.name).symlink_to(Path(DATA_LINK) / item.name)

"""The kubelet's part in running a container, as far as the injected mesh containers need it, without a cluster.

A pod spec says which volumes a container mounts where, and a volume names a Secret or a ConfigMap by name; the
kubelet looks them up in the pod's namespace, writes their keys as files (a Secret's `data` base64-decoded) with
the volume's file mode, and starts the container's `command + args` as its `runAsUser`/`runAsGroup`. This module
does the same from plain dicts, so a lab can run an injected pod's `mtlsmesh iptables` and `mtlsmesh sidecar` in a
network namespace:

- `container_mounts(pod_spec, container, objects, mint=...)`: every volume mount of the container, with the files it
  shows, resolved against the Secrets and ConfigMaps given (a missing object or key is an error, as it would leave
  the pod stuck in ContainerCreating); a projected volume's `serviceAccountToken` sources are minted by `mint`
  (audience, expirationSeconds) -> JWT, the API server's TokenRequest for the pod's service account;
- `translate_path` / `translate_command`: the in-pod paths of an argv and an environment mapped to where the lab
  put each mount, and the image's entrypoint to a local command — the only changes made to the pod's command lines;
- `write_volume(mount, directory)`: the files of one mount laid out as the kubelet's atomic writer does
  (`..<version>/` holding the files, a `..data` symlink to it, and one symlink per key to `..data/<key>`), which is
  what makes a Secret update one atomic rename; `update_volume` is that update (a new version, `..data` swapped by
  one rename, the old version removed);
- `TokenProjector`: what the kubelet does for a projected token after the pod started: a thread that mints every
  registered token volume's tokens again once 80 % of the current token's life has passed, and writes them with
  `update_volume`, so a pod running for longer than a token lives never holds an expired one.
`write_volume`, `update_volume` and the projector are the only parts here that touch the file system.

What it does not do: other volume types than secret, configMap, emptyDir and projected service-account tokens;
`items`, `subPath`, `optional`, other projected sources, `stringData` (the API server folds it into `data` before a
kubelet sees it), fsGroup ownership; or run anything (`lab.Lab.start_pod` does).
"""

from __future__ import annotations

import base64
import binascii
import os
import posixpath
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from mtlsmesh.errors import ConfigError

# k8s.io/api/core/v1: SecretVolumeSourceDefaultMode, ConfigMapVolumeSourceDefaultMode and
# ProjectedVolumeSourceDefaultMode are all 0644.
DEFAULT_VOLUME_MODE = 0o644
DATA_LINK = "..data"  # kubernetes pkg/volume/util/atomic_writer.go: the symlink a Secret update swaps
DATA_LINK_TMP = "..data_tmp"  # the same writer's new link, renamed over `..data`
# The kubelet's token manager asks for a new token once a token is older than 80 % of its life.
REFRESH_FRACTION = 0.8

TokenMinter = Callable[[str, int], str]  # (audience, expirationSeconds) -> the JWT of the pod's service account

CommandLine = tuple[list[str], dict[str, str]]  # (argv, environment), as inject.pod_commands returns them


@dataclass(frozen=True, slots=True)
class MountedFile:
    name: str
    data: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class TokenSource:
    """One `serviceAccountToken` source of a projected volume."""

    path: str  # the file's name in the volume
    audience: str
    expiration_seconds: int


@dataclass(frozen=True, slots=True)
class Mount:
    """One volume mount of a container: where it appears in the pod and which files it shows there."""

    mount_path: str
    volume: str
    kind: str  # "secret", "configMap", "emptyDir" or "projected"
    read_only: bool
    files: tuple[MountedFile, ...]
    tokens: tuple[TokenSource, ...] = ()  # a projected volume's token sources, to mint again (`TokenProjector`)


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


def _file_mode(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise ConfigError(where, f"{value!r} is not a file mode")
    return value


def token_sources(volume: Mapping[str, object]) -> tuple[int, tuple[TokenSource, ...]]:
    """(defaultMode, token sources) of a projected volume; anything but `serviceAccountToken` sources is refused."""
    name = str(volume.get("name"))
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, dict) else None
    if not isinstance(projected, dict) or not isinstance(sources, list) or not sources:
        raise ConfigError(f"volumes.{name}.projected", "expected a mapping with a list of sources")
    mode = _file_mode(projected.get("defaultMode", DEFAULT_VOLUME_MODE), f"volumes.{name}.projected.defaultMode")
    found: list[TokenSource] = []
    for source in sources:
        token = source.get("serviceAccountToken") if isinstance(source, dict) else None
        if not isinstance(source, dict) or set(source) != {"serviceAccountToken"} or not isinstance(token, dict):
            raise ConfigError(f"volumes.{name}.projected", "only serviceAccountToken sources are supported here")
        path, audience = token.get("path"), token.get("audience")
        seconds = token.get("expirationSeconds", 3600)  # the API's default
        if not isinstance(path, str) or "/" in path or path.startswith("..") or path in ("", "."):
            raise ConfigError(f"volumes.{name}.projected", f"serviceAccountToken path {path!r} cannot be a file name")
        if not isinstance(audience, str) or not audience:
            raise ConfigError(f"volumes.{name}.projected", "serviceAccountToken: an audience is required here")
        # The API server refuses less than ten minutes (ValidateServiceAccountTokenProjection).
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 600:
            raise ConfigError(f"volumes.{name}.projected", f"expirationSeconds {seconds!r}: at least 600")
        found.append(TokenSource(path, audience, seconds))
    return mode, tuple(found)


def mint_files(tokens: Sequence[TokenSource], mode: int, mint: TokenMinter) -> tuple[MountedFile, ...]:
    """The files of a projected token volume: one freshly minted token per source."""
    return tuple(MountedFile(t.path, mint(t.audience, t.expiration_seconds).encode(), mode) for t in tokens)


def _volume_files(
    volume: Mapping[str, object],
    objects: Sequence[Mapping[str, object]],
    namespace: str,
    mint: TokenMinter | None,
) -> tuple[str, tuple[MountedFile, ...], tuple[TokenSource, ...]]:
    """(kind, files, token sources) of one volume of the pod."""
    name = str(volume.get("name"))
    if "projected" in volume:
        mode, tokens = token_sources(volume)
        if mint is None:
            raise ConfigError(f"volumes.{name}", "a projected token needs the API server's TokenRequest (mint=)")
        return "projected", mint_files(tokens, mode, mint), tokens
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
        mode = _file_mode(source.get("defaultMode", DEFAULT_VOLUME_MODE), f"volumes.{name}.{source_key}.defaultMode")
        obj = _find_object(objects, "Secret" if kind == "secret" else "ConfigMap", str(source.get(name_key)), namespace)
        return kind, tuple(MountedFile(key, data, mode) for key, data in sorted(reader(obj).items())), ()
    if isinstance(volume.get("emptyDir"), dict):
        return "emptyDir", (), ()
    raise ConfigError(
        f"volumes.{name}", "only secret, configMap, emptyDir and projected token volumes are supported here"
    )


def container_mounts(
    pod_spec: Mapping[str, object],
    name: str,
    objects: Sequence[Mapping[str, object]],
    *,
    namespace: str = "default",
    mint: TokenMinter | None = None,
) -> tuple[Mount, ...]:
    """Every volume mount of container `name`, with its files, resolved against `objects` in `namespace`; the
    tokens of projected volumes from `mint` (for the pod's namespace and service account: the caller's)."""
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
        kind, files, tokens = _volume_files(volume, objects, namespace, mint)
        read_only = bool(entry.get("readOnly"))
        mounts.append(Mount(posixpath.normpath(mount_path), str(volume["name"]), kind, read_only, files, tokens))
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
    _write_version(mount.volume, mount.files, directory / version)
    (directory / DATA_LINK).symlink_to(version)
    for item in mount.files:
        (directory / item.name).symlink_to(Path(DATA_LINK) / item.name)


def _write_version(volume: str, files: Sequence[MountedFile], version_dir: Path) -> None:
    for item in files:
        # Names starting with ".." are the writer's own (versions, ..data); "/" would leave the directory.
        if "/" in item.name or item.name.startswith("..") or item.name in ("", "."):
            raise ConfigError(f"volumes.{volume}", f"key {item.name!r} cannot be a file name")
    version_dir.mkdir(mode=0o755)
    for item in files:
        fd = os.open(version_dir / item.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(item.data)
        os.chmod(version_dir / item.name, item.mode)  # after the write: the umask must not narrow the mode


def update_volume(directory: Path, files: Sequence[MountedFile], *, version: str) -> None:
    """Replace the files of a volume `write_volume` laid out with `files` (the same names), as the atomic writer
    does: write them into a new version directory, point a new link at it and rename that over `..data` (one
    atomic step: a reader opening `<key>` sees the old file or the new one, never a mix), then remove the old
    version."""
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".."))
    if names != sorted(item.name for item in files):
        raise ConfigError(str(directory), f"the update's keys differ from the volume's ({', '.join(names)})")
    previous = os.readlink(directory / DATA_LINK)
    _write_version(directory.name, files, directory / version)
    (directory / DATA_LINK_TMP).symlink_to(version)
    os.replace(directory / DATA_LINK_TMP, directory / DATA_LINK)
    shutil.rmtree(directory / previous)


def token_lifetime(token: bytes) -> tuple[float, float]:
    """(iat, exp) of a token the minter gave: when the projector must replace it (not verified: the minter is
    ours, and the CA verifies every token it is shown)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return float(claims["iat"]), float(claims["exp"])


@dataclass(slots=True)
class _Projected:
    directory: Path
    mount: Mount
    mint: TokenMinter
    due: float  # time.time() when the tokens are to be minted again
    versions: int = 1
    refreshes: list[float] = field(default_factory=list)  # time.time() of each re-projection


class TokenProjector:
    """Keeps projected token volumes fresh, as the kubelet's token manager does; see the module docstring.

    `add(directory, mount, mint)` after `write_volume(mount, directory)`; `close()` stops the thread (also as a
    context manager). Each token volume is re-projected when `REFRESH_FRACTION` of the life of its
    shortest-lived token has passed."""

    def __init__(self, *, refresh_fraction: float = REFRESH_FRACTION) -> None:
        self.refresh_fraction = refresh_fraction
        self._volumes: list[_Projected] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.errors: list[str] = []  # why a re-projection failed (it is retried a second later)
        self._thread = threading.Thread(target=self._run, name="token-projector", daemon=True)
        self._thread.start()

    def __enter__(self) -> TokenProjector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _due(self, files: Sequence[MountedFile]) -> float:
        return min(iat + self.refresh_fraction * (exp - iat) for iat, exp in (token_lifetime(f.data) for f in files))

    def add(self, directory: Path, mount: Mount, mint: TokenMinter) -> None:
        if mount.kind != "projected" or not mount.tokens:
            raise ConfigError(f"volumes.{mount.volume}", "not a projected token volume")
        with self._lock:
            self._volumes.append(_Projected(directory, mount, mint, self._due(mount.files)))
        self._wake.set()

    def refreshes(self, directory: Path) -> list[float]:
        """When the volume at `directory` was re-projected (time.time() values)."""
        with self._lock:
            return [t for v in self._volumes if v.directory == directory for t in v.refreshes]

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                now = time.time()
                for volume in self._volumes:
                    if volume.due <= now:
                        self._project(volume, now)
                wait = min((v.due for v in self._volumes), default=now + 60) - now
            self._wake.wait(timeout=max(0.05, min(wait, 60)))
            self._wake.clear()

    def _project(self, volume: _Projected, now: float) -> None:
        mode = volume.mount.files[0].mode
        try:
            files = mint_files(volume.mount.tokens, mode, volume.mint)
            volume.versions += 1
            update_volume(volume.directory, files, version=f"..{volume.versions}")
        except Exception as exc:  # a thread has no caller: keep the reason for the test, retry in a second
            self.errors.append(f"{volume.directory}: {exc}")
            volume.due = now + 1.0
            return
        volume.refreshes.append(now)
        volume.due = self._due(files)

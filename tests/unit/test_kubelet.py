"""The kubelet's part for the injected containers: volume mounts as files, in-pod paths mapped to them."""

from __future__ import annotations

import base64
import copy
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from mtlsmesh.conventions import ADMIN_TOKEN_DIR
from mtlsmesh.errors import ConfigError
from mtlsmesh.inject import (
    BUNDLE_DIR,
    CONFIG_FILE,
    INIT_CONTAINER,
    PROXY_CONTAINER,
    SECRET_CONFIG_FILE,
    SVID_DIR,
    TOKEN_DIR,
    TOKEN_FILE,
    InjectOptions,
    inject_documents,
    pod_commands,
)
from mtlsmesh.lab.cluster import TokenIssuer
from tests import kubelet

MOUNTS = {"/etc/mtlsmesh": "/lab/pod/config", "/var/run/mtlsmesh/svid": "/lab/pod/svid", "/var/run": "/lab/pod/run"}


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("/etc/mtlsmesh/config.yaml", "/lab/pod/config/config.yaml"),
        ("/etc/mtlsmesh", "/lab/pod/config"),
        ("/etc/mtlsmesh/", "/lab/pod/config"),
        ("/var/run/mtlsmesh/svid/key.pem", "/lab/pod/svid/key.pem"),  # the longest mount wins over /var/run
        ("/var/run/mtlsmesh/other.pem", "/lab/pod/run/mtlsmesh/other.pem"),
        ("/var/run/mtlsmesh/svid/../svid/cert.pem", "/lab/pod/svid/cert.pem"),
        ("/var/run/mtlsmesh/svid/..data/bundle.pem", "/lab/pod/svid/..data/bundle.pem"),
    ],
)
def test_translate_path(path: str, local: str) -> None:
    assert kubelet.translate_path(path, MOUNTS) == local


@pytest.mark.parametrize(
    ("path", "mounts", "message"),
    [
        ("/etc/mtlsmesh-other/config.yaml", MOUNTS, "under no volume mount"),  # a prefix of the name is not a mount
        ("/etc/config.yaml", MOUNTS, r"under no volume mount \(/etc/mtlsmesh, /var/run, /var/run/mtlsmesh/svid\)"),
        ("/etc/mtlsmesh/../passwd", MOUNTS, "under no volume mount"),
        ("config.yaml", MOUNTS, "not an absolute path"),
        ("/etc/mtlsmesh/config.yaml", {}, r"under no volume mount \(none\)"),
    ],
)
def test_translate_path_refuses(path: str, mounts: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubelet.translate_path(path, mounts)


def test_translate_command_maps_only_the_entrypoint_and_the_paths() -> None:
    argv = ["mtlsmesh", "sidecar", "--config", "/etc/mtlsmesh/config.yaml", "--log-level", "info", "-"]
    env = {"MTLSMESH_BUNDLE": "/var/run/mtlsmesh/svid/bundle.pem", "MTLSMESH_INBOUND_MODE": "strict"}
    local_argv, local_env = kubelet.translate_command(
        (argv, env), MOUNTS, entrypoint="mtlsmesh", local_entrypoint=["python3", "-m", "mtlsmesh"]
    )
    expected = ["python3", "-m", "mtlsmesh", "sidecar", "--config", "/lab/pod/config/config.yaml"]
    assert local_argv == [*expected, "--log-level", "info", "-"]
    assert local_env == {"MTLSMESH_BUNDLE": "/lab/pod/svid/bundle.pem", "MTLSMESH_INBOUND_MODE": "strict"}
    assert argv[0] == "mtlsmesh"  # the input is not changed


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["/usr/bin/mtlsmesh", "sidecar"], {}, "expected the image's entrypoint 'mtlsmesh'"),
        ([], {}, "expected the image's entrypoint"),
        (["mtlsmesh", "sidecar", "--config", "/config.yaml"], {}, "/config.yaml: under no volume mount"),
        (["mtlsmesh", "sidecar"], {"MTLSMESH_CERT": "/tmp/cert.pem"}, "/tmp/cert.pem: under no volume mount"),
    ],
)
def test_translate_command_refuses(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubelet.translate_command((argv, env), MOUNTS, entrypoint="mtlsmesh", local_entrypoint=["python3"])


# -- volume mounts of an injected pod -------------------------------------------------------------------------

SECRET_DATA = {"cert.pem": b"CERT\n", "key.pem": b"KEY\n", "bundle.pem": b"ROOTS\n"}


def injected_pod(account: str = "reviews", identity: str = "secret") -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "app:1"}]},
    }
    result = inject_documents([pod], options=InjectOptions(identity=identity))
    spec = result.documents[0]["spec"]  # type: ignore[index]
    assert isinstance(spec, dict)
    return spec


def secret(name: str = "mtlsmesh-svid-reviews", namespace: str = "default") -> dict[str, Any]:
    data = {key: base64.b64encode(value).decode() for key, value in SECRET_DATA.items()}
    return {"kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data}


def config_map(name: str = "mtlsmesh-config", key: str = "config-secret.yaml") -> dict[str, Any]:
    return {"kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, "data": {key: "a: 1\n"}}


def test_proxy_mounts_hold_the_secret_and_the_config_map() -> None:
    spec = injected_pod()
    mounts = kubelet.container_mounts(spec, PROXY_CONTAINER, [config_map(), secret(), secret("other")])
    by_path = {mount.mount_path: mount for mount in mounts}
    assert set(by_path) == {SVID_DIR, os.path.dirname(CONFIG_FILE), ADMIN_TOKEN_DIR}
    assert (by_path[ADMIN_TOKEN_DIR].kind, by_path[ADMIN_TOKEN_DIR].read_only) == ("emptyDir", False)
    svid = by_path[SVID_DIR]
    assert (svid.kind, svid.read_only) == ("secret", True)
    assert {f.name: (f.data, f.mode) for f in svid.files} == {k: (v, 0o444) for k, v in SECRET_DATA.items()}
    config = by_path[os.path.dirname(CONFIG_FILE)]
    assert [(f.name, f.data, f.mode) for f in config.files] == [
        ("config-secret.yaml", b"a: 1\n", kubelet.DEFAULT_VOLUME_MODE)
    ]
    # Every file the proxy's command names lies in one of its mounts.
    _, (argv, env) = pod_commands(spec)
    local = {mount.mount_path: f"/lab/{mount.volume}" for mount in mounts}
    local_argv, _ = kubelet.translate_command((argv, env), local, entrypoint="mtlsmesh", local_entrypoint=["m"])
    assert f"/lab/mtlsmesh-config/{os.path.basename(SECRET_CONFIG_FILE)}" in local_argv
    assert "/lab/mtlsmesh-svid/key.pem" in local_argv


ISSUER = TokenIssuer()


def mint(audience: str, seconds: int) -> str:
    """The API server's TokenRequest for default/reviews, capped at two seconds for the refresh test."""
    return ISSUER.token("default", "reviews", "reviews-0", lifetime=min(seconds, 2), audience=audience)


def test_identity_mode_proxy_mounts_a_minted_token_and_the_bundle() -> None:
    spec = injected_pod(identity="ca")
    objects = [
        config_map(key="config.yaml"),
        config_map("mtlsmesh-trust-bundle", "bundle.pem"),
    ]
    asked: list[tuple[str, int]] = []

    def recording_mint(audience: str, seconds: int) -> str:
        asked.append((audience, seconds))
        return mint(audience, seconds)

    mounts = kubelet.container_mounts(spec, PROXY_CONTAINER, objects, mint=recording_mint)
    by_path = {mount.mount_path: mount for mount in mounts}
    assert set(by_path) == {TOKEN_DIR, BUNDLE_DIR, os.path.dirname(CONFIG_FILE), ADMIN_TOKEN_DIR}
    token = by_path[TOKEN_DIR]
    assert (token.kind, token.read_only, token.tokens) == (
        "projected", True, (kubelet.TokenSource(TOKEN_FILE, "mtlsmesh-ca", 3600),)
    )  # fmt: skip
    assert asked == [("mtlsmesh-ca", 3600)]
    ((name, data, mode),) = [(f.name, f.data, f.mode) for f in token.files]
    assert (name, mode) == (TOKEN_FILE, 0o444)
    claims = jwt.decode(data, options={"verify_signature": False})
    assert (claims["aud"], claims["sub"]) == (["mtlsmesh-ca"], "system:serviceaccount:default:reviews")
    assert [f.name for f in by_path[BUNDLE_DIR].files] == ["bundle.pem"]
    # No app container mounts it, and without a minter there is no token (the pod would not start).
    assert kubelet.container_mounts(spec, "app", objects) == ()
    with pytest.raises(ConfigError, match="a projected token needs the API server's TokenRequest"):
        kubelet.container_mounts(spec, PROXY_CONTAINER, objects)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"configMap": {"name": "x"}}], "only serviceAccountToken sources"),
        ([{"serviceAccountToken": {"path": "t", "audience": "a", "expirationSeconds": 60}}], "at least 600"),
        ([{"serviceAccountToken": {"path": "../t", "audience": "a"}}], "cannot be a file name"),
        ([{"serviceAccountToken": {"path": "t"}}], "an audience is required"),
        ([], "expected a mapping with a list of sources"),
    ],
)
def test_projected_volumes_refuse_what_they_do_not_model(sources: list[Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubelet.token_sources({"name": "v", "projected": {"sources": sources}})


def test_update_volume_swaps_the_files_in_one_rename(tmp_path: Path) -> None:
    mount = kubelet.Mount("/x", "v", "secret", True, (kubelet.MountedFile("a", b"one", 0o444),))
    target = tmp_path / "v"
    kubelet.write_volume(mount, target)
    handle = (target / "a").open("rb")  # a reader holding the old file keeps reading the old file
    kubelet.update_volume(target, (kubelet.MountedFile("a", b"two", 0o444),), version="..2")
    assert (target / "a").read_bytes() == b"two" and handle.read() == b"one"
    handle.close()
    assert sorted(p.name for p in target.iterdir()) == ["..2", kubelet.DATA_LINK, "a"]
    with pytest.raises(ConfigError, match="the update's keys differ"):
        kubelet.update_volume(target, (kubelet.MountedFile("b", b"", 0o444),), version="..3")


def test_the_projector_mints_the_token_again_before_it_expires(tmp_path: Path) -> None:
    spec = injected_pod(identity="ca")
    objects = [config_map(key="config.yaml"), config_map("mtlsmesh-trust-bundle", "bundle.pem")]
    (token,) = [m for m in kubelet.container_mounts(spec, PROXY_CONTAINER, objects, mint=mint) if m.tokens]
    target = tmp_path / "token"
    kubelet.write_volume(token, target)
    seen = {(target / TOKEN_FILE).read_bytes()}
    with kubelet.TokenProjector() as projector:
        projector.add(target, token, mint)
        deadline = time.monotonic() + 20
        while len(projector.refreshes(target)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            current = (target / TOKEN_FILE).read_bytes()
            seen.add(current)
            # Never a token long expired: two-second tokens (whole seconds in the claims), renewed at 80 %.
            assert jwt.decode(current, options={"verify_signature": False})["exp"] >= time.time() - 1.0
    assert len(projector.refreshes(target)) >= 2, projector.errors
    assert len(seen) >= 3 and projector.errors == []


def test_init_container_mounts_an_empty_dir() -> None:
    mounts = kubelet.container_mounts(injected_pod(), INIT_CONTAINER, [])
    assert [(m.mount_path, m.kind, m.files) for m in mounts] == [("/run", "emptyDir", ())]


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([config_map()], r"Secret: default/mtlsmesh-svid-reviews not found"),
        ([config_map(), secret("mtlsmesh-svid-ratings")], "Secret: default/mtlsmesh-svid-reviews not found"),
        ([config_map(), secret(namespace="prod")], "Secret: default/mtlsmesh-svid-reviews not found"),
        ([secret()], "ConfigMap: default/mtlsmesh-config not found"),
        (
            [config_map(), {**secret(), "data": {"key.pem": "not base64!"}}],
            r"Secret.data.key.pem: not base64",
        ),
        ([config_map(), {**secret(), "data": {}}], "Secret.data: expected a mapping"),
        ([{**config_map(), "data": {"config.yaml": 1}}, secret()], "ConfigMap.data.config.yaml: expected text"),
    ],
)
def test_mounts_refuse_missing_or_bad_objects(objects: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubelet.container_mounts(injected_pod(), PROXY_CONTAINER, objects)


def _with(spec: dict[str, Any], change: str) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    proxy = next(c for c in spec["initContainers"] if c["name"] == PROXY_CONTAINER)
    if change == "subPath":
        proxy["volumeMounts"][0]["subPath"] = "cert.pem"
    elif change == "unknown volume":
        proxy["volumeMounts"][0]["name"] = "nowhere"
    elif change == "items":
        spec["volumes"][0]["secret"]["items"] = [{"key": "cert.pem", "path": "c.pem"}]
    elif change == "hostPath":
        spec["volumes"][0] = {"name": spec["volumes"][0]["name"], "hostPath": {"path": "/etc"}}
    elif change == "relative":
        proxy["volumeMounts"][0]["mountPath"] = "svid"
    return spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("subPath", "subPath is not supported"),
        ("unknown volume", "volume 'nowhere' is not in spec.volumes"),
        ("items", r"volumes.mtlsmesh-svid.secret: items is not supported"),
        ("hostPath", "only secret, configMap, emptyDir and projected token volumes"),
        ("relative", "mountPath 'svid' must be absolute"),
    ],
)
def test_mounts_refuse_what_they_do_not_model(change: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubelet.container_mounts(_with(injected_pod(), change), PROXY_CONTAINER, [config_map(), secret()])


@pytest.mark.parametrize(
    ("container", "ids"),
    [(INIT_CONTAINER, (0, 0)), (PROXY_CONTAINER, (1337, 1337))],
)
def test_run_as_reads_the_injected_security_context(container: str, ids: tuple[int, int]) -> None:
    assert kubelet.run_as(injected_pod(), container) == ids


def test_run_as_falls_back_to_the_pod_and_refuses_to_guess() -> None:
    spec: dict[str, Any] = {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 3000},
        "containers": [{"name": "app", "securityContext": {"runAsUser": 2000}}, {"name": "bare"}],
    }
    assert kubelet.run_as(spec, "app") == (2000, 3000)
    del spec["securityContext"]["runAsGroup"]
    with pytest.raises(ConfigError, match=r"app.securityContext: no runAsGroup"):
        kubelet.run_as(spec, "app")
    with pytest.raises(ConfigError, match="no container named 'missing'"):
        kubelet.run_as(spec, "missing")


def test_write_volume_lays_files_out_as_the_atomic_writer(tmp_path: Path) -> None:
    mounts = kubelet.container_mounts(injected_pod(), PROXY_CONTAINER, [config_map(), secret()])
    svid = next(m for m in mounts if m.kind == "secret")
    target = tmp_path / "svid"
    kubelet.write_volume(svid, target)
    assert os.readlink(target / kubelet.DATA_LINK) == "..1"
    for name, data in SECRET_DATA.items():
        assert os.readlink(target / name) == f"{kubelet.DATA_LINK}/{name}"
        assert (target / name).read_bytes() == data
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o444
    assert sorted(p.name for p in target.iterdir()) == sorted([*SECRET_DATA, "..1", kubelet.DATA_LINK])
    with pytest.raises(FileExistsError):
        kubelet.write_volume(svid, target)  # never over what is there


def test_write_volume_refuses_a_key_that_is_not_a_file_name(tmp_path: Path) -> None:
    bad = kubelet.Mount("/x", "v", "secret", True, (kubelet.MountedFile("../escape", b"", 0o644),))
    with pytest.raises(ConfigError, match=r"volumes.v: key '../escape' cannot be a file name"):
        kubelet.write_volume(bad, tmp_path / "v")
    assert not (tmp_path / "escape").exists()

"""`mtlsmesh sidecar` flags and environment variables: flags beat the environment, both beat the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlsmesh.cli import build_parser
from mtlsmesh.cli.sidecar import ENV, build_config
from mtlsmesh.config import Mode
from mtlsmesh.errors import ConfigError

CONFIG = """
trust_domain: cluster.local
credentials: {cert: /file/cert.pem, key: /file/key.pem, bundle: /file/bundle.pem}
inbound: {mode: strict}
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for variable in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    ("flags", "env", "field", "expected"),
    [
        ([], {}, "mode", Mode.STRICT),
        ([], {"MTLSMESH_INBOUND_MODE": "permissive"}, "mode", Mode.PERMISSIVE),
        (["--inbound-mode", "disable"], {"MTLSMESH_INBOUND_MODE": "permissive"}, "mode", Mode.DISABLE),
        (["--cert", "/flag/cert.pem"], {"MTLSMESH_CERT": "/env/cert.pem"}, "cert", "/flag/cert.pem"),
        ([], {"MTLSMESH_KEY": "/env/key.pem"}, "key", "/env/key.pem"),
        ([], {}, "bundle", "/file/bundle.pem"),
        (["--trust-domain", "example.org"], {}, "td", "example.org"),
        ([], {"MTLSMESH_LOG_LEVEL": "debug"}, "log", "debug"),
    ],
)
def test_overrides(
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    env: dict[str, str],
    field: str,
    expected: object,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["sidecar", "--config", str(config_file), *flags])
    cfg = build_config(args)
    assert cfg.credentials is not None
    got = {
        "mode": cfg.inbound.mode,
        "cert": cfg.credentials.cert,
        "key": cfg.credentials.key,
        "bundle": cfg.credentials.bundle,
        "td": cfg.trust_domain.name,
        "log": cfg.log_level,
    }[field]
    assert got == expected


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--inbound-mode", "loose"], "--inbound-mode: expected one of strict, permissive, disable"),
        (["--trust-domain", "Bad_TD!"], "--trust-domain: .*trust domain"),
        (["--log-level", "loud"], "--log-level: expected one of debug, info, warning, error"),
    ],
)
def test_bad_overrides(config_file: Path, flags: list[str], match: str) -> None:
    args = build_parser().parse_args(["sidecar", "--config", str(config_file), *flags])
    with pytest.raises(ConfigError, match=match):
        build_config(args)


def test_the_config_file_can_come_from_the_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLSMESH_CONFIG", str(config_file))
    cfg = build_config(build_parser().parse_args(["sidecar"]))
    assert cfg.credentials is not None and cfg.credentials.cert == "/file/cert.pem"


def test_credentials_are_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("trust_domain: cluster.local\n")
    with pytest.raises(ConfigError, match="credentials: the sidecar needs cert, key and bundle"):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path)]))
    with pytest.raises(ConfigError, match="--key: no credentials in the config file"):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path), "--cert", "c.pem"]))

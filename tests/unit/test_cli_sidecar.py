"""`mtlsmesh sidecar` flags and environment variables: flags beat the environment, both beat the file."""

from __future__ import annotations

import logging
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from mtlsmesh import pem, relay
from mtlsmesh.cli import build_parser, main
from mtlsmesh.cli.sidecar import ENV, LOG_FORMAT, LineFormatter, build_config
from mtlsmesh.config import Mode
from mtlsmesh.errors import ConfigError
from tests.pki import MALFORMED_SAN, Pki, forge_leaf

ROOT = Path(__file__).resolve().parents[2]
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
        ([], {}, "interception", "REDIRECT"),
        ([], {"MTLSMESH_INTERCEPTION_MODE": "TPROXY"}, "interception", "TPROXY"),
        (["--interception-mode", "redirect"], {"MTLSMESH_INTERCEPTION_MODE": "TPROXY"}, "interception", "REDIRECT"),
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
        "interception": cfg.inbound.interception_mode.value,
    }[field]
    assert got == expected


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--inbound-mode", "loose"], "--inbound-mode: expected one of strict, permissive, disable"),
        (["--trust-domain", "Bad_TD!"], "--trust-domain: .*trust domain"),
        (["--log-level", "loud"], "--log-level: expected one of debug, info, warning, error"),
        (["--interception-mode", "nat"], "--interception-mode: expected one of REDIRECT, TPROXY"),
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
    with pytest.raises(
        ConfigError, match=r"credentials: the sidecar needs cert, key and bundle .* or an identity section"
    ):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path)]))
    with pytest.raises(ConfigError, match="--key: no credentials in the config file"):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path), "--cert", "c.pem"]))


def test_a_malformed_certificate_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its subjectAltName parses only when the SVID checks look at it: still a refusal before anything binds.
    for variable in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    pki = Pki(tmp_path / "pki")
    cert, key = forge_leaf(pki.authority, now=pki.now, san=MALFORMED_SAN)
    (tmp_path / "cert.pem").write_bytes(pem.render_certificates([cert]))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (tmp_path / "bundle.pem").write_bytes(pem.render_certificates(pki.authority.roots))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"credentials: {{cert: {tmp_path}/cert.pem, key: {tmp_path}/key.pem, bundle: {tmp_path}/bundle.pem}}\n"
    )
    assert main(["sidecar", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtlsmesh: error: {tmp_path}/cert.pem: malformed certificate extensions: ")
    assert err.count("\n") == 1


def test_line_formatter_writes_what_logging_formatter_writes() -> None:
    # Records in one second, across a second boundary and back: the cached date must never leak into another second.
    plain, fast = logging.Formatter(LOG_FORMAT), LineFormatter(LOG_FORMAT)
    for created in (1764482000.0, 1764482000.4999, 1764482000.999, 1764482001.0, 1764482001.25, 1764481999.9):
        record = logging.LogRecord("mtlsmesh.conn", logging.INFO, __file__, 0, "%s", ("dir=inbound",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert fast.format(record) == plain.format(record)


# Run in a fresh interpreter: malloc's thresholds are per process, and glibc moves its own as blocks are freed. The
# default case imports nothing of ours: compiling and loading modules frees large blocks (a dict outgrowing its
# table), which raises glibc's threshold by an amount that depends on how much was imported and whether from source.
MALLOC_PROBE = """
import ctypes, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = False
if sys.argv[1] == "tuned":
    from mtlsmesh.cli.sidecar import tune_malloc
    tuned = tune_malloc()
before = libc.mallinfo2().hblks
buffer = bytearray(int(sys.argv[2]))  # what os.read(fd, relay.CHUNK) allocates before it shrinks
print(int(tuned), libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's"
)
@pytest.mark.parametrize(("how", "tuned", "new_mappings"), [("default", "0", "1"), ("tuned", "1", "0")])
def test_tune_malloc_keeps_a_relay_read_buffer_off_its_own_mmap(how: str, tuned: str, new_mappings: str) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE, how, str(relay.CHUNK)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.split() == [tuned, new_mappings]


IDENTITY_CONFIG = """
trust_domain: cluster.local
identity: {ca_address: "mtlsmesh-ca.mtlsmesh-system.svc:15012", token: /t, bundle: /b.pem}
"""


def test_an_identity_section_needs_no_files_and_takes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(IDENTITY_CONFIG)
    cfg = build_config(build_parser().parse_args(["sidecar", "--config", str(path)]))
    assert cfg.credentials is None and cfg.identity is not None and cfg.identity.bundle == "/b.pem"
    with pytest.raises(ConfigError, match=r"^--key: the config's identity section gets the SVID from the CA"):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path), "--key", "k.pem"]))
    monkeypatch.setenv(ENV["cert"], "c.pem")
    with pytest.raises(ConfigError, match=r"^--cert: the config's identity section"):
        build_config(build_parser().parse_args(["sidecar", "--config", str(path)]))


@pytest.mark.parametrize(
    ("bundle", "extra", "match"),
    [
        ("/nonexistent/bundle.pem", "", r"^mtlsmesh: error: /nonexistent/bundle\.pem: no such file$"),
        ("REAL", "  ca_identity: spiffe://other.example/ns/x/sa/ca\n",
         r"^mtlsmesh: error: identity\.ca_identity: spiffe://other\.example/ns/x/sa/ca is not in trust domain"),
    ],
)  # fmt: skip
def test_identity_mode_start_errors_are_one_line(tmp_path: Path, bundle: str, extra: str, match: str) -> None:
    if bundle == "REAL":
        bundle = Pki(tmp_path).issue("x").bundle
    path = tmp_path / "config.yaml"
    path.write_text(f"identity:\n  ca_address: 127.0.0.1:9\n  token: /t\n  bundle: {bundle}\n{extra}")
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "sidecar", "--config", str(path)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), result.stderr

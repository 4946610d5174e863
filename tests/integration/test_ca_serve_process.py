"""`python -m mtlsmesh ca serve` as a real process: bad inputs are one line and exit 2, curl can fetch the bundle and
get an SVID with a token, and SIGTERM stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import caproto
from tests.integration.castack import CaLab, make_csr
from tests.jwt_issuer import AUDIENCE, ISSUER

ROOT = Path(__file__).resolve().parents[2]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}, "PYTHONPATH": str(ROOT)}


def serve_args(lab: CaLab, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mtlsmesh", "ca", "serve", "--dir", str(lab.ca_dir), "--token-issuer", ISSUER,
        "--token-jwks", str(lab.jwks), "--token-audience", AUDIENCE, *extra,
    ]  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (["--listen", "localhost:99999"], r"--listen: port 99999 is out of range|--listen: 'localhost' is not an IP"),
        (["--listen", "::1:80"], r"--listen: .*IPv6 address needs brackets"),
        (["--ttl", "forever"], r"--ttl: 'forever' is not a duration"),
        (["--rate", "-1"], r"--rate: must be a positive number"),
        (["--rate-burst", "0.5"], r"--rate-burst: must be at least 1"),
        (["--reload-interval", "0s"], r"--reload-interval: must be greater than zero"),
        (["--token-jwks", "http://kubernetes.default.svc/openid/v1/jwks"], r"--token-jwks: .*plain http is refused"),
        (["--token-jwks", "https://[::1/jwks"], r"--token-jwks: 'https://\[::1/jwks' is not a URL: Invalid IPv6"),
        (["--token-jwks-bearer", "/var/token"], r"--token-jwks-bearer: goes with an https URL for --token-jwks"),
        (["--token-jwks", "/nonexistent/jwks.json"], r"/nonexistent/jwks.json: cannot read the JWKS"),
        (["--publish-bundle", "nope"], r"--publish-bundle: 'nope' is not NAMESPACE/NAME of a ConfigMap"),
        (
            ["--publish-bundle", "a/b", "--publish-bundle", "c/b", "--publish-bundle", "a/b"],
            r"--publish-bundle: a/b is given twice; name each ConfigMap once$",
        ),
        (["--kube-token", "/var/token"], r"--kube-token: goes with --publish-bundle"),
        (["--publish-bundle", "a/b", "--kube-api", "http://k"], r"--kube-api: 'http://k': plain http is refused"),
        (["--publish-bundle", "a/b"], r"--kube-api: not running in a cluster \(no KUBERNETES_SERVICE_HOST\)"),
        (["--dir", "/nonexistent/ca"], r"/nonexistent/ca: no CA directory here"),
        (["--san", "not a name"], r"'not a name' is not a valid DNS name"),
        (["--token-issuer", " "], r"--token-issuer: must not be empty"),
        (["KEY-0640"], r"root-key\.pem: is accessible by group or others \(mode 0640\)"),
        (["PORT-IN-USE"], r"--listen: cannot listen on 127\.0\.0\.1:\d+: Address already in use"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(lab: CaLab, change: list[str], match: str) -> None:
    taken = socket.socket()
    try:
        extra = list(change)
        if change == ["KEY-0640"]:
            os.chmod(lab.ca_dir / "root-key.pem", 0o640)
            extra = ["--listen", "127.0.0.1:0"]
        elif change == ["PORT-IN-USE"]:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            extra = ["--listen", f"127.0.0.1:{taken.getsockname()[1]}"]
        result = subprocess.run(serve_args(lab, *extra), capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV)
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtlsmesh: error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]


def test_a_missing_required_flag_is_argparse_usage_and_exit_2(lab: CaLab) -> None:
    argv = [sys.executable, "-m", "mtlsmesh", "ca", "serve", "--dir", str(lab.ca_dir)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "mtlsmesh ca serve: error: the following arguments are required: --token-issuer, --token-jwks"
    )
    assert "Traceback" not in result.stderr


@asynccontextmanager
async def ca_process(lab: CaLab, **popen: Any) -> AsyncIterator[tuple[trio.Process, int, list[str]]]:
    process = await trio.lowlevel.open_process(
        serve_args(lab, "--listen", "127.0.0.1:0", "--reload-interval", "200ms"),
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=ENV,
        **popen,
    )
    lines: list[str] = []
    ports: list[int] = []
    ready = trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def read_stderr() -> None:
                assert process.stderr is not None
                buffer = b""
                while data := await process.stderr.receive_some(65536):
                    buffer += data
                    *complete, buffer = buffer.split(b"\n")
                    for raw in complete:
                        line = raw.decode()
                        lines.append(line)
                        if "event=ready" in line:
                            ports.append(int(re.findall(r"ca=127\.0\.0\.1:(\d+)", line)[0]))
                            ready.set()

            nursery.start_soon(read_stderr)
            with trio.fail_after(30):
                await ready.wait()
            yield process, ports[0], lines
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()  # only the process this test started
            await process.wait()


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(["curl", "-sS", "--max-time", "20", *args], capture_stdout=True,
                                      capture_stderr=True, check=False)  # fmt: skip


async def test_curl_gets_the_bundle_and_an_svid(lab: CaLab, tmp_path: Path) -> None:
    bundle = str(lab.ca_dir / "bundle.pem")
    body = tmp_path / "sign.json"
    body.write_bytes(caproto.SignRequest(make_csr(ec.generate_private_key(ec.SECP256R1()))).encode())
    token = lab.issuer.token("default", "reviews")
    async with ca_process(lab) as (process, port, lines):
        fetched = await curl("--cacert", bundle, f"https://127.0.0.1:{port}/v1/bundle")
        signed = await curl(
            "--cacert", bundle, "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
            "--data-binary", f"@{body}", f"https://127.0.0.1:{port}/v1/sign",
        )  # fmt: skip
        refused = await curl(
            "--cacert", bundle, "-w", "%{http_code}", "--data-binary", f"@{body}", f"https://127.0.0.1:{port}/v1/sign"
        )
    assert fetched.returncode == 0, fetched.stderr
    assert caproto.parse_bundle(fetched.stdout).roots == lab.roots
    assert signed.returncode == 0, signed.stderr
    assert str(caproto.parse_sign_response(signed.stdout).spiffe_id) == "spiffe://cluster.local/ns/default/sa/reviews"
    assert refused.stdout.endswith(b"401")
    assert json.loads(refused.stdout[:-3])["error"].startswith("no credential")
    assert process.returncode == 0
    assert any("event=issued" in line and "credential=token" in line for line in lines)
    assert any("event=refused" in line and "refusal=no_credential" in line for line in lines)
    assert any("event=signal signal=SIGTERM" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


CA_UID = CA_GID = 1337  # deploy/ca: runAsUser, runAsGroup and fsGroup


@pytest.fixture
def shared_lab() -> Iterator[CaLab]:
    """A lab another uid can reach (tmp_path's parents are root's alone), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mtlsmesh-ca-uid-"))
    try:
        root.chmod(0o755)
        lab = CaLab.create(root)
        lab.jwks.chmod(0o644)
        yield lab
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def as_a_secret_volume_with_fsgroup(lab: CaLab, gid: int) -> None:
    """What the kubelet makes of the CA Secret with defaultMode 0400 and fsGroup: root's files, the pod's group,
    and group read added (kubernetes/kubernetes#57923)."""
    for path in lab.ca_dir.iterdir():
        os.chown(path, 0, gid)
        path.chmod(0o440 if path.name.endswith("-key.pem") else 0o444)
    os.chown(lab.ca_dir, 0, gid)
    lab.ca_dir.chmod(0o2750)  # the volume's directory: the group's, setgid, as the kubelet leaves it


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the CA as another uid")
async def test_a_non_root_ca_serves_with_its_key_in_its_own_group(shared_lab: CaLab) -> None:
    as_a_secret_volume_with_fsgroup(shared_lab, CA_GID)
    async with ca_process(shared_lab, user=CA_UID, group=CA_GID, extra_groups=[]) as (_, port, lines):
        fetched = await curl("--cacert", str(shared_lab.ca_dir / "bundle.pem"), f"https://127.0.0.1:{port}/v1/bundle")
    assert fetched.returncode == 0, fetched.stderr
    assert caproto.parse_bundle(fetched.stdout).roots == shared_lab.roots
    assert not any("Traceback" in line for line in lines)


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the CA as another uid")
def test_a_non_root_ca_refuses_a_key_another_group_can_read(shared_lab: CaLab) -> None:
    as_a_secret_volume_with_fsgroup(shared_lab, CA_GID)
    os.chown(shared_lab.ca_dir / "root-key.pem", 0, 0)  # this one in group root, not the CA's
    result = subprocess.run(
        serve_args(shared_lab, "--listen", "127.0.0.1:0"), capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=ENV, user=CA_UID, group=CA_GID, extra_groups=[],
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.search(r"root-key\.pem: is accessible by group or others \(mode 0440\); .* own group", line), line

"""`mtlsmesh ca ...` through the real CLI entry point, in a temporary working directory.

Every refusal must be one line `mtlsmesh: error: ...` with exit status 2 and must leave the directory exactly as it
was (no new, changed or half-written file).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsmesh import ca, pem, svid
from mtlsmesh.cli import main
from mtlsmesh.identity import parse_trust_domain, workload_id
from tests.pki import MALFORMED_SAN, forge_leaf

TD = parse_trust_domain("cluster.local")
WEB = workload_id(TD, "default", "web")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def ca_dir(workdir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["ca", "init", "--intermediate"]) == 0
    capsys.readouterr()
    return workdir / "certs" / "ca"


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root with its content and mode, to prove a refusal changed nothing."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """Run argv, expect exit 2 with one error line and no change under root; return that line."""
    before = snapshot(root)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mtlsmesh: error: ")
    assert snapshot(root) == before
    return lines[0]


def make_csr(
    key: ec.EllipticCurvePrivateKey, *, claim: str = "spiffe://cluster.local/ns/kube-system/sa/admin"
) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(claim)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def tamper_signature(pem: bytes) -> bytes:
    """Flip a bit in the last byte of the DER, which is inside the signature: the request still parses."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE REQUEST-----\n"


# ---------------------------------------------------------------------------------------------------------------
# The happy paths


def test_init_then_issue_writes_the_documented_layout(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init"]) == 0
    assert "created CA spiffe://cluster.local in certs/ca" in capsys.readouterr().out
    assert sorted(os.listdir(workdir / "certs" / "ca")) == ["bundle.pem", "root-key.pem", "root.pem"]
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web", "--dns", "web.default"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("issued spiffe://cluster.local/ns/default/sa/web, valid until ")
    svid_dir = workdir / "certs" / "default-web"
    assert sorted(os.listdir(svid_dir)) == ["bundle.pem", "cert.pem", "key.pem"]
    assert stat.S_IMODE((svid_dir / "key.pem").stat().st_mode) == 0o600
    (leaf,) = pem.load_certificates(svid_dir / "cert.pem")
    assert svid.leaf_spiffe_id(leaf) == WEB
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["web.default"]
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(hours=23, minutes=58) < lifetime <= timedelta(hours=24)
    assert main(["ca", "verify", "--bundle", str(svid_dir / "bundle.pem"), str(svid_dir / "cert.pem")]) == 0
    assert "OK spiffe://cluster.local/ns/default/sa/web" in capsys.readouterr().out


@pytest.mark.parametrize("key_type", [k.value for k in ca.KeyType])
def test_init_options(workdir: Path, key_type: str) -> None:
    argv = ["ca", "init", "--trust-domain", "example.org", "--dir", "myca", "--key-type", key_type, "--ttl", "90d"]
    assert main([*argv, "--intermediate", "--name-constraint"]) == 0
    authority = ca.load_authority(workdir / "myca")
    assert authority.trust_domain == parse_trust_domain("example.org")
    assert pem.key_type_name(authority.signer_cert.public_key()) == key_type
    assert len(authority.chain) == 1
    root = authority.roots[0]
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(days=90) + ca.BACKDATE
    assert root.extensions.get_extension_for_class(x509.NameConstraints).critical
    assert main(["ca", "issue", "--ca-dir", "myca", "--spiffe-id", "spiffe://example.org/billing/api"]) == 0
    # an ID outside the ns/sa convention lands in certs/<path segments joined by '-'>
    assert (workdir / "certs" / "billing-api" / "cert.pem").is_file()


def test_init_force_replaces_the_ca(ca_dir: Path) -> None:
    old_root = (ca_dir / "root.pem").read_bytes()
    assert main(["ca", "init", "--force"]) == 0
    assert (ca_dir / "root.pem").read_bytes() != old_root
    assert sorted(os.listdir(ca_dir)) == ["bundle.pem", "root-key.pem", "root.pem"]


def test_issue_force_replaces_the_svid(ca_dir: Path, workdir: Path) -> None:
    argv = ["ca", "issue", "--namespace", "default", "--service-account", "web", "--out", "svid"]
    assert main(argv) == 0
    first = (workdir / "svid" / "key.pem").read_bytes()
    assert main([*argv, "--force", "--ttl", "1h"]) == 0
    assert (workdir / "svid" / "key.pem").read_bytes() != first


def test_issue_from_a_csr_takes_only_its_key(ca_dir: Path, workdir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (workdir / "req.pem").write_bytes(make_csr(key))
    argv = ["ca", "issue", "--namespace", "default", "--service-account", "web", "--csr", "req.pem", "--out", "o"]
    assert main(argv) == 0
    assert sorted(os.listdir(workdir / "o")) == ["bundle.pem", "cert.pem"]  # no key: the requester keeps it
    leaf, *chain = pem.load_certificates(workdir / "o" / "cert.pem")
    assert chain == list(ca.load_authority(ca_dir).chain)
    pem.check_key_matches(leaf, key, "csr key")
    assert svid.leaf_spiffe_id(leaf) == WEB  # the flags' ID, not the one the request claims
    assert len(leaf.subject) == 0


def test_k8s_secret_goes_to_stdout_and_nothing_to_disk(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(workdir)
    assert main(["ca", "issue", "--namespace", "shop", "--service-account", "reviews", "--k8s-secret"]) == 0
    out, err = capsys.readouterr()
    assert snapshot(workdir) == before
    assert "as a Kubernetes Secret on stdout" in err
    secret = yaml.safe_load(out)
    assert secret["apiVersion"] == "v1"
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == "mtlsmesh-svid-reviews"
    assert secret["metadata"]["namespace"] == "shop"
    assert secret["metadata"]["labels"]["app.kubernetes.io/name"] == "mtlsmesh"
    assert secret["metadata"]["annotations"]["mtlsmesh.io/spiffe-id"] == "spiffe://cluster.local/ns/shop/sa/reviews"
    data = {name: base64.b64decode(value) for name, value in secret["data"].items()}
    assert sorted(data) == ["bundle.pem", "cert.pem", "key.pem"]
    leaf, intermediate = pem.parse_certificates(data["cert.pem"], "cert.pem")
    assert (intermediate,) == ca.load_authority(ca_dir).chain
    pem.check_key_matches(leaf, pem.parse_private_key(data["key.pem"], "key.pem"), "secret")
    assert str(svid.leaf_spiffe_id(leaf)) == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert pem.parse_certificates(data["bundle.pem"], "bundle") == ca.load_authority(ca_dir).roots
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(secret, "1.30", strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--spiffe-id", "spiffe://cluster.local/a//b"], r"invalid SPIFFE ID .*empty segment \(ID-8\)"),
        (["--spiffe-id", "spiffe://Cluster.local/a"], r"must be lowercase \(ID-4\)"),
        (["--spiffe-id", "http://cluster.local/a"], r"the scheme must be 'spiffe://' \(ID-1\)"),
        (["--spiffe-id", "spiffe://cluster.local"], r"a workload ID needs a path.*\(L-2\)"),
        (["--spiffe-id", "spiffe://other.td/a"], r"not in this CA's trust domain 'cluster.local'.*\(S-5\)"),
        (["--namespace", "a/b", "--service-account", "web"], r"must be one path segment.*\(ID-10\)"),
        (["--namespace", "default"], r"--namespace: needs --service-account too"),
        (["--spiffe-id", "spiffe://cluster.local/a", "--service-account", "x"], r"goes with --namespace"),
        (
            ["--namespace", "d", "--service-account", "w", "--ttl", "20y"],
            r"it could go until \S+Z \(a TTL of at most",
        ),
        (["--namespace", "d", "--service-account", "w", "--ttl", "10x"], r"--ttl: '10x' is not a duration"),
        (["--namespace", "d", "--service-account", "w", "--ttl", "0h"], r"--ttl: '0h': the duration must be positive"),
        (["--namespace", "d", "--service-account", "w", "--dns", "a..b"], r"'a\.\.b' is not a valid DNS name"),
        (["--namespace", "d", "--service-account", "w", "--k8s-secret", "--out", "x"], r"goes with neither --csr"),
        (["--spiffe-id", "spiffe://cluster.local/a/b", "--k8s-secret"], r"needs an ID of the form .*/ns/NS/sa/SA"),
        (["--namespace", "Default", "--service-account", "w", "--k8s-secret"], r"'Default' is not a valid Kubernetes"),
        (["--namespace", "d", "--service-account", "w", "--csr", "missing.pem"], r"missing\.pem: no such file"),
        (["--namespace", "d", "--service-account", "w", "--ca-dir", "nowhere"], r"nowhere: no CA directory here"),
    ],
)
def test_issue_refuses(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    line = refused(["ca", "issue", *argv], capsys, workdir)
    assert re.search(message, line), line


def test_a_refusal_citing_a_rule_says_where_rules_are_explained(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["ca", "issue", "--spiffe-id", "spiffe://cluster.local/a//b"], capsys, workdir)
    assert line.endswith("the path has an empty segment (ID-8); see docs/svid-profile.md"), line
    line = refused(["ca", "issue", "--namespace", "default"], capsys, workdir)
    assert line == "mtlsmesh: error: --namespace: needs --service-account too"  # no rule cited, no pointer


def test_issue_refuses_an_existing_output(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ca", "issue", "--namespace", "default", "--service-account", "web"]
    assert main(argv) == 0
    capsys.readouterr()
    line = refused(argv, capsys, workdir)
    assert line == "mtlsmesh: error: certs/default-web/cert.pem: already exists (--force replaces it)"
    # Even one existing file of the three refuses the whole write.
    for name in ("cert.pem", "bundle.pem"):
        (workdir / "certs" / "default-web" / name).unlink()
    line = refused(argv, capsys, workdir)
    assert line == "mtlsmesh: error: certs/default-web/key.pem: already exists (--force replaces it)"


def test_init_refuses_an_existing_ca(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(["ca", "init"], capsys, workdir)
    assert line == "mtlsmesh: error: certs/ca/root.pem: already exists (--force replaces it)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trust-domain", "Cluster.local"], r"must be lowercase \(ID-4\)"),
        (["--trust-domain", "td:443"], r"a port or ':' is not allowed.*\(ID-3\)"),
        (["--ttl", "ten years"], r"--ttl: 'ten years' is not a duration"),
        (["--ttl", "200y"], r"--ttl: '200y': longer than 100y"),
    ],
)
def test_init_refuses(workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    line = refused(["ca", "init", *argv], capsys, workdir)
    assert re.search(message, line), line
    assert not (workdir / "certs").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "intermediate.pem").write_text("garbage\n"), r"intermediate\.pem: no PEM certificate found"),
        (
            lambda d: (d / "root.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            r"root\.pem: corrupt PEM certificate",
        ),
        (lambda d: (d / "intermediate-key.pem").write_text("x"), r"intermediate-key\.pem: no PEM private key found"),
        (
            lambda d: (d / "intermediate-key.pem").write_bytes((d / "root-key.pem").read_bytes()),
            r"intermediate-key\.pem: the private key does not match the certificate",
        ),
        (
            lambda d: (d / "root-key.pem").write_bytes(pem.render_private_key(ec.generate_private_key(ec.SECP256R1()))),
            r"root-key\.pem: the private key does not match the certificate",
        ),
        (lambda d: (d / "intermediate-key.pem").unlink(), r"intermediate-key\.pem: no such file"),
    ],
)
def test_issue_refuses_a_damaged_ca(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str], damage: object, message: str
) -> None:
    damage(ca_dir)  # type: ignore[operator]
    line = refused(["ca", "issue", "--namespace", "default", "--service-account", "web"], capsys, workdir)
    assert re.search(message, line), line


def test_issue_refuses_a_csr_whose_signature_does_not_verify(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_csr(ec.generate_private_key(ec.SECP256R1()))
    bad = tamper_signature(good)
    x509.load_pem_x509_csr(bad)  # it still parses: only the signature is wrong
    (workdir / "bad.pem").write_bytes(bad)
    line = refused(
        ["ca", "issue", "--namespace", "default", "--service-account", "web", "--csr", "bad.pem"], capsys, workdir
    )
    assert line == "mtlsmesh: error: bad.pem: the request's signature does not verify; refusing to sign its key"


def test_issue_refuses_a_file_that_is_not_a_csr(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "cert.pem").write_bytes((ca_dir / "root.pem").read_bytes())
    line = refused(
        ["ca", "issue", "--namespace", "default", "--service-account", "web", "--csr", "cert.pem"], capsys, workdir
    )
    assert line.startswith("mtlsmesh: error: cert.pem: not a PEM certificate request")


def test_issue_warns_about_a_key_others_can_read(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(ca_dir / "intermediate-key.pem", 0o640)
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mtlsmesh: warning: certs/ca/intermediate-key.pem is accessible by group or others (mode 0640); "
        "run chmod 600 certs/ca/intermediate-key.pem"
    ]
    os.chmod(ca_dir / "intermediate-key.pem", 0o600)
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "db"]) == 0
    assert capsys.readouterr().err == ""


def test_usage_errors_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ca"], ["ca", "issue"], ["ca", "issue", "--spiffe-id", "x", "--namespace", "y"], ["ca", "verify"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not any(workdir.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_describes_a_chain(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web", "--out", "w"]) == 0
    capsys.readouterr()
    assert main(["ca", "inspect", "w/cert.pem"]) == 0
    out = capsys.readouterr().out
    leaf = pem.load_certificates(workdir / "w" / "cert.pem")[0]
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest())
    assert "w/cert.pem: certificate 1 of 2 (leaf)" in out
    assert "SPIFFE ID:   spiffe://cluster.local/ns/default/sa/web" in out
    assert "issuer:      " + leaf.issuer.rfc4514_string() in out
    assert "key type:    ecdsa-p256" in out
    assert f"SHA-256:     {fingerprint}" in out
    assert "(23h59m)" in out or "(23h58m)" in out
    assert "SVID:        yes, a valid SVID" in out
    assert "SVID:        yes, a valid SPIFFE signing certificate" in out  # the intermediate
    assert main(["ca", "inspect", "--json", "w/cert.pem"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["kind"] for row in rows] == ["leaf", "CA certificate"]
    assert rows[0]["sha256_fingerprint"] == fingerprint


def test_inspect_json_says_why_not_valid(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    authority = ca.load_authority(ca_dir)
    past = datetime.now(UTC) - timedelta(days=3)
    old_ca = ca.create_ca(TD, now=past)
    ca.issue_svid(old_ca, WEB, now=past, ttl=timedelta(hours=1)).write_to_dir(workdir / "old")
    assert main(["ca", "inspect", "--json", "old/cert.pem"]) == 0
    [info] = json.loads(capsys.readouterr().out)  # a list of one: the shape does not depend on the count
    assert info["spiffe_id"] == str(WEB)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["not_after"])
    assert -3 * 86400 < info["seconds_left"] < -2 * 86400
    assert info["valid_svid"] is False
    assert info["reason"] == "outside its validity period"
    assert info["time_left"].startswith("expired 2d2")
    assert main(["ca", "inspect", "--json", "certs/ca/intermediate.pem"]) == 0
    [info] = json.loads(capsys.readouterr().out)
    assert info["kind"] == "CA certificate"
    assert info["spiffe_id"] == "spiffe://cluster.local"
    assert info["subject"] == authority.signer_cert.subject.rfc4514_string()
    assert info["valid_svid"] is True


def test_inspect_refuses_a_corrupt_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "junk.pem").write_text("not a certificate\n")
    line = refused(["ca", "inspect", "junk.pem"], capsys, workdir)
    assert line == "mtlsmesh: error: junk.pem: no PEM certificate found"
    line = refused(["ca", "inspect", "absent.pem"], capsys, workdir)
    assert line == "mtlsmesh: error: absent.pem: no such file"


def write_malformed_leaf(ca_dir: Path, path: Path) -> None:
    """A leaf signed by the CA in `ca_dir` (with the intermediate after it) whose subjectAltName does not parse."""
    authority = ca.load_authority(ca_dir)
    cert, _ = forge_leaf(authority, now=datetime.now(UTC) - timedelta(minutes=1), san=MALFORMED_SAN)
    path.write_bytes(pem.render_certificates([cert, *authority.chain]))


def test_inspect_refuses_malformed_extensions_in_one_line(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_malformed_leaf(ca_dir, workdir / "weird.pem")
    for argv in (["ca", "inspect", "weird.pem"], ["ca", "inspect", "--json", "weird.pem"]):
        line = refused(argv, capsys, workdir)
        assert re.fullmatch(
            r"mtlsmesh: error: weird\.pem: malformed certificate extensions: error parsing asn1.*", line
        )


# ---------------------------------------------------------------------------------------------------------------
# Paths this user may not reach: one line, never a traceback

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def run_as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/", env=env)


@pytest.fixture
def nobody() -> None:
    """Root reads everything, so the refusal needs another uid; skip where that uid cannot run this tree."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI as an unprivileged uid")
    if run_as_nobody(["-c", "import mtlsmesh.cli"]).returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot read this source tree")


@pytest.mark.usefixtures("nobody")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ca", "init", "--dir", "{private}/ca"], "{private}/ca: cannot write here: Permission denied"),
        (["ca", "issue", "--ca-dir", "{private}/ca", "--namespace", "a", "--service-account", "b", "--out", "x"],
         "{private}/ca: cannot read: Permission denied"),
        (["ca", "bundle", "--bundle", "{private}/bundle.pem", "--add", "{private}/root.pem"],
         "{private}/bundle.pem: cannot read: Permission denied"),
    ],
)  # fmt: skip
def test_a_directory_this_user_cannot_enter_is_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # owned by root: uid 65534 may not look inside
    args = [arg.format(private=private) for arg in argv]
    result = run_as_nobody(["-m", "mtlsmesh", *args])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"mtlsmesh: error: {message.format(private=private)}\n"
    assert os.listdir(private) == []


# ---------------------------------------------------------------------------------------------------------------
# verify


def test_verify_refuses_with_the_reason_and_exit_1(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    other = ca.create_ca(TD, now=now)
    ca.issue_svid(other, WEB, now=now).write_to_dir(workdir / "stranger")
    bundle = str(ca_dir / "bundle.pem")
    assert main(["ca", "verify", "--bundle", bundle, "stranger/cert.pem"]) == 1
    assert capsys.readouterr().err == (
        "mtlsmesh: invalid: stranger/cert.pem: chain verification failed: unable to get local issuer certificate\n"
    )
    # A CA certificate chains fine but is never an SVID.
    assert main(["ca", "verify", "--bundle", bundle, str(ca_dir / "root.pem")]) == 1
    assert "CA:true" in capsys.readouterr().err
    # An expired leaf from a CA in the bundle.
    past = now - timedelta(hours=3)
    old = ca.create_ca(TD, now=past, intermediate=True)
    ca.issue_svid(old, WEB, now=past, ttl=timedelta(hours=1)).write_to_dir(workdir / "expired")
    assert main(["ca", "verify", "--bundle", "expired/bundle.pem", "expired/cert.pem"]) == 1
    assert "certificate has expired" in capsys.readouterr().err
    # The intermediate is needed: a leaf alone does not chain to the root.
    issued = ca.issue_svid(ca.load_authority(ca_dir), WEB, now=now)
    (workdir / "leaf-only.pem").write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    assert main(["ca", "verify", "--bundle", bundle, "leaf-only.pem"]) == 1
    assert "unable to get local issuer certificate" in capsys.readouterr().err


def test_verify_calls_malformed_extensions_invalid(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_malformed_leaf(ca_dir, workdir / "weird.pem")
    assert main(["ca", "verify", "--bundle", str(ca_dir / "bundle.pem"), "weird.pem"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(r"mtlsmesh: invalid: weird\.pem: .*malformed certificate extensions.*\n", err)


def test_verify_checks_the_trust_domain(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web", "--out", "w"]) == 0
    capsys.readouterr()
    argv = ["ca", "verify", "--bundle", "w/bundle.pem", "w/cert.pem", "--trust-domain"]
    assert main([*argv, "cluster.local"]) == 0
    assert main([*argv, "example.org"]) == 1
    assert "is not in trust domain example.org (V-7); see docs/svid-profile.md\n" in capsys.readouterr().err


def test_verify_usage_errors(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "junk.pem").write_text("junk")
    line = refused(["ca", "verify", "--bundle", "junk.pem", str(ca_dir / "root.pem")], capsys, workdir)
    assert line == "mtlsmesh: error: junk.pem: no PEM certificate found"
    line = refused(["ca", "verify", "--bundle", str(ca_dir / "bundle.pem"), "absent.pem"], capsys, workdir)
    assert line == "mtlsmesh: error: absent.pem: no such file"


# ---------------------------------------------------------------------------------------------------------------
# bundle


def test_bundle_merges_roots_for_rotation(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--dir", "newca"]) == 0
    capsys.readouterr()
    old_root, new_root = str(ca_dir / "root.pem"), str(workdir / "newca" / "root.pem")
    assert main(["ca", "bundle", "--add", old_root, "--add", new_root, "--add", old_root, "--bundle", "b.pem"]) == 0
    assert capsys.readouterr().err == "b.pem: 2 roots, 2 of them new\n"
    roots = pem.load_certificates(workdir / "b.pem")
    assert roots == (*pem.load_certificates(old_root), *pem.load_certificates(new_root))
    assert main(["ca", "bundle", "--add", new_root, "--bundle", "b.pem"]) == 0  # extending: nothing new
    assert capsys.readouterr().err == "b.pem: 2 roots, 0 of them new\n"
    assert pem.load_certificates(workdir / "b.pem") == roots
    # Leaves of both CAs verify against the merged bundle.
    assert main(["ca", "issue", "--namespace", "a", "--service-account", "x", "--out", "old"]) == 0
    assert main(["ca", "issue", "--ca-dir", "newca", "--namespace", "a", "--service-account", "x", "--out", "new"]) == 0
    assert main(["ca", "verify", "--bundle", "b.pem", "old/cert.pem"]) == 0
    assert main(["ca", "verify", "--bundle", "b.pem", "new/cert.pem"]) == 0
    # Without --bundle the merged PEM goes to stdout.
    capsys.readouterr()
    assert main(["ca", "bundle", "--add", old_root, "--add", new_root]) == 0
    assert pem.parse_certificates(capsys.readouterr().out.encode(), "stdout") == roots


def test_bundle_refuses_a_leaf(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web", "--out", "w"]) == 0
    capsys.readouterr()
    line = refused(
        ["ca", "bundle", "--add", str(ca_dir / "root.pem"), "--add", "w/cert.pem", "--bundle", "b.pem"], capsys, workdir
    )
    assert line == "mtlsmesh: error: w/cert.pem: a leaf is not a CA certificate"


# ---------------------------------------------------------------------------------------------------------------
# root rotation: bundle --add, rotate, bundle --remove


def test_a_root_rotation_typed_in_three_commands(
    ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ca.load_authority(ca_dir)
    assert main(["ca", "init", "--dir", "next"]) == 0
    capsys.readouterr()
    new_root = pem.load_certificates(workdir / "next" / "root.pem")[0]
    bundle = str(ca_dir / "bundle.pem")

    # Switching before the new root is trusted everywhere would cut off every sidecar: refused.
    line = refused(["ca", "rotate", "--dir", str(ca_dir), "--to", "next"], capsys, workdir)
    assert line.startswith(f"mtlsmesh: error: {bundle}: does not trust the new root yet; first run `mtlsmesh ca bundle")

    # (a) trust the new root as well
    assert main(["ca", "bundle", "--bundle", bundle, "--add", "next/root.pem"]) == 0
    assert ca.load_authority(ca_dir).roots == (old.roots[0], new_root)
    # (b) sign with it
    assert main(["ca", "rotate", "--dir", str(ca_dir), "--to", "next"]) == 0
    assert "--remove" in capsys.readouterr().out
    switched = ca.load_authority(ca_dir)
    assert switched.signer_cert == new_root and switched.chain == ()
    assert switched.roots == (new_root, old.roots[0])
    assert sorted(os.listdir(ca_dir)) == ["bundle.pem", "previous-root.pem", "root-key.pem", "root.pem"]
    assert stat.S_IMODE((ca_dir / "root-key.pem").stat().st_mode) == 0o600
    assert pem.load_certificates(ca_dir / "previous-root.pem") == (old.roots[0],)
    assert main(["ca", "issue", "--namespace", "a", "--service-account", "x", "--out", "after"]) == 0
    assert main(["ca", "verify", "--bundle", bundle, "after/cert.pem"]) == 0
    assert pem.load_certificates("after/cert.pem")[0].issuer == new_root.subject
    # (c) stop trusting the old root
    capsys.readouterr()
    assert main(["ca", "bundle", "--bundle", bundle, "--remove", str(ca_dir / "previous-root.pem")]) == 0
    assert capsys.readouterr().err == f"{bundle}: 1 roots, 0 of them new, 1 removed\n"
    assert ca.load_authority(ca_dir).roots == (new_root,)


def test_rotate_and_remove_refusals(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--dir", "other", "--trust-domain", "other.example"]) == 0
    capsys.readouterr()
    line = refused(["ca", "rotate", "--dir", str(ca_dir), "--to", "other"], capsys, workdir)
    assert line == f"mtlsmesh: error: --to: other is a CA of other.example, {ca_dir} of cluster.local"
    line = refused(["ca", "rotate", "--dir", str(ca_dir), "--to", str(ca_dir)], capsys, workdir)
    assert line == f"mtlsmesh: error: --to: {ca_dir} already signs under the root of {ca_dir}"
    bundle = str(ca_dir / "bundle.pem")
    line = refused(["ca", "bundle", "--bundle", bundle, "--remove", str(ca_dir / "root.pem")], capsys, workdir)
    assert line == "mtlsmesh: error: --remove: that would leave the bundle empty"
    line = refused(["ca", "bundle", "--bundle", bundle], capsys, workdir)
    assert line == "mtlsmesh: error: --add: give at least one --add or --remove"


def test_init_issue_and_verify_print_json_lists(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rfc3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert main(["ca", "init", "--json"]) == 0
    [made] = json.loads(capsys.readouterr().out)
    assert made["trust_domain"] == "cluster.local" and made["signer"] == "root" and made["dir"] == "certs/ca"
    assert re.fullmatch(rfc3339, made["not_after"])
    assert main(["ca", "issue", "--namespace", "default", "--service-account", "web", "--ttl", "1h30m", "--json"]) == 0
    [issued] = json.loads(capsys.readouterr().out)
    assert issued["spiffe_id"] == str(WEB) and sorted(issued["files"]) == ["bundle.pem", "cert.pem", "key.pem"]
    not_after = datetime.fromisoformat(issued["not_after"].replace("Z", "+00:00"))
    assert timedelta(minutes=89) < not_after - datetime.now(UTC) <= timedelta(minutes=90)
    cert = f"{issued['dir']}/cert.pem"
    assert main(["ca", "verify", "--bundle", "certs/ca/bundle.pem", "--json", cert]) == 0
    [verdict] = json.loads(capsys.readouterr().out)
    assert verdict == {"file": cert, "valid": True, "spiffe_id": str(WEB), "not_after": issued["not_after"],
                       "reason": None}  # fmt: skip
    assert main(["ca", "verify", "--bundle", cert, "--json", "certs/ca/root.pem"]) == 1
    [refused] = json.loads(capsys.readouterr().out)
    assert refused["valid"] is False and refused["reason"].startswith("chain verification failed")


def test_bundle_and_rotate_json(ca_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--dir", "next"]) == 0
    capsys.readouterr()
    old_root = pem.load_certificates(ca_dir / "root.pem")[0]
    new_root = pem.load_certificates(workdir / "next" / "root.pem")[0]
    sha = {name: cert.fingerprint(hashes.SHA256()).hex() for name, cert in (("old", old_root), ("new", new_root))}
    bundle = str(ca_dir / "bundle.pem")

    assert main(["ca", "bundle", "--bundle", bundle, "--add", "next/root.pem", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert err == "" and [(row["sha256"], row["change"], row["bundle"]) for row in rows] == [
        (sha["old"], "kept", bundle),
        (sha["new"], "added", bundle),
    ]
    assert rows[1]["not_after"] == new_root.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[1]["subject"] == new_root.subject.rfc4514_string() and rows[1]["expired"] is False
    assert "pem" not in rows[0]  # the file has the PEM
    assert pem.load_certificates(bundle) == (old_root, new_root)

    assert main(["ca", "rotate", "--dir", str(ca_dir), "--to", "next", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {
        "dir": str(ca_dir),
        "to": "next",
        "trust_domain": "cluster.local",
        "signer": new_root.subject.rfc4514_string(),
        "new_root_sha256": sha["new"],
        "previous_root_sha256": sha["old"],
        "previous_root_file": str(ca_dir / "previous-root.pem"),
        "roots_trusted": 2,
        "next_step": f"mtlsmesh ca bundle --bundle {bundle} --remove {ca_dir / 'previous-root.pem'}",
    }
    assert ca.load_authority(ca_dir).signer_cert == new_root

    assert main(["ca", "bundle", "--bundle", bundle, "--remove", str(ca_dir / "previous-root.pem"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["sha256"], row["change"]) for row in rows] == [(sha["new"], "kept"), (sha["old"], "removed")]
    assert pem.load_certificates(bundle) == (new_root,)
    # To stdout: the JSON is stdout, so it carries each root's PEM.
    assert main(["ca", "bundle", "--add", "next/root.pem", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["sha256"], row["change"], row["bundle"]) == (sha["new"], "added", "stdout")
    assert pem.parse_certificates(row["pem"].encode(), "json") == (new_root,)

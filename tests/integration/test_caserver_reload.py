"""The CA service follows its directory: a root rotation in three operator steps while it serves, a bad file
refused while the old authority keeps serving, its own SVID reissued at half its life; and what it refuses to start
with, its metrics, and two replicas on one directory.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509

from mtlsmesh import ca, caclient, caserver, handshake, http11, pem, tls
from mtlsmesh.cli import main
from mtlsmesh.errors import CertificateError, ConfigError
from tests.integration.castack import CaLab, endpoint, enroll, eventually, make_ca_dir, renew, running_ca, token_for
from tests.integration.mesh import connect


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.fixture(autouse=True)
def ca_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")


async def served_certificate(port: int, roots: tuple[x509.Certificate, ...]) -> x509.Certificate:
    """The certificate the CA presents to a new handshake."""
    seen: list[bytes] = []
    context = handshake.build_context(None, handshake.Side.CLIENT, roots=roots, alpn=(b"http/1.1",))
    stream = tls.TLSStream(await connect(port), context, handshake.Side.CLIENT)
    with trio.fail_after(10):
        await stream.do_handshake(lambda: seen.append(stream.peer_certificate_der() or b""))
    await stream.aclose()
    return x509.load_der_x509_certificate(seen[0])


def ca_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.ca" and f"event={event}" in r.getMessage()]


async def test_a_root_rotation_while_serving(
    lab: CaLab, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    old_root = lab.roots[0]
    nxt = tmp_path / "next"
    new_root = make_ca_dir(nxt).roots[0]
    bundle_file = str(lab.ca_dir / "bundle.pem")
    async with running_ca(lab.config()) as (_, port, _):
        before = await caclient.fetch_bundle(endpoint(port), lab.roots)
        _, old_svid = await enroll(port, lab.roots, token_for(lab))

        # (a) the new root joins the bundle: served at once, with a higher sequence; still signed by the old root
        assert main(["ca", "bundle", "--bundle", bundle_file, "--add", str(nxt / "root.pem")]) == 0
        both = (old_root, new_root)

        async def has_both() -> bool:
            return (await caclient.fetch_bundle(endpoint(port), lab.roots)).roots == both

        await eventually(has_both)
        after_a = await caclient.fetch_bundle(endpoint(port), lab.roots)
        assert after_a.sequence > before.sequence
        answer, _ = await enroll(port, both, token_for(lab))
        assert answer.chain[0].issuer == old_root.subject and answer.bundle == both

        # (b) the signer switches: new SVIDs (and the CA's own) come from the new root; an old SVID still renews
        assert main(["ca", "rotate", "--dir", str(lab.ca_dir), "--to", str(nxt)]) == 0

        async def signs_with_new() -> bool:
            return (await served_certificate(port, both)).issuer == new_root.subject

        await eventually(signs_with_new)
        answer, _ = await enroll(port, both, token_for(lab))
        assert answer.chain[0].issuer == new_root.subject and answer.bundle == (new_root, old_root)
        renewed, new_svid = await renew(port, handshake.Material(old_svid.chain, old_svid.key, both))
        assert renewed.chain[0].issuer == new_root.subject

        # (c) the old root leaves the bundle: an SVID it signed no longer gets anywhere
        assert main(["ca", "bundle", "--bundle", bundle_file, "--remove", str(lab.ca_dir / "previous-root.pem")]) == 0

        async def only_new() -> bool:
            return (await caclient.fetch_bundle(endpoint(port), (new_root,))).roots == (new_root,)

        await eventually(only_new)
        with pytest.raises(caclient.CaError, match="unknown ca"):
            await renew(port, handshake.Material(old_svid.chain, old_svid.key, (new_root,)))
        again, _ = await renew(port, handshake.Material(new_svid.chain, new_svid.key, (new_root,)))
        assert again.bundle == (new_root,)
    capsys.readouterr()
    assert len(ca_lines(caplog, "reloaded")) >= 3
    assert ca_lines(caplog, "reload_refused") == []  # the debounce read each step once it was complete


async def test_a_bad_new_directory_is_refused_and_the_old_authority_keeps_serving(
    lab: CaLab, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_ca(lab.config()) as (service, port, _):
        (lab.ca_dir / "root.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        await eventually(lambda: ca_lines(caplog, "reload_refused"))
        answer, _ = await enroll(port, lab.roots, token_for(lab))
        assert answer.chain[0].issuer == lab.roots[0].subject
        # A key that others may read is refused the same way, once the directory is whole again.
        (lab.ca_dir / "root.pem").write_bytes(pem.render_certificates(lab.roots))
        os.chmod(lab.ca_dir / "root-key.pem", 0o644)
        await eventually(lambda: len(ca_lines(caplog, "reload_refused")) >= 2)
        metrics = service.metrics.render().decode()
    refused = ca_lines(caplog, "reload_refused")
    assert "corrupt PEM certificate" in refused[0]
    assert "accessible by group or others (mode 0644)" in refused[1]
    assert "mtlsmesh_ca_reload_failures_total 2.0" in metrics


async def test_its_own_svid_is_reissued_at_half_its_life(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    async with running_ca(lab.config(ttl=timedelta(seconds=3))) as (_, port, _):
        first = await served_certificate(port, lab.roots)
        assert first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        ) == ["mtlsmesh-ca.mtlsmesh-system.svc"]

        await trio.sleep(0.5)
        assert (await served_certificate(port, lab.roots)).serial_number == first.serial_number  # not yet

        async def rotated() -> bool:
            return (await served_certificate(port, lab.roots)).serial_number != first.serial_number

        await eventually(rotated, timeout=5)
        answer, _ = await enroll(port, lab.roots, token_for(lab))  # new handshakes work with the new one
    assert answer.chain[0].not_valid_after_utc - answer.chain[0].not_valid_before_utc <= timedelta(seconds=63)
    assert 1 <= len(ca_lines(caplog, "own_svid_rotated")) <= 2  # at 1.5 s, and perhaps at 2.25 s


def test_a_key_others_can_read_stops_the_start(lab: CaLab) -> None:
    os.chmod(lab.ca_dir / "root-key.pem", 0o640)
    with pytest.raises(CertificateError, match=r"root-key\.pem: is accessible by group or others \(mode 0640\)"):
        caserver.CaService(lab.config())
    os.chmod(lab.ca_dir / "root-key.pem", 0o400)
    caserver.CaService(lab.config())  # owner read-only is fine


def test_a_plain_http_jwks_url_or_a_missing_file_stops_the_start(lab: CaLab) -> None:
    with pytest.raises(ConfigError, match="--token-jwks: 'http://kubernetes/openid/v1/jwks': plain http is refused"):
        caserver.CaService(lab.config(jwks="http://kubernetes/openid/v1/jwks"))
    with pytest.raises(ConfigError, match="cannot read the JWKS: No such file"):
        caserver.CaService(lab.config(jwks=str(lab.root / "absent.json")))


async def test_metrics_in_the_prometheus_text_format(lab: CaLab) -> None:
    async with running_ca(lab.config()) as (_, port, metrics_port):
        await enroll(port, lab.roots, token_for(lab))
        stream = await connect(metrics_port)
        with trio.fail_after(10):
            answer = await http11.request(stream, "GET", "/metrics", host="localhost")
        await stream.aclose()
    text = answer.body.decode()
    assert answer.status == 200 and dict(answer.headers)["content-type"].startswith("text/plain")
    assert 'mtlsmesh_ca_issued_total{credential="token"} 1.0' in text
    assert "# TYPE mtlsmesh_ca_refused_total counter" in text
    assert "mtlsmesh_ca_bundle_roots 1.0" in text


async def test_two_replicas_on_one_directory(lab: CaLab) -> None:
    async with (
        running_ca(lab.config()) as (_, port_a, _),
        running_ca(lab.config(metrics_listen=None)) as (_, port_b, _),
    ):
        a, material = await enroll(port_a, lab.roots, token_for(lab))
        b, _ = await renew(port_b, material)  # renewed at the other replica
        bundle_a = await caclient.fetch_bundle(endpoint(port_a), lab.roots)
        bundle_b = await caclient.fetch_bundle(endpoint(port_b), lab.roots)
    assert a.spiffe_id == b.spiffe_id and a.serial != b.serial
    assert bundle_a.roots == bundle_b.roots == lab.roots
    ca.load_authority(lab.ca_dir)  # neither wrote anything into the directory
    assert sorted(os.listdir(lab.ca_dir)) == ["bundle.pem", "root-key.pem", "root.pem"]


async def test_a_chmod_alone_is_noticed_both_ways(lab: CaLab, caplog: pytest.LogCaptureFixture) -> None:
    # A chmod changes no inode, mtime or size: the directory's stamp must see the mode itself.
    async with running_ca(lab.config()) as (_, port, _):
        os.chmod(lab.ca_dir / "root-key.pem", 0o644)  # the key made readable on a running CA: noticed
        await eventually(lambda: ca_lines(caplog, "reload_refused"))
        os.chmod(lab.ca_dir / "root-key.pem", 0o600)  # and the fix is picked up without touching the file
        await eventually(lambda: ca_lines(caplog, "reloaded"))
        answer, _ = await enroll(port, lab.roots, token_for(lab))
    assert "accessible by group or others (mode 0644)" in ca_lines(caplog, "reload_refused")[0]
    assert answer.chain[0].issuer == lab.roots[0].subject

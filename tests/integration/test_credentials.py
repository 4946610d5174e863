"""The sidecar's credentials from files: what `load_credentials` accepts and what it refuses (naming the file), and
how `CredentialStore` follows the files: a changed file, a Kubernetes Secret's `..data` swap, a bad or half-written
update (refused once, loudly, while the old material keeps serving), a vanished file, and the polling task.

Every certificate is made by the test CA in a temporary directory.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes

from bench.handshake import openssl_handshake
from mtlsmesh import durations, pem
from mtlsmesh.config import CredentialFiles
from mtlsmesh.credentials import CredentialStore, load_credentials
from mtlsmesh.errors import CertificateError
from mtlsmesh.identity import TrustDomain
from tests.pki import TD, Pki, files_in

# --- load_credentials -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("intermediate", [False, True], ids=["root-signed", "with-intermediate"])
def test_a_good_svid_loads_with_contexts_that_work(tmp_path: Path, intermediate: bool) -> None:
    pki = Pki(tmp_path, intermediate=intermediate)
    server_files, client_files = pki.issue("server"), pki.issue("client")
    server = load_credentials(server_files, TD)
    client = load_credentials(client_files, TD)
    leaf = pem.load_certificates(server_files.cert)[0]
    assert server.spiffe_id == pki.id_of("server")
    assert server.not_after == leaf.not_valid_after_utc
    assert server.fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert len(server.material.chain) == (2 if intermediate else 1)
    assert [entry[0] for entry in server.stamp] == [
        os.path.realpath(path) for path in (server_files.cert, server_files.key, server_files.bundle)
    ]
    assert server.describe()["intermediates"] == (1 if intermediate else 0)
    # The two contexts are what the handshakes use: one loaded SVID's client context and another's server context
    # complete a mutual handshake (openssl_handshake fails unless the server took the client's certificate).
    openssl_handshake(client.client_context, server.server_context)


CORRUPT_CERT = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
CORRUPT_KEY = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"

Breaker = Callable[[Pki, CredentialFiles, Path], str]  # spoils the files; returns the file the error must name


def corrupt(which: str, data: bytes) -> Breaker:
    def breaker(pki: Pki, files: CredentialFiles, tmp_path: Path) -> str:
        path = getattr(files, which)
        Path(path).write_bytes(data)
        return str(path)

    return breaker


def copy_leaf(make: Callable[[Pki, Path], CredentialFiles]) -> Breaker:
    """Put another SVID's certificate and key in place of ours (the bundle stays ours)."""

    def breaker(pki: Pki, files: CredentialFiles, tmp_path: Path) -> str:
        other = make(pki, tmp_path)
        shutil.copyfile(other.cert, files.cert)
        shutil.copyfile(other.key, files.key)
        return files.cert

    return breaker


def mismatched_key(pki: Pki, files: CredentialFiles, tmp_path: Path) -> str:
    shutil.copyfile(pki.issue("b").key, files.key)
    return files.key


def ca_as_leaf(pki: Pki, files: CredentialFiles, tmp_path: Path) -> str:
    authority = pki.authority
    Path(files.cert).write_bytes(pem.render_certificates([authority.signer_cert]))
    Path(files.key).write_bytes(pem.render_private_key(authority.signer_key))
    return files.cert


REFUSALS: list[tuple[str, Breaker, str]] = [
    ("corrupt-cert", corrupt("cert", CORRUPT_CERT), "corrupt PEM certificate: "),
    ("corrupt-key", corrupt("key", CORRUPT_KEY), "corrupt or encrypted PEM private key: "),
    ("no-key", corrupt("key", CORRUPT_CERT), "no PEM private key found$"),
    ("empty-bundle", corrupt("bundle", b""), "no PEM certificate found$"),
    ("mismatched-key", mismatched_key, "the private key does not match the certificate$"),
    (
        "expired",
        copy_leaf(lambda pki, _: pki.issue("old", now=pki.now - timedelta(days=2), ttl=timedelta(hours=1))),
        r"the SVID expired at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
    ),
    (
        "other-trust-domain",
        copy_leaf(lambda _, tmp: Pki(tmp / "other-td", trust_domain=TrustDomain("other.example")).issue("a")),
        "the SVID spiffe://other.example/ns/default/sa/a is not in trust domain cluster.local$",
    ),
    (
        "foreign-ca",
        copy_leaf(lambda _, tmp: Pki(tmp / "foreign-ca").issue("a")),  # same trust domain, another CA
        "the SVID does not chain to the bundle .*bundle.pem: unable to get local issuer certificate",
    ),
    ("ca-as-leaf", ca_as_leaf, r"a CA certificate \(CA:true\) is never accepted as an SVID"),
]


@pytest.mark.parametrize(("case", "breaker", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_load_credentials_refuses_naming_the_file(tmp_path: Path, case: str, breaker: Breaker, message: str) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    named = breaker(pki, files, tmp_path)
    with pytest.raises(CertificateError, match=f"^{re.escape(named)}: {message}") as caught:
        load_credentials(files, TD)
    assert caught.value.path == named


def test_a_leaf_not_yet_valid_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    leaf = pem.load_certificates(files.cert)[0]
    with pytest.raises(CertificateError, match=f"^{re.escape(files.cert)}: the SVID is not valid before 20"):
        load_credentials(files, TD, now=leaf.not_valid_before_utc - timedelta(minutes=5))
    load_credentials(files, TD, now=leaf.not_valid_before_utc)  # valid from its first second


# --- CredentialStore --------------------------------------------------------------------------------------------


def reload_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.credentials"]


def refusal(line: str) -> tuple[str, str]:
    """`event=reload_refused reason=<repr> keeping=<sha256>` as (reason, sha256)."""
    assert line.startswith("event=reload_refused reason="), line
    reason, keeping = line.removeprefix("event=reload_refused reason=").rsplit(" keeping=", 1)
    return ast.literal_eval(reason), keeping


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mtlsmesh.credentials")
    return caplog


@pytest.mark.parametrize("how", ["replaced", "rewritten-in-place"])
def test_a_changed_file_is_picked_up(tmp_path: Path, logs: pytest.LogCaptureFixture, how: str) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    store = CredentialStore.load(files, TD)
    first = store.current
    if how == "replaced":  # new files renamed into place (new inodes), as `mtlsmesh ca issue` writes them
        pki.issue("a")
    else:  # the same inodes, new contents
        fresh = pki.issue("fresh", service_account="a")
        for name in ("cert", "key"):
            Path(getattr(files, name)).write_bytes(Path(getattr(fresh, name)).read_bytes())
    assert store.check_once() is True
    assert (store.reloads, store.reload_failures) == (1, 0)
    assert store.current.fingerprint != first.fingerprint and store.current.spiffe_id == first.spiffe_id
    assert store.check_once() is False  # nothing changed since
    (line,) = reload_logs(logs)
    current = store.current
    assert line == (
        f"event=credentials_reloaded spiffe_id={current.spiffe_id} sha256={current.fingerprint} "
        f"not_after={durations.format_time(current.not_after)}"
    )


def secret_volume(pki: Pki, live: Path, generation: int, *, mtime_ns: int | None = None) -> None:
    """What the kubelet does to a Secret volume: a new `..<generation>` directory, then the `..data` symlink
    swapped to it in one rename (the files themselves are symlinks into `..data`)."""
    target = live / f"..gen{generation}"
    shutil.copytree(Path(pki.issue("a").cert).parent, target)
    if mtime_ns is not None:
        for path in target.iterdir():
            os.utime(path, ns=(mtime_ns, mtime_ns))
    (live / "..data_tmp").symlink_to(target.name)
    os.replace(live / "..data_tmp", live / "..data")
    for name in ("cert.pem", "key.pem", "bundle.pem"):
        if not (live / name).is_symlink():
            (live / name).symlink_to(f"..data/{name}")


def test_a_secret_volume_swap_is_picked_up(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    pki = Pki(tmp_path)
    live = tmp_path / "secret"
    live.mkdir()
    secret_volume(pki, live, 0)
    files = files_in(live)
    store = CredentialStore.load(files, TD)
    first = store.current
    assert {Path(entry[0]).parent.name for entry in first.stamp} == {"..gen0"}  # the real files, not the links
    # The new generation's files carry the old ones' times: the swap is seen by the path it resolves to.
    secret_volume(pki, live, 1, mtime_ns=os.stat(files.cert).st_mtime_ns)
    assert store.check_once() is True
    assert {Path(entry[0]).parent.name for entry in store.current.stamp} == {"..gen1"}
    assert store.current.fingerprint != first.fingerprint
    shutil.rmtree(live / "..gen0")  # the kubelet removes the old generation; nothing still needs it
    assert store.check_once() is False
    assert store.reloads == 1


@pytest.mark.parametrize(("case", "breaker", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_bad_update_is_refused_once_and_the_old_material_stays(
    tmp_path: Path, logs: pytest.LogCaptureFixture, case: str, breaker: Breaker, message: str
) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    store = CredentialStore.load(files, TD)
    good = store.current
    named = breaker(pki, files, tmp_path)
    assert store.check_once() is False
    assert store.current is good
    assert (store.reloads, store.reload_failures) == (0, 1)
    assert store.check_once() is False  # the same bad files: not tried, and not logged, again
    assert store.reload_failures == 1
    (line,) = reload_logs(logs)
    reason, keeping = refusal(line)
    assert re.match(f"^{re.escape(named)}: {message}", reason) and keeping == good.fingerprint
    pki.issue("a")  # a good update after the bad one
    assert store.check_once() is True
    assert (store.reloads, store.reload_failures) == (1, 1)


def test_a_half_written_update_is_taken_once_the_rest_arrives(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    store = CredentialStore.load(files, TD)
    good = store.current
    fresh = pki.issue("fresh", service_account="a")
    shutil.copyfile(fresh.cert, files.cert)  # the new certificate, the old key still in place
    assert store.check_once() is False and store.current is good
    shutil.copyfile(fresh.key, files.key)
    assert store.check_once() is True
    assert store.current.fingerprint == load_credentials(fresh, TD).fingerprint
    assert (store.reloads, store.reload_failures) == (1, 1)
    refused, reloaded = reload_logs(logs)
    assert refusal(refused) == (f"{files.key}: the private key does not match the certificate", good.fingerprint)
    assert reloaded.startswith("event=credentials_reloaded ")


def test_a_vanished_file_is_refused_once_and_taken_back(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    pki = Pki(tmp_path)
    files = pki.issue("a")
    store = CredentialStore.load(files, TD)
    good = store.current
    os.rename(files.cert, files.cert + ".away")
    assert store.check_once() is False
    assert store.check_once() is False  # still gone: counted and logged once
    assert (store.current, store.reload_failures) == (good, 1)
    os.rename(files.cert + ".away", files.cert)
    assert store.check_once() is True  # back: loaded again (the same SVID)
    assert store.current.fingerprint == good.fingerprint and store.reloads == 1
    refused, reloaded = reload_logs(logs)
    missing = os.path.realpath(files.cert)
    assert refusal(refused) == (f"cannot stat: [Errno 2] No such file or directory: {missing!r}", good.fingerprint)
    assert reloaded.startswith("event=credentials_reloaded ")


async def test_serve_reload_polls_the_files_and_outlives_a_bad_update(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    files = dataclasses.replace(pki.issue("a"), reload_interval=0.05)
    store = CredentialStore.load(files, TD)
    first = store.current.fingerprint

    async def until(condition: Callable[[], bool]) -> float:
        started = trio.current_time()
        while not condition():
            await trio.sleep(0.01)
        return trio.current_time() - started

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.serve_reload)
            Path(files.cert).write_bytes(CORRUPT_CERT)
            await until(lambda: store.reload_failures == 1)
            assert store.current.fingerprint == first
            pki.issue("a")
            elapsed = await until(lambda: store.reloads == 1)  # the task is still polling
            nursery.cancel_scope.cancel()
    assert store.current.fingerprint != first
    assert elapsed < 1.0  # a few polls of 50 ms

"""The CA service's small parts: the per-identity token bucket (with a clock we move), the key-mode check, and the
names in its own certificate."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from mtlsmesh import caserver
from mtlsmesh.config import ListenAddr
from mtlsmesh.errors import CertificateError
from mtlsmesh.tokens import TokenPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = caserver.RateLimiter(burst=3, rate=2, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.allow("a") == pytest.approx(0.5)  # empty: the next token in half a second
    assert limiter.allow("b") == 0.0  # another identity has its own bucket
    clock.now += 0.5
    assert limiter.allow("a") == 0.0
    assert limiter.allow("a") > 0
    clock.now += 100
    assert [limiter.allow("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, never beyond


def test_full_buckets_are_forgotten_when_the_table_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(caserver.RateLimiter, "MAX_KEYS", 3)
    limiter = caserver.RateLimiter(burst=2, rate=1, clock=clock)
    for key in ("a", "b", "c"):
        limiter.allow(key)
    clock.now += 10  # a, b and c have refilled: the same as no bucket at all
    limiter.allow("hot")
    assert set(limiter._buckets) == {"hot"}
    limiter.allow("hot")  # hot is empty now: it must be remembered
    limiter.allow("x")
    limiter.allow("y")
    limiter.allow("new")  # full table, nothing refilled: nothing forgotten, the table grows past the mark
    assert set(limiter._buckets) == {"hot", "x", "y", "new"}
    assert limiter.allow("hot") > 0


@pytest.mark.parametrize(("mode", "refused"), [(0o600, False), (0o400, False), (0o604, True), (0o644, True)])
def test_key_modes(tmp_path: Path, mode: int, refused: bool) -> None:
    key = tmp_path / "intermediate-key.pem"
    key.write_text("key")
    os.chmod(key, mode)
    if refused:
        with pytest.raises(
            CertificateError, match=rf"intermediate-key\.pem: is accessible by group or others \(mode 0{mode:o}\)"
        ):
            caserver.check_key_modes(tmp_path)
    else:
        caserver.check_key_modes(tmp_path)


CA_UID = CA_GID = 1337  # deploy/ca's runAsUser, runAsGroup and fsGroup


@pytest.mark.parametrize(
    ("mode", "file_gid", "euid", "egid", "allowed"),
    [
        (0o400, 0, CA_UID, CA_GID, True),  # owner-only passes whoever we are
        (0o600, 5, 0, 0, True),
        (0o440, CA_GID, CA_UID, CA_GID, True),  # a Secret volume with fsGroup = runAsGroup: our own group
        (0o640, CA_GID, CA_UID, CA_GID, True),
        (0o440, 0, CA_UID, CA_GID, False),  # another group can read it
        (0o440, 0, 0, 0, False),  # root: owner-only, as the files `mtlsmesh ca init` writes
        (0o640, 0, 0, 0, False),
        (0o460, CA_GID, CA_UID, CA_GID, False),  # group write, even our own
        (0o450, CA_GID, CA_UID, CA_GID, False),
        (0o444, CA_GID, CA_UID, CA_GID, False),  # others, never
        (0o404, CA_GID, CA_UID, CA_GID, False),
    ],
)
def test_the_key_mode_rule(mode: int, file_gid: int, euid: int, egid: int, allowed: bool) -> None:
    problem = caserver.key_mode_problem(mode, file_gid, euid, egid)
    assert (problem is None) is allowed, problem
    if problem is not None:
        assert problem.startswith(f"is accessible by group or others (mode {mode:04o}); the CA's key must be 0600")


def test_its_own_names_are_the_service_and_the_specific_listen_addresses() -> None:
    cfg = caserver.ServeConfig(
        directory="ca",
        listen=(ListenAddr("0.0.0.0", 15012), ListenAddr("127.0.0.1", 0), ListenAddr("::1", 0)),
        policy=TokenPolicy("iss", "aud"),
        jwks="jwks.json",
        extra_names=("ca.example.org", "10.0.0.5", "127.0.0.1"),
    )
    dns, ips = caserver._own_names(cfg)
    assert dns == ["mtlsmesh-ca.mtlsmesh-system.svc", "ca.example.org"]
    assert ips == [ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.5")]
    with pytest.raises(CertificateError, match="'bad name!' is not a valid DNS name"):
        caserver._own_names(caserver.ServeConfig("ca", (), TokenPolicy("i", "a"), "j", extra_names=("bad name!",)))

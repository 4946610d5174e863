"""Addresses: the family an address really is, the app source's IPv6 twin, and host:port text both ways."""

from __future__ import annotations

import ipaddress

import pytest

from mtlsmesh.addresses import IPAddress, host_port, ipv6_twin, split_host_port, unmapped, unmapped_host_port

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (ip("::ffff:198.18.0.12"), ip("198.18.0.12")),  # what a dual-stack socket reports for an IPv4 peer
        (ip("::ffff:127.0.0.6"), ip("127.0.0.6")),
        (ip("198.18.0.12"), ip("198.18.0.12")),
        (ip("::1"), ip("::1")),
        (ip("::6"), ip("::6")),
        (ip("2001:db8:61::1"), ip("2001:db8:61::1")),
        (ip("::"), ip("::")),
    ],
)
def test_unmapped(given: IPAddress, expected: IPAddress) -> None:
    assert unmapped(given) == expected
    assert type(unmapped(given)) is type(expected)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (ip("127.0.0.6"), ip("::6")),  # the inbound app source and its twin
        (ip("127.0.0.1"), None),  # no IPv6 address stands for it: the kernel picks
        (ip("198.18.0.12"), None),
        (ip("::6"), ip("::6")),  # an IPv6 address is its own
        (ip("2001:db8:61::1"), ip("2001:db8:61::1")),
    ],
)
def test_ipv6_twin(given: IPAddress, expected: IPAddress | None) -> None:
    assert ipv6_twin(given) == expected


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("198.18.0.12", 9080, "198.18.0.12:9080"),
        (ip("198.18.0.12"), 9080, "198.18.0.12:9080"),
        ("::1", 80, "[::1]:80"),
        (ip("2001:db8:61::1"), 8080, "[2001:db8:61::1]:8080"),
        ("reviews.default.svc", 9080, "reviews.default.svc:9080"),
        ("0.0.0.0", 0, "0.0.0.0:0"),
    ],
)
def test_host_port(host: str | IPAddress, port: int, text: str) -> None:
    assert host_port(host, port) == text


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("198.18.0.12", 43186, "198.18.0.12:43186"),
        ("::ffff:127.0.0.1", 5, "127.0.0.1:5"),  # shown as the IPv4 peer it is
        ("::1", 5, "[::1]:5"),
        ("fe80::1%lo", 5, "[fe80::1%lo]:5"),  # a link-local peer keeps its scope
    ],
)
def test_unmapped_host_port(host: str, port: int, text: str) -> None:
    assert unmapped_host_port(host, port) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:15001", ("0.0.0.0", 15001, False)),
        ("[::]:15001", ("::", 15001, True)),
        ("[::1]:80", ("::1", 80, True)),
        ("db.svc:5432", ("db.svc", 5432, False)),
        ("::1:80", ("::1", 80, False)),  # the caller refuses an unbracketed IPv6 address
        ("[db]:80", ("db", 80, True)),  # ... and a bracketed name
        ("0.0.0.0:99999", ("0.0.0.0", 99999, False)),  # ... and the port's range
        ("0.0.0.0", None),
        (":15001", None),
        ("0.0.0.0:", None),
        ("0.0.0.0:-1", None),
        ("0.0.0.0:\uff11\uff15", None),  # fullwidth digits are digits to str.isdigit, not to us
        ("[::]15006", None),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int, bool] | None) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("host", ["198.18.0.12", "::1", "2001:db8:61::1", "reviews.default.svc"])
def test_split_host_port_reads_what_host_port_writes(host: str) -> None:
    assert split_host_port(host_port(host, 9080)) == (host, 9080, ":" in host)

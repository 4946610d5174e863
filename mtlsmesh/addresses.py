"""IP addresses as the mesh handles them: the types, the family an address really is, and `host:port` text.

What it does: names the address and network types every module uses (`IPAddress`, `IPNetwork`); sees through an
IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports for an IPv4 peer) to the IPv4 address
it is (`unmapped`); gives the IPv6 twin of an IPv4 source address (`ipv6_twin`: the inbound app source 127.0.0.6
is ::6 towards an IPv6 app); and writes and splits `host:port` text, IPv6 in brackets (`host_port`,
`unmapped_host_port`, `split_host_port`).

What it does not: touch sockets, resolve names, or validate ports and names (the config parser does, with its
own error messages). Pure: it imports only `ipaddress` and `conventions`.
"""

from __future__ import annotations

import ipaddress

from mtlsmesh.conventions import APP_SOURCE, APP_SOURCE_V6

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# The hosts a listener binds to mean "every address of this family", not one address.
WILDCARD_HOSTS = ("0.0.0.0", "::")


def unmapped(ip: IPAddress) -> IPAddress:
    """`ip` as the family it really is: `::ffff:a.b.c.d` is the IPv4 address a.b.c.d, anything else itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ipv6_twin(ip: IPAddress) -> ipaddress.IPv6Address | None:
    """The address that stands for `ip` on an IPv6 connection: an IPv6 address itself, the app source 127.0.0.6
    its twin ::6 (docs/ARCHITECTURE.md §3), any other IPv4 address none."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return APP_SOURCE_V6 if ip == APP_SOURCE else None


def host_port(host: str | IPAddress, port: int) -> str:
    """`1.2.3.4:80`, `[::1]:80`, `name:80`: the host as given, in brackets when it holds a colon (IPv6)."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def unmapped_host_port(host: str, port: int) -> str:
    """`host_port` of an address as the kernel wrote it (accept, getpeername), an IPv4-mapped one shown as IPv4."""
    if ":" not in host:  # IPv4 as the kernel wrote it: already the text we want (once per connection: no parsing)
        return f"{host}:{port}"
    return host_port(unmapped(ipaddress.IPv6Address(host)), port)


def split_host_port(text: str) -> tuple[str, int, bool] | None:
    """`host:port` or `[host]:port` as (host without the brackets, port, whether it was bracketed); None when the
    text is not of that form (no colon, an empty host, a port that is not decimal digits). The caller checks the
    host and the port's range; an IPv6 address is written bracketed, anything else not (`host_port`)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not port_text.isascii():
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    return (host[1:-1] if bracketed else host), int(port_text), bracketed

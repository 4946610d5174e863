"""`mtlsmesh check`'s parts that need no pod: the listening sockets read from this namespace's /proc, the lines."""

from __future__ import annotations

import os
import socket

from mtlsmesh.cli.check import Check, check_listening, listening_sockets, sidecar_listeners
from mtlsmesh.config import Config, ListenAddr


def test_listening_sockets_finds_a_real_listener_and_its_owner() -> None:
    with socket.socket() as listener, socket.socket(socket.AF_INET6) as six:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        six.bind(("::1", 0))
        six.listen(1)
        found = listening_sockets()
        assert found[listener.getsockname()[1]] == {os.geteuid()}
        assert found[six.getsockname()[1]] == {os.geteuid()}
        with socket.socket() as unbound:  # bound, not listening: not a listener
            unbound.bind(("127.0.0.1", 0))
            assert unbound.getsockname()[1] not in listening_sockets()


def test_listening_is_judged_per_port_and_uid() -> None:
    cfg = Config(admin_listen=ListenAddr("127.0.0.1", 15000), metrics_listen=None)
    assert [name for name, _ in sidecar_listeners(cfg)] == ["outbound", "inbound", "admin", "health"]
    ok = check_listening(cfg, {15001: {1337}, 15006: {1337}, 15000: {1337}, 15021: {1337}})
    assert ok.ok is True and ok.detail == "ports 15001, 15006, 15000, 15021 bound by uid 1337"
    bad = check_listening(cfg, {15001: {0}, 15006: {1337}, 15000: {1337}})
    assert bad.ok is False
    assert bad.detail == "outbound (15001) is bound by uid 0, not 1337; health (15021) is not listening"
    assert bad.hint.startswith("start the sidecar as uid 1337")


def test_a_failed_check_is_two_lines_with_its_hint_and_a_skipped_one_a_dash() -> None:
    assert (
        Check("health", False, "503 not ready", "see its log").line()
        == "✗ health: 503 not ready\n    hint: see its log"
    )
    assert Check("ca", None, "file mode").line() == "- ca: file mode"
    assert Check("svid", True, "fine", "unused").line() == "✓ svid: fine"

"""The mesh's conventions are the defaults everywhere they meet: the capture rules, the sidecar, the injector."""

from __future__ import annotations

from mtlsmesh import conventions, sniff, tls
from mtlsmesh.capture import CaptureOptions
from mtlsmesh.config import Config
from mtlsmesh.inject import InjectOptions


def test_the_capture_rules_redirect_to_the_ports_the_sidecar_listens_on() -> None:
    capture, cfg = CaptureOptions(), Config()
    assert (capture.outbound_port, capture.inbound_port) == (cfg.outbound.listen.port, cfg.inbound.listen.port)
    assert (capture.outbound_port, capture.inbound_port) == (15001, 15006)
    assert cfg.admin_listen is not None and cfg.health_listen is not None and cfg.metrics_listen is not None
    assert (cfg.admin_listen.port, cfg.health_listen.port, cfg.metrics_listen.port) == (15000, 15021, 15090)
    # The ports the sidecar answers itself are the ones never captured inbound.
    assert capture.inbound_excluded[:2] == (cfg.health_listen.port, cfg.metrics_listen.port)


def test_the_injector_runs_the_proxy_as_the_uid_the_rules_let_through() -> None:
    capture, inject = CaptureOptions(), InjectOptions()
    assert (inject.proxy_uid, inject.proxy_gid) == (capture.proxy_uid, capture.proxy_gid) == (1337, 1337)


def test_the_sidecar_dials_the_app_from_the_source_the_rules_let_through() -> None:
    assert Config().inbound.app_source == conventions.APP_SOURCE
    assert str(conventions.APP_SOURCE) == "127.0.0.6" and str(conventions.APP_SOURCE_V6) == "::6"


def test_the_alpn_the_client_offers_is_the_one_the_sniffer_looks_for() -> None:
    assert tls.ALPN == b"mtlsmesh"
    assert sniff.is_mesh(sniff.Sniff(sniff.SniffState.CLIENT_HELLO, alpn=(tls.ALPN.decode("latin-1"),)))


def test_every_sidecar_port_is_reserved_for_it() -> None:
    cfg = Config()
    listeners = (cfg.outbound.listen, cfg.inbound.listen, cfg.admin_listen, cfg.health_listen, cfg.metrics_listen)
    assert {listen.port for listen in listeners if listen is not None} == conventions.SIDECAR_PORTS

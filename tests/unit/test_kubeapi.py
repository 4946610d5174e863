"""`kubeapi`'s URL rules and how it finds the API server in a pod; its calls are tested against a real HTTPS server
in tests/integration (test_jwks_url, test_bundle_publish)."""

from __future__ import annotations

import pytest

from mtlsmesh import kubeapi
from mtlsmesh.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "host", "port", "path", "shown"),
    [
        ("https://kubernetes.default.svc/openid/v1/jwks", "kubernetes.default.svc", 443, "/openid/v1/jwks",
         "https://kubernetes.default.svc/openid/v1/jwks"),
        ("https://10.96.0.1:443", "10.96.0.1", 443, "/", "https://10.96.0.1/"),
        ("HTTPS://[fd00::1]:6443/keys?x=1", "fd00::1", 6443, "/keys?x=1", "https://[fd00::1]:6443/keys?x=1"),
    ],
)  # fmt: skip
def test_an_https_url_is_parsed(text: str, host: str, port: int, path: str, shown: str) -> None:
    url = kubeapi.HttpsUrl.parse(text, "--flag")
    assert (url.host, url.port, url.path, str(url)) == (host, port, path, shown)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("http://kubernetes/", r"--flag: 'http://kubernetes/': plain http is refused; use https"),
        ("ftp://kubernetes/", r"--flag: 'ftp://kubernetes/' is not an https:// URL"),
        ("/etc/jwks.json", r"is not an https:// URL"),
        ("https://host:99999/", r"the port is not a number from 1 to 65535"),
        ("https:///path", r"names no host"),
        ("https://u:p@host/", r"no user name or fragment"),
    ],
)
def test_what_is_not_an_https_url_is_one_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        kubeapi.HttpsUrl.parse(text, "--flag")


def test_the_api_server_is_found_as_client_go_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert str(kubeapi.in_cluster_url("--kube-api")) == "https://[fd00:10:96::1]:6443/"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ConfigError, match=r"--kube-api: not running in a cluster \(no KUBERNETES_SERVICE_HOST\)"):
        kubeapi.in_cluster_url("--kube-api")


def test_the_cli_names_the_same_service_account_files() -> None:
    from mtlsmesh.cli.ca import kubeapi_sa

    assert (kubeapi_sa("ca.crt"), kubeapi_sa("token")) == (kubeapi.SA_CA_FILE, kubeapi.SA_TOKEN_FILE)

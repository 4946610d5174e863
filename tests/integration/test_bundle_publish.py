"""The CA service keeps the trust bundle ConfigMap current through the Kubernetes API, played here by a real HTTPS
server (Python's `http.server` with `ssl`, its certificate from a CA made in tmp_path) that checks the bearer
token, the path, the method and the content type, stores the ConfigMap and serves it back: written at start and
after each operator step of a root rotation, only when it differs; the API server down then back, a 403, a
missing ConfigMap: retried, one log line per change of state, and the CA serving throughout. Several ConfigMaps
(one per namespace): each published on its own, a 403 or a slow answer for one holding up no other, the gauge
per ConfigMap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509

from mtlsmesh import bundlepublish, caserver, kubeapi, pem
from mtlsmesh.cli import main
from mtlsmesh.errors import ConfigError
from tests.https_peer import ApiServer, HttpsPeer, ServerPki
from tests.integration.castack import CaLab, enroll, eventually, make_ca_dir, running_ca

NAMESPACE, NAME = "mtlsmesh-system", "mtlsmesh-trust-bundle"
APP_NAMESPACE = "default"  # where the meshed pods run: a second copy of the ConfigMap
TOKEN = "the-cas-own-service-account-token"
PLACEHOLDER = "# Placeholder, not a certificate.\n"


@pytest.fixture(autouse=True)
def ca_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtlsmesh")


@pytest.fixture
def lab(tmp_path: Path) -> CaLab:
    return CaLab.create(tmp_path)


@pytest.fixture
def pki(tmp_path: Path) -> ServerPki:
    return ServerPki.create(tmp_path / "api-pki", "kubernetes")


@pytest.fixture
def api() -> ApiServer:
    server = ApiServer(TOKEN, NAMESPACE, NAME)
    server.create({"bundle.pem": PLACEHOLDER, "other": "kept"})
    return server


@pytest.fixture
def server(pki: ServerPki, api: ApiServer) -> Iterator[HttpsPeer]:
    peer = HttpsPeer(pki, api).start()
    try:
        yield peer
    finally:
        peer.stop()


def publishing(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, token: str = TOKEN, namespaces: tuple[str, ...] = (NAMESPACE,)
) -> caserver.ServeConfig:
    token_file = lab.root / "sa-token"
    token_file.write_text(token)
    url = kubeapi.HttpsUrl.parse(server.url("/"), "--kube-api")
    client = kubeapi.Client(str(pki.ca_file), str(token_file), timeout=5.0)
    publish = tuple(
        bundlepublish.PublishConfig(
            bundlepublish.Target(namespace, NAME), url, client, resync=300.0, first_retry=0.1, max_retry=0.4
        )
        for namespace in namespaces
    )
    return lab.config(publish=publish)


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsmesh.ca" and f"event={event}" in r.getMessage()]


def configmap_current(service: caserver.CaService, namespace: str = NAMESPACE) -> float | None:
    labels = {"configmap": f"{namespace}/{NAME}"}
    return service.metrics.registry.get_sample_value("mtlsmesh_ca_bundle_configmap_current", labels)


def failures(service: caserver.CaService, namespace: str = NAMESPACE) -> int:
    (publisher,) = [p for p in service.publishers if p.cfg.target.namespace == namespace]
    return publisher.failures


def roots_in(api: ApiServer, namespace: str = NAMESPACE) -> list[x509.Certificate]:
    text = api.data(namespace)["bundle.pem"]
    return [] if "BEGIN CERTIFICATE" not in text else list(x509.load_pem_x509_certificates(text.encode()))


async def test_the_bundle_is_written_at_start_and_after_each_rotation_step_only_when_it_differs(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    old_root = lab.roots[0]
    new_root = make_ca_dir(tmp_path / "next").roots[0]
    bundle_file = str(lab.ca_dir / "bundle.pem")
    async with running_ca(publishing(lab, server, pki)) as (_, port, _):
        await eventually(lambda: api.writes == 1)
        assert roots_in(api) == [old_root]
        assert api.data()["other"] == "kept"  # a merge patch of one key: the rest of the object is left alone
        write = next(seen for seen in server.seen if seen.method == "PATCH")
        assert write.path == f"/api/v1/namespaces/{NAMESPACE}/configmaps/{NAME}"
        assert write.headers["content-type"] == "application/merge-patch+json"
        assert write.headers["authorization"] == f"Bearer {TOKEN}"
        assert server.seen[0].method == "GET"  # read first: written only because it differed

        # Step 1 of a root rotation: the new root joins the bundle; the ConfigMap follows.
        assert main(["ca", "bundle", "--bundle", bundle_file, "--add", str(tmp_path / "next" / "root.pem")]) == 0
        await eventually(lambda: api.writes == 2)
        assert roots_in(api) == [old_root, new_root]
        # Step 2: the directory signs under the new root; the roots trusted are the same, so nothing is written.
        assert main(["ca", "rotate", "--dir", str(lab.ca_dir), "--to", str(tmp_path / "next")]) == 0
        await eventually(lambda: lines(caplog, "reloaded") and len(lines(caplog, "reloaded")) >= 2)
        answer, _ = await enroll(port, (new_root,), lab.issuer.token())
        assert answer.chain[-1].issuer == new_root.subject
        await trio.sleep(0.5)  # several of the publisher's polls (0.1 s)
        assert api.writes == 2  # the same roots in another order (the new one first) are not a change
        # Step 3: the old root leaves.
        previous = str(lab.ca_dir / "previous-root.pem")
        assert main(["ca", "bundle", "--bundle", str(lab.ca_dir / "bundle.pem"), "--remove", previous]) == 0
        await eventually(lambda: api.writes == 3)
        assert roots_in(api) == [new_root]
        # The server has stored the write before the CA has read the answer and logged it.
        await eventually(lambda: len(lines(caplog, "bundle_published")) == 3)
        capsys.readouterr()
    assert api.writes == 3  # once per change, never for a poll that found nothing new
    assert len(lines(caplog, "bundle_published")) == 3
    assert lines(caplog, "bundle_published")[-1] == (
        f"event=bundle_published configmap={NAMESPACE}/{NAME} key=bundle.pem roots=1"
    )

    # A restart (or a second replica) finds the ConfigMap current: it reads, it does not write.
    before = len(server.seen)
    async with running_ca(publishing(lab, server, pki)) as _:
        await eventually(lambda: lines(caplog, "bundle_current"))
    assert api.writes == 3
    assert [seen.method for seen in server.seen[before:]] == ["GET"]


async def test_the_api_server_down_then_back(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.stop()  # the same port will come back
    async with running_ca(publishing(lab, server, pki)) as (service, port, _):
        await eventually(lambda: failures(service) >= 3)
        failed = lines(caplog, "bundle_publish_failed")
        assert len(failed) == 1, failed  # retried, logged once
        assert "cannot read the ConfigMap: cannot connect to 127.0.0.1:" in failed[0]
        assert "Connection refused" in failed[0]
        answer, _ = await enroll(port, lab.roots, lab.issuer.token())  # the CA serves meanwhile
        assert str(answer.spiffe_id).endswith("/sa/reviews")
        server.start()
        await eventually(lambda: api.writes == 1)
        assert roots_in(api) == list(lab.roots)
        await eventually(lambda: lines(caplog, "bundle_published"))  # logged once the CA has read the answer
    assert len(lines(caplog, "bundle_publish_failed")) == 1
    assert len(lines(caplog, "bundle_published")) == 1


async def test_a_403_is_logged_once_with_the_api_servers_reason_and_retried(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.forbidden = True
    async with running_ca(publishing(lab, server, pki)) as (service, port, _):
        await eventually(lambda: failures(service) >= 3)
        (failed,) = lines(caplog, "bundle_publish_failed")
        assert "cannot write the ConfigMap: 403 configmaps" in failed
        assert 'cannot patch resource \\"configmaps\\"' in failed or 'cannot patch resource "configmaps"' in failed
        await enroll(port, lab.roots, lab.issuer.token())
        assert api.data()["bundle.pem"] == PLACEHOLDER
        assert configmap_current(service) == 0
        api.forbidden = False  # the Role is fixed
        await eventually(lambda: api.writes == 1)
        await eventually(lambda: configmap_current(service) == 1)
    assert pem.render_certificates(lab.roots).decode() == api.data()["bundle.pem"]


async def test_a_wrong_token_and_a_missing_configmap_say_what_to_do(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_ca(publishing(lab, server, pki, token="someone-elses")) as (service, _, _):
        await eventually(lambda: failures(service) >= 1)
    assert "cannot read the ConfigMap: 401 Unauthorized" in lines(caplog, "bundle_publish_failed")[0]
    api.objects.clear()
    async with running_ca(publishing(lab, server, pki)) as (service, _, _):
        await eventually(lambda: len(lines(caplog, "bundle_publish_failed")) == 2)
    assert (
        f"the ConfigMap {NAMESPACE}/{NAME} does not exist; the CA only updates it"
        in (lines(caplog, "bundle_publish_failed")[1])
    )
    assert api.writes == 0


async def test_two_configmaps_one_forbidden_the_other_published_and_the_gauge_per_configmap(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    api.create({"bundle.pem": PLACEHOLDER}, APP_NAMESPACE, NAME)
    api.forbidden_in.add(APP_NAMESPACE)  # the Role and RoleBinding in `default` were not applied
    system, app = f"{NAMESPACE}/{NAME}", f"{APP_NAMESPACE}/{NAME}"
    async with running_ca(publishing(lab, server, pki, namespaces=(NAMESPACE, APP_NAMESPACE))) as (service, port, _):
        await eventually(lambda: api.writes_to.get(system) == 1 and failures(service, APP_NAMESPACE) >= 3)
        assert roots_in(api) == list(lab.roots)
        assert api.data(APP_NAMESPACE)["bundle.pem"] == PLACEHOLDER
        await eventually(lambda: configmap_current(service) == 1)
        assert configmap_current(service, APP_NAMESPACE) == 0
        (failed,) = lines(caplog, "bundle_publish_failed")  # retried, logged once, naming its ConfigMap
        assert f"configmap={app} " in failed and "cannot write the ConfigMap: 403" in failed
        assert f'in the namespace \\"{APP_NAMESPACE}\\"' in failed or f'namespace "{APP_NAMESPACE}"' in failed
        assert failures(service) == 0
        published = f"event=bundle_published configmap={system} key=bundle.pem roots=1"
        assert lines(caplog, "bundle_published") == [published]
        await enroll(port, lab.roots, lab.issuer.token())  # the CA serves meanwhile

        # A root joins the bundle while `default` is still refused: mtlsmesh-system follows at once, its
        # publisher's state untouched by the other's backoff.
        new_root = make_ca_dir(tmp_path / "next").roots[0]
        bundle_file = str(lab.ca_dir / "bundle.pem")
        assert main(["ca", "bundle", "--bundle", bundle_file, "--add", str(tmp_path / "next" / "root.pem")]) == 0
        capsys.readouterr()
        await eventually(lambda: api.writes_to.get(system) == 2)
        assert roots_in(api) == [*lab.roots, new_root]
        await eventually(lambda: configmap_current(service) == 1)
        assert configmap_current(service, APP_NAMESPACE) == 0
        assert len(lines(caplog, "bundle_publish_failed")) == 1

        api.forbidden_in.clear()  # the Role is applied: `default` catches up with the current roots
        await eventually(lambda: api.writes_to.get(app) == 1)
        assert roots_in(api, APP_NAMESPACE) == [*lab.roots, new_root]
        await eventually(lambda: configmap_current(service, APP_NAMESPACE) == 1)
        assert configmap_current(service) == 1
        metrics = service.metrics.render().decode()
        assert f'mtlsmesh_ca_bundle_configmap_current{{configmap="{app}"}} 1.0' in metrics
        assert f'mtlsmesh_ca_bundle_configmap_current{{configmap="{system}"}} 1.0' in metrics
        assert "# HELP mtlsmesh_ca_bundle_configmap_current 1 while the trust bundle ConfigMap" in metrics
    assert api.writes_to == {system: 2, app: 1}
    assert lines(caplog, "bundle_published")[-1] == f"event=bundle_published configmap={app} key=bundle.pem roots=2"


async def test_a_slow_answer_for_one_configmap_holds_up_no_other(
    lab: CaLab, server: HttpsPeer, pki: ServerPki, api: ApiServer
) -> None:
    api.create({"bundle.pem": PLACEHOLDER}, APP_NAMESPACE, NAME)
    api.slow_in[APP_NAMESPACE] = 1.5  # each answer there: a GET and a PATCH, 3 s in all
    system, app = f"{NAMESPACE}/{NAME}", f"{APP_NAMESPACE}/{NAME}"
    async with running_ca(publishing(lab, server, pki, namespaces=(APP_NAMESPACE, NAMESPACE))) as (service, _, _):
        started = trio.current_time()
        await eventually(lambda: api.writes_to.get(system) == 1)
        assert trio.current_time() - started < 1.5  # not after the slow one, though it is named first
        assert app not in api.writes_to
        await eventually(lambda: api.writes_to.get(app) == 1)
        await eventually(lambda: configmap_current(service, APP_NAMESPACE) == 1)
    assert roots_in(api, APP_NAMESPACE) == roots_in(api) == list(lab.roots)


def test_each_configmap_is_named_once() -> None:
    targets = bundlepublish.parse_targets(["mtlsmesh-system/b", "default/b"], "--publish-bundle")
    assert [str(t) for t in targets] == ["mtlsmesh-system/b", "default/b"]
    with pytest.raises(ConfigError, match=r"^--publish-bundle: default/b is given twice; name each ConfigMap once$"):
        bundlepublish.parse_targets(["default/b", "mtlsmesh-system/b", "default/b"], "--publish-bundle")


def test_the_target_is_namespace_slash_name() -> None:
    assert bundlepublish.Target.parse("mtlsmesh-system/mtlsmesh-trust-bundle", "--publish-bundle").path == (
        "/api/v1/namespaces/mtlsmesh-system/configmaps/mtlsmesh-trust-bundle"
    )
    for bad in ("mtlsmesh-trust-bundle", "NS/x", "ns/", "ns/a/b"):
        with pytest.raises(Exception, match=r"--publish-bundle: .*is not NAMESPACE/NAME"):
            bundlepublish.Target.parse(bad, "--publish-bundle")

"""Uninjection: the exact inverse of injection, on every golden input and on the inputs that make it hard.

`uninject(inject(x)) == x` for every golden input of tests/unit/golden/inject/ (and for deploy/examples), as
documents and as rendered text; a manifest never injected comes out as it went in (a no-op, with a note from the
CLI), so uninjecting twice is uninjecting once.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsmesh.annotations import STATUS_ANNOTATION
from mtlsmesh.cli import main
from mtlsmesh.errors import ConfigError
from mtlsmesh.inject import inject_documents, inject_text, uninject_documents, uninject_text
from mtlsmesh.manifest import parse_manifests, render_manifests
from tests.unit.test_inject import CASES, GOLDEN, ROOT, deployment, template_of

EXAMPLES = ROOT / "deploy" / "examples"


def roundtrip(doc: object) -> object:
    (injected,) = inject_documents([doc]).documents
    (back,) = uninject_documents([injected]).documents
    return back


@pytest.mark.parametrize("case", CASES)
def test_uninject_of_inject_is_the_input_for_every_golden_case(case: str) -> None:
    text = (GOLDEN / f"{case}.yaml").read_text()
    original = [doc for doc in parse_manifests(text, case) if doc is not None]
    injected = inject_text(text, source=case)
    back = uninject_text(injected.text, source=f"{case}.injected")
    assert parse_manifests(back.text, "back") == original
    assert back.text == render_manifests(original)  # key order too: the same bytes as the input, re-rendered
    assert [label.split(" ", 1)[1] for label in back.uninjected] == [i.split(" ", 1)[1] for i in injected.injected]


@pytest.mark.parametrize("case", CASES)
def test_uninjecting_the_committed_golden_output_gives_the_golden_input(case: str) -> None:
    back = uninject_text((GOLDEN / f"{case}.injected.yaml").read_text(), source=case)
    assert back.text == render_manifests(parse_manifests((GOLDEN / f"{case}.yaml").read_text(), case))


def test_the_committed_bookinfo_example_uninjects_to_its_source() -> None:
    source = render_manifests(parse_manifests((EXAMPLES / "bookinfo.yaml").read_text(), "bookinfo.yaml"))
    back = uninject_text((EXAMPLES / "bookinfo-injected.yaml").read_text(), source="bookinfo-injected.yaml")
    assert back.text == source
    assert len(back.uninjected) == 4


@pytest.mark.parametrize("case", CASES)
def test_uninject_of_a_reinjected_manifest_is_the_input(case: str) -> None:
    text = (GOLDEN / f"{case}.yaml").read_text()
    twice = inject_text(inject_text(text, source="once").text, source="twice").text
    assert uninject_text(twice, source="twice").text == render_manifests(parse_manifests(text, case))


@pytest.mark.parametrize(
    "spec",
    [
        {"initContainers": [], "volumes": []},  # present and empty: kept present and empty
        {"initContainers": None, "volumes": None},  # null (a Helm template's empty value): null again
        {"volumes": [{"name": "data", "emptyDir": {}}]},
        {"initContainers": [{"name": "setup", "image": "busybox"}]},
    ],
)
@pytest.mark.parametrize(
    "template_metadata",
    [None, {}, {"labels": {"app": "a"}}, {"annotations": {}}, {"annotations": None}, {"annotations": {"a": "b"}}],
)
def test_the_inverse_is_exact_for_empty_null_and_missing_keys(
    spec: dict[str, Any], template_metadata: dict[str, Any] | None
) -> None:
    doc = deployment(**spec)
    template = doc["spec"]["template"]
    if template_metadata is None:
        del template["metadata"]
    else:
        template["metadata"] = template_metadata
    before = copy.deepcopy(doc)
    back = roundtrip(doc)
    assert back == before
    assert render_manifests([back]) == render_manifests([before])


def test_a_bare_pod_with_nothing_but_containers_round_trips() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}
    (injected,) = inject_documents([pod]).documents
    assert isinstance(injected, dict)
    status = json.loads(injected["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["created"] == ["spec.initContainers", "spec.volumes", "metadata.annotations"]
    assert roundtrip(pod) == pod


def test_what_the_app_added_after_injection_stays() -> None:
    (injected,) = inject_documents([deployment()]).documents
    assert isinstance(injected, dict)
    spec = template_of(injected)["spec"]
    spec["initContainers"].append({"name": "migrate", "image": "example/migrate:1"})
    template_of(injected)["metadata"]["annotations"]["team"] = "shop"
    (back,) = uninject_documents([injected]).documents
    assert isinstance(back, dict)
    assert template_of(back)["spec"]["initContainers"] == [{"name": "migrate", "image": "example/migrate:1"}]
    assert "volumes" not in template_of(back)["spec"]  # created by injection and empty again
    assert template_of(back)["metadata"]["annotations"] == {"team": "shop"}


@pytest.mark.parametrize("case", CASES)
def test_a_manifest_never_injected_is_left_as_it_is(case: str) -> None:
    text = (GOLDEN / f"{case}.yaml").read_text()
    documents = parse_manifests(text, case)
    result = uninject_documents(documents)
    assert result.uninjected == ()
    assert list(result.documents) == documents


def test_uninjecting_twice_is_uninjecting_once() -> None:
    once = uninject_text((GOLDEN / "multi.injected.yaml").read_text(), source="multi")
    assert once.uninjected == ("Deployment default/web",)
    twice = uninject_text(once.text, source="once")
    assert (twice.text, twice.uninjected) == (once.text, ())


def test_input_documents_are_not_mutated() -> None:
    (injected,) = inject_documents([deployment()]).documents
    before = copy.deepcopy(injected)
    uninject_documents([injected])
    assert injected == before


def test_uninject_ignores_the_opt_out_and_other_annotations_it_does_not_need() -> None:
    # Opting out after the fact does not keep the mesh in: uninject takes out what the status says was added.
    (injected,) = inject_documents([deployment()]).documents
    assert isinstance(injected, dict)
    template_of(injected)["metadata"]["annotations"]["mtlsmesh.io/inject"] = "false"
    (back,) = uninject_documents([injected]).documents
    assert isinstance(back, dict)
    assert "initContainers" not in template_of(back)["spec"]
    assert template_of(back)["metadata"]["annotations"] == {"mtlsmesh.io/inject": "false"}


@pytest.mark.parametrize(
    ("status", "match"),
    [
        ("not json", r"not JSON, so not written by the injector"),
        ("[1]", r"expected a JSON object"),
        ('{"initContainers": "mtlsmesh-init"}', r"initContainers: expected a list of strings"),
        ('{"initContainers": ["app"]}', r"initContainers: 'app' is not something the injector adds"),
        ('{"created": ["spec.containers"]}', r"created: 'spec.containers' is not something the injector adds"),
    ],
)
def test_a_status_the_injector_did_not_write_is_refused(status: str, match: str) -> None:
    (injected,) = inject_documents([deployment()]).documents
    assert isinstance(injected, dict)
    template_of(injected)["metadata"]["annotations"][STATUS_ANNOTATION] = status
    prefix = r"^app.yaml: document 1 \(Deployment shop/app\): annotation mtlsmesh.io/status: "
    with pytest.raises(ConfigError, match=prefix + match):
        uninject_documents([injected], source="app.yaml")
    with pytest.raises(ConfigError, match=match):  # re-injection reads the status too
        inject_documents([injected], source="app.yaml")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"initContainers": [{"name": "mtlsmesh-proxy", "image": "x"}]}, r"spec.initContainers has 'mtlsmesh-proxy'"),
        ({"volumes": [{"name": "mtlsmesh-svid", "emptyDir": {}}]}, r"spec.volumes has 'mtlsmesh-svid'"),
    ],
)
def test_our_names_without_the_status_annotation_are_refused(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match + r" but the template has no mtlsmesh.io/status annotation"):
        uninject_documents([deployment(**spec)], source="app.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_uninjects_a_file_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "app.yaml"
    source.write_text((GOLDEN / "cronjob.injected.yaml").read_text())
    assert main(["uninject", "-f", str(source)]) == 0
    captured = capsys.readouterr()
    assert captured.out == render_manifests(parse_manifests((GOLDEN / "cronjob.yaml").read_text(), "cronjob"))
    assert captured.err == ""


def test_cli_writes_the_output_file_and_may_overwrite_its_input(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text((GOLDEN / "statefulset.injected.yaml").read_text())
    assert main(["uninject", "-f", str(source), "-o", str(source)]) == 0
    expected = render_manifests(parse_manifests((GOLDEN / "statefulset.yaml").read_text(), "statefulset"))
    assert source.read_text() == expected
    assert main(["inject", "-f", str(source), "-o", str(source)]) == 0
    assert source.read_text() == (GOLDEN / "statefulset.injected.yaml").read_text()


def test_cli_on_a_manifest_never_injected_is_a_no_op_with_a_note() -> None:
    text = (GOLDEN / "deployment.yaml").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "mtlsmesh", "uninject", "-f", "-"], input=text, capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout) == yaml.safe_load(text)
    assert result.stderr == (
        "mtlsmesh: note: <stdin>: no pod template carries mtlsmesh.io/status: nothing to uninject\n"
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("kind: Pod\nmetadata: [\n", r"^mtlsmesh: error: .*app.yaml:3: malformed YAML"),
        (yaml.safe_dump(deployment(initContainers=[{"name": "mtlsmesh-init"}])),
         r"^mtlsmesh: error: .*app.yaml: document 1 \(Deployment shop/app\): spec.initContainers has 'mtlsmesh-init'"),
    ],
)  # fmt: skip
def test_cli_error_is_one_line_exit_2_and_leaves_output_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, match: str
) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(content)
    out = tmp_path / "out.yaml"
    out.write_text("previous\n")
    assert main(["uninject", "-f", str(source), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert re.match(match, captured.err)
    assert out.read_text() == "previous\n"


def test_cli_missing_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["uninject", "-f", str(missing)]) == 2
    assert capsys.readouterr().err == f"mtlsmesh: error: {missing}: cannot read: No such file or directory\n"

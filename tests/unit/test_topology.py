"""The lab's plan: addresses, sidecar configs and the node's Service DNAT rules, as pure data."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from mtlsmesh import config
from mtlsmesh.errors import LabError
from mtlsmesh.lab.topology import (
    CA_ADDRESS,
    AppSpec,
    IdentitySpec,
    PodSpec,
    ServiceSpec,
    Topology,
    merge_config,
    plan_topology,
    render_capture_args,
    render_identity_config,
    render_service_rules,
    render_sidecar_config,
)

TOPOLOGY = Topology(
    pods=(
        PodSpec("productpage"),
        PodSpec("reviews", service_account="bookinfo-reviews", sidecar={"inbound": {"mode": "permissive"}}),
        PodSpec("legacy", mesh=False),
    ),
    services=(ServiceSpec("reviews", 9080, "reviews", 9080), ServiceSpec("legacy", 80, "legacy", 8080)),
)


def test_plan_gives_addresses_in_order() -> None:
    plan = plan_topology(TOPOLOGY)
    assert [str(p.ip) for p in plan.pods] == ["198.18.0.10", "198.18.0.11", "198.18.0.12"]
    assert str(plan.pod("reviews").spiffe_id) == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    assert plan.pod("legacy").spiffe_id is None
    assert [str(s.vip) for s in plan.services] == ["198.19.0.10", "198.19.0.11"]
    # Dual stack: the same host numbers in the documentation range, and a second ClusterIP for each Service.
    assert [str(p.address(6)) for p in plan.pods] == ["2001:db8:18::a", "2001:db8:18::b", "2001:db8:18::c"]
    assert [str(s.address(6)) for s in plan.services] == ["2001:db8:19::a", "2001:db8:19::b"]
    assert [str(s.target(6)) for s in plan.services] == ["2001:db8:18::b", "2001:db8:18::c"]
    for pod in plan.pods:
        assert pod.ip in ipaddress.IPv4Network("198.18.0.0/15")
        assert pod.address(4) == pod.ip
        assert pod.ip6 in ipaddress.IPv6Network("2001:db8::/32")
    with pytest.raises(LabError, match="IP version 5"):
        plan.pods[0].address(5)


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        (Topology(pods=()), "at least one pod"),
        (Topology(pods=(PodSpec("Bad_Name"),)), "pod name 'Bad_Name'"),
        (Topology(pods=(PodSpec("a"), PodSpec("a"))), "used twice"),
        (Topology(pods=(PodSpec("a", apps=(AppSpec("x", (), uid=1337),)),)), "must not run as uid 1337"),
        (Topology(pods=(PodSpec("a", apps=(AppSpec("x", (), uid=0),)),)), "must not run as uid 0"),
        (Topology(pods=(PodSpec("a"),), services=(ServiceSpec("s", 80, "b", 80),)), "no pod named 'b'"),
    ],
)
def test_plan_refuses(topology: Topology, message: str) -> None:
    with pytest.raises(LabError, match=message):
        plan_topology(topology)


def test_sidecar_config_names_mesh_destinations_and_merges_overrides() -> None:
    plan = plan_topology(TOPOLOGY)
    config = render_sidecar_config(plan, "reviews", "/s/cert.pem", "/s/key.pem", "/s/bundle.pem")
    outbound = config["outbound"]
    assert isinstance(outbound, dict)
    assert outbound["destinations"] == [
        {
            "cidrs": ["198.18.0.10/32", "2001:db8:18::a/128"],
            "identities": ["spiffe://cluster.local/ns/default/sa/productpage"],
        },
        {
            "cidrs": ["198.18.0.11/32", "2001:db8:18::b/128"],
            "identities": ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"],
        },
        {
            "cidrs": ["198.19.0.10/32", "2001:db8:19::a/128"],
            "ports": [9080],
            "identities": ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"],
        },
    ]
    inbound = config["inbound"]
    assert isinstance(inbound, dict)
    assert inbound["mode"] == "permissive"
    assert inbound["listen"] == "[::]:15006"  # merged, not replaced; dual stack
    assert config["credentials"] == {
        "cert": "/s/cert.pem",
        "key": "/s/key.pem",
        "bundle": "/s/bundle.pem",
        "reload_interval": "500ms",
    }


def test_sidecar_config_refuses_pod_outside_mesh() -> None:
    with pytest.raises(LabError, match="outside the mesh"):
        render_sidecar_config(plan_topology(TOPOLOGY), "legacy", "c", "k", "b")


@pytest.mark.parametrize(
    ("base", "override", "expected"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}, {"a": {"x": 1, "y": 3}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": {"x": 1}}, {"a": None}, {"a": None}),
    ],
)
def test_merge_config(base: dict[str, object], override: dict[str, object], expected: dict[str, object]) -> None:
    assert merge_config(base, override) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (PodSpec("a"), ()),
        (
            PodSpec("a", exclude_inbound_ports=(9099, 9100), exclude_outbound_ports=(9099,)),
            ("--exclude-inbound-ports", "9099,9100", "--exclude-outbound-ports", "9099"),
        ),
        (PodSpec("a", capture_args=("--no-ipv6",)), ("--no-ipv6",)),
    ],
)
def test_capture_args(spec: PodSpec, expected: tuple[str, ...]) -> None:
    assert render_capture_args(spec) == expected


def test_service_rules_golden() -> None:
    # kube-proxy's shape: the hairpin (a backend calling its own Service) marked before the DNAT, SNATed after.
    assert render_service_rules(plan_topology(TOPOLOGY)) == (
        "*nat\n"
        ":MTLSMESH_LAB_SERVICES - [0:0]\n"
        ":MTLSMESH_LAB_POSTROUTING - [0:0]\n"
        "-A PREROUTING -j MTLSMESH_LAB_SERVICES\n"
        "-A OUTPUT -j MTLSMESH_LAB_SERVICES\n"
        "-A POSTROUTING -j MTLSMESH_LAB_POSTROUTING\n"
        "-A MTLSMESH_LAB_SERVICES -s 198.18.0.11/32 -d 198.19.0.10/32 -p tcp -m tcp --dport 9080"
        ' -m comment --comment "service reviews hairpin" -j MARK --set-xmark 0x4000/0x4000\n'
        "-A MTLSMESH_LAB_SERVICES -d 198.19.0.10/32 -p tcp -m tcp --dport 9080"
        ' -m comment --comment "service reviews" -j DNAT --to-destination 198.18.0.11:9080\n'
        "-A MTLSMESH_LAB_SERVICES -s 198.18.0.12/32 -d 198.19.0.11/32 -p tcp -m tcp --dport 80"
        ' -m comment --comment "service legacy hairpin" -j MARK --set-xmark 0x4000/0x4000\n'
        "-A MTLSMESH_LAB_SERVICES -d 198.19.0.11/32 -p tcp -m tcp --dport 80"
        ' -m comment --comment "service legacy" -j DNAT --to-destination 198.18.0.12:8080\n'
        "-A MTLSMESH_LAB_POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n"
        "COMMIT\n"
    )


def test_service_rules_for_ipv6_use_the_second_cluster_ips() -> None:
    rules = render_service_rules(plan_topology(TOPOLOGY), 6)
    assert (
        "-A MTLSMESH_LAB_SERVICES -s 2001:db8:18::b/128 -d 2001:db8:19::a/128 -p tcp -m tcp --dport 9080"
        ' -m comment --comment "service reviews hairpin" -j MARK --set-xmark 0x4000/0x4000\n'
    ) in rules
    assert (
        "-A MTLSMESH_LAB_SERVICES -d 2001:db8:19::a/128 -p tcp -m tcp --dport 9080"
        ' -m comment --comment "service reviews" -j DNAT --to-destination [2001:db8:18::b]:9080\n'
    ) in rules
    assert "198." not in rules


def test_every_rendered_config_passes_the_sidecar_parser() -> None:
    plan = plan_topology(TOPOLOGY)
    parsed = config.parse_config(
        yaml.safe_load(yaml.safe_dump(render_sidecar_config(plan, "reviews", "/c", "/k", "/b"))), "reviews"
    )
    assert parsed.inbound.port_mode(9080).value == "permissive"
    assert [str(i) for d in parsed.outbound.destinations for i in d.identities] == [
        "spiffe://cluster.local/ns/default/sa/productpage",
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
    ]


def test_identity_config_enrols_with_the_ca_on_the_node_instead_of_reading_files() -> None:
    plan = plan_topology(Topology(pods=TOPOLOGY.pods, identity=IdentitySpec(ttl="6s", renew_fraction=0.4)))
    rendered = render_identity_config(plan, "reviews", "/p/token/token", "/p/ca-bundle.pem")
    assert "credentials" not in rendered
    parsed = config.parse_config(yaml.safe_load(yaml.safe_dump(rendered)), "reviews")
    assert parsed.credentials is None and parsed.identity is not None
    assert (parsed.identity.ca_address.host, parsed.identity.ca_address.port) == (str(CA_ADDRESS), 15012)
    assert (parsed.identity.token, parsed.identity.bundle) == ("/p/token/token", "/p/ca-bundle.pem")
    assert (parsed.identity.ttl, parsed.identity.renew_fraction) == (6.0, 0.4)
    # The CA's address is no mesh destination: the sidecar dials it directly (its uid is never captured anyway).
    assert not any(ipaddress.ip_address(CA_ADDRESS) in cidr for d in parsed.outbound.destinations for cidr in d.cidrs)


def test_identity_config_needs_identity_mode() -> None:
    with pytest.raises(LabError, match="not in identity mode"):
        render_identity_config(plan_topology(TOPOLOGY), "reviews", "/t", "/b")

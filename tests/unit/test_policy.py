"""Authorization rules and outbound routing, table-driven."""

from __future__ import annotations

import ipaddress

import pytest

from mtlsmesh.config import Action, AuthzRule, Destination, OutboundConfig, OutboundPolicy
from mtlsmesh.identity import SpiffeId, parse_spiffe_id
from mtlsmesh.policy import Decision, Route, RouteKind, authorize, principal_matches, route_outbound

RATINGS = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/ratings")
REVIEWS = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/reviews")
OTHER_NS = parse_spiffe_id("spiffe://cluster.local/ns/defaultx/sa/reviews")
FOREIGN = parse_spiffe_id("spiffe://example.org/ns/default/sa/reviews")


@pytest.mark.parametrize(
    ("principal", "caller", "matches"),
    [
        ("spiffe://cluster.local/ns/default/sa/ratings", RATINGS, True),
        ("spiffe://cluster.local/ns/default/sa/ratings", REVIEWS, False),
        ("spiffe://cluster.local/ns/default/sa/rating", RATINGS, False),  # exact means exact, not a prefix
        ("spiffe://cluster.local/ns/default/*", RATINGS, True),
        ("spiffe://cluster.local/ns/default/*", OTHER_NS, False),  # path boundary, not string prefix
        ("spiffe://cluster.local/ns/default/sa/ratings/*", RATINGS, False),  # below the ID, not the ID itself
        ("spiffe://cluster.local/*", OTHER_NS, True),
        ("spiffe://cluster.local/*", FOREIGN, False),
        ("*", FOREIGN, True),
        ("*", None, False),  # a plaintext caller is not authenticated
        ("spiffe://cluster.local/ns/default/sa/ratings", None, False),
    ],
)
def test_principal_matches(principal: str, caller: SpiffeId | None, matches: bool) -> None:
    assert principal_matches(principal, caller) is matches


DENY_RATINGS_9080 = AuthzRule(Action.DENY, ("spiffe://cluster.local/ns/default/sa/ratings",), frozenset({9080}))
ALLOW_DEFAULT_NS = AuthzRule(Action.ALLOW, ("spiffe://cluster.local/ns/default/*",))
ALLOW_ANY_3306 = AuthzRule(Action.ALLOW, ("*",), frozenset({3306}))
DENY_ALL = AuthzRule(Action.DENY, ("*",))
ALLOW_REVIEWS_9080 = AuthzRule(Action.ALLOW, (str(REVIEWS),), frozenset({9080, 9090}))

EXAMPLE = [DENY_RATINGS_9080, ALLOW_DEFAULT_NS]


@pytest.mark.parametrize(
    ("rules", "caller", "port", "expected"),
    [
        ([], RATINGS, 9080, Decision(True, None, "no ALLOW rule covers port 9080")),
        ([], None, 9080, Decision(True, None, "no ALLOW rule covers port 9080")),
        (
            EXAMPLE,
            RATINGS,
            9080,
            Decision(False, 0, "rule 0 DENY matches spiffe://cluster.local/ns/default/sa/ratings on port 9080"),
        ),
        (
            EXAMPLE,
            RATINGS,
            9090,
            Decision(True, 1, "rule 1 ALLOW matches spiffe://cluster.local/ns/default/sa/ratings on port 9090"),
        ),
        (
            EXAMPLE,
            REVIEWS,
            9080,
            Decision(True, 1, "rule 1 ALLOW matches spiffe://cluster.local/ns/default/sa/reviews on port 9080"),
        ),
        (
            EXAMPLE,
            OTHER_NS,
            9080,
            Decision(
                False,
                None,
                "spiffe://cluster.local/ns/defaultx/sa/reviews matches no ALLOW rule for port 9080 (rules 1)",
            ),
        ),
        (EXAMPLE, None, 9080, Decision(False, None, "plaintext caller matches no ALLOW rule for port 9080 (rules 1)")),
        # DENY beats ALLOW whatever the order
        (
            [ALLOW_DEFAULT_NS, DENY_RATINGS_9080],
            RATINGS,
            9080,
            Decision(False, 1, "rule 1 DENY matches spiffe://cluster.local/ns/default/sa/ratings on port 9080"),
        ),
        # an ALLOW rule for another port leaves this one open
        ([ALLOW_ANY_3306], OTHER_NS, 9080, Decision(True, None, "no ALLOW rule covers port 9080")),
        ([ALLOW_ANY_3306], None, 9080, Decision(True, None, "no ALLOW rule covers port 9080")),
        (
            [ALLOW_ANY_3306],
            FOREIGN,
            3306,
            Decision(True, 0, "rule 0 ALLOW matches spiffe://example.org/ns/default/sa/reviews on port 3306"),
        ),
        ([ALLOW_ANY_3306], None, 3306, Decision(False, None, "plaintext caller matches no ALLOW rule for port 3306")),
        # a DENY rule for another port does not apply; a DENY for everyone cannot name a plaintext caller
        ([DENY_RATINGS_9080], RATINGS, 9090, Decision(True, None, "no ALLOW rule covers port 9090")),
        (
            [DENY_ALL],
            REVIEWS,
            1,
            Decision(False, 0, "rule 0 DENY matches spiffe://cluster.local/ns/default/sa/reviews"),
        ),
        ([DENY_ALL], None, 1, Decision(True, None, "no ALLOW rule covers port 1")),
        # several ALLOW rules cover the port: any one of them admits
        (
            [ALLOW_REVIEWS_9080, ALLOW_ANY_3306, ALLOW_DEFAULT_NS],
            RATINGS,
            9080,
            Decision(True, 2, "rule 2 ALLOW matches spiffe://cluster.local/ns/default/sa/ratings on port 9080"),
        ),
        (
            [ALLOW_REVIEWS_9080, ALLOW_ANY_3306, ALLOW_DEFAULT_NS],
            FOREIGN,
            9080,
            Decision(False, None, "matches no ALLOW rule for port 9080 (rules 0, 2)"),
        ),
    ],
)
def test_authorize(rules: list[AuthzRule], caller: SpiffeId | None, port: int, expected: Decision) -> None:
    decision = authorize(rules, caller, port)
    assert (decision.allowed, decision.rule) == (expected.allowed, expected.rule)
    assert expected.reason in decision.reason
    assert str(decision) == decision.reason


MESH = Destination((ipaddress.ip_network("198.18.0.0/15"),), frozenset({9080}), (REVIEWS,))
MESH_ANY_PORT = Destination((ipaddress.ip_network("198.18.0.0/16"), ipaddress.ip_network("fd00::/64")), frozenset())
EVERYTHING_ON_443 = Destination((), frozenset({443}))


@pytest.mark.parametrize(
    ("destinations", "policy", "dst", "port", "expected"),
    [
        ((), OutboundPolicy.ALLOW_ANY, "1.1.1.1", 443, Route(RouteKind.PASSTHROUGH, (), "(ALLOW_ANY)")),
        ((), OutboundPolicy.REGISTRY_ONLY, "1.1.1.1", 443, Route(RouteKind.REFUSE, (), "(REGISTRY_ONLY)")),
        ((MESH,), OutboundPolicy.ALLOW_ANY, "198.19.255.1", 9080, Route(RouteKind.MTLS, (REVIEWS,), "destination 0")),
        ((MESH,), OutboundPolicy.ALLOW_ANY, "198.18.0.1", 9081, Route(RouteKind.PASSTHROUGH, (), "port 9081")),
        ((MESH,), OutboundPolicy.REGISTRY_ONLY, "198.20.0.1", 9080, Route(RouteKind.REFUSE, (), "198.20.0.1")),
        # first match wins
        ((MESH, MESH_ANY_PORT), OutboundPolicy.ALLOW_ANY, "198.18.0.1", 9080, Route(RouteKind.MTLS, (REVIEWS,), "0")),
        (
            (MESH_ANY_PORT, MESH),
            OutboundPolicy.ALLOW_ANY,
            "198.18.0.1",
            9080,
            Route(RouteKind.MTLS, (), "destination 0"),
        ),
        ((MESH, MESH_ANY_PORT), OutboundPolicy.ALLOW_ANY, "198.18.0.1", 1, Route(RouteKind.MTLS, (), "destination 1")),
        # families never mix; an IPv4-mapped IPv6 address is matched as IPv4
        ((MESH_ANY_PORT,), OutboundPolicy.ALLOW_ANY, "fd00::5", 80, Route(RouteKind.MTLS, (), "destination 0")),
        ((MESH_ANY_PORT,), OutboundPolicy.REGISTRY_ONLY, "fd01::5", 80, Route(RouteKind.REFUSE, (), "fd01::5")),
        (
            (MESH,),
            OutboundPolicy.REGISTRY_ONLY,
            "::ffff:198.18.0.9",
            9080,
            Route(RouteKind.MTLS, (REVIEWS,), "198.18.0.9"),
        ),
        ((MESH,), OutboundPolicy.REGISTRY_ONLY, "::198.18.0.9", 9080, Route(RouteKind.REFUSE, (), "no destination")),
        # no CIDRs: any address on the listed ports
        ((EVERYTHING_ON_443,), OutboundPolicy.REGISTRY_ONLY, "2001:db8::1", 443, Route(RouteKind.MTLS, (), "443")),
        ((EVERYTHING_ON_443,), OutboundPolicy.REGISTRY_ONLY, "10.0.0.1", 80, Route(RouteKind.REFUSE, (), "port 80")),
    ],
)
def test_route_outbound(
    destinations: tuple[Destination, ...], policy: OutboundPolicy, dst: str, port: int, expected: Route
) -> None:
    route = route_outbound(OutboundConfig(policy=policy, destinations=destinations), ipaddress.ip_address(dst), port)
    assert (route.kind, route.identities) == (expected.kind, expected.identities)
    assert expected.reason in route.reason
    assert str(route) == route.reason

"""Applies, checks and removes the capture rules in the current network namespace, by running iptables and ip.

What it does: picks the iptables command family (nf_tables or legacy), reads the current state with
`iptables-save`, runs the steps `mtlsmesh.capture` planned from that state, and reads the state back to prove the
kernel now holds exactly our rules. What it does not: decide any rule (that is `capture`), or touch anything but
our chains, the jumps into them, TPROXY's policy routing and the `::6` loopback address.

Every failure becomes a `CaptureError` that says what to do: iptables missing, no CAP_NET_ADMIN, a payload the
kernel refused, or rules that differ from what we asked for after applying.

Choosing the backend. Both backends exist side by side on most distributions, and rules written through one are
invisible to the other's `-save`; a namespace must be driven through one of them. `auto` (the default) asks each
family's `-save`: the one that already holds our chains wins (so `--check` and `--cleanup` find what `apply`
wrote), then the one holding more rules (a host, or a CNI, already chose it), and with nothing anywhere (a fresh
pod namespace) the system's `iptables` alternative, which is what the image's packager chose. Kubernetes'
iptables-wrapper decides the same way. `--iptables-backend nft|legacy|system` overrides it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from mtlsmesh.capture import CaptureOptions, Family, LoSource, PolicyRoute, build_rulesets
from mtlsmesh.capture_plan import (
    LO_SOURCE_ABSENT,
    Backend,
    LoSourceState,
    PolicyRouteState,
    SaveState,
    Step,
    compare,
    compare_policy_route,
    lo_source_for,
    parse_lo_source,
    parse_policy_route,
    parse_save,
    plan_apply,
    plan_cleanup,
    policy_route_for,
    tool_name,
)
from mtlsmesh.errors import CaptureError

COMMAND_TIMEOUT = 30.0  # seconds; iptables-restore waits at most 10 s for the legacy lock (RESTORE_FLAGS)
_DENIED = ("permission denied", "you must be root", "operation not permitted")


def run_step(step: Step) -> str:
    """Run one command; return its stdout or raise a `CaptureError` a person can act on."""
    argv = list(step.argv)
    try:
        result = subprocess.run(
            argv, input=step.stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        package = "iproute2" if argv[0] == "ip" else "iptables"
        raise CaptureError(f"{argv[0]} not found on PATH: install the {package} package") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"{' '.join(argv)} did not finish within {COMMAND_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        # A kernel without IPv6 (or lo with disable_ipv6) fails the IPv6 steps, sometimes as "permission denied".
        ipv6 = " (or IPv6 is off here: pass --no-ipv6)" if "-6" in argv or argv[0].startswith("ip6tables") else ""
        if any(word in detail.lower() for word in _DENIED):
            raise CaptureError(
                f"{argv[0]} was refused: capture needs root with CAP_NET_ADMIN in the pod's network namespace{ipv6}"
                f" ({detail})"
            )
        raise CaptureError(f"{' '.join(argv)} failed{ipv6}: {detail}")
    return result.stdout


def detect_backend(requested: Backend | None = None) -> Backend:
    """The iptables command family to use: `requested`, or `auto` as the module docstring explains."""
    if requested is not None:
        _require(tool_name(requested, Family.V4, "restore"))
        return requested
    candidates = [
        backend for backend in (Backend.NFT, Backend.LEGACY) if shutil.which(tool_name(backend, Family.V4, "save"))
    ]
    if not candidates:
        _require(tool_name(Backend.SYSTEM, Family.V4, "restore"))
        return Backend.SYSTEM
    counts: dict[Backend, int] = {}
    for backend in candidates:
        text = run_step(Step((tool_name(backend, Family.V4, "save"),)))
        if any(saved.own_chains() for saved in parse_save(text).values()):
            return backend
        counts[backend] = sum(1 for line in text.splitlines() if line.startswith("-A "))
    ranked = sorted(counts.values(), reverse=True)
    if ranked[0] > 0 and (len(ranked) == 1 or ranked[0] > ranked[1]):
        return max(counts, key=lambda backend: counts[backend])
    if shutil.which(tool_name(Backend.SYSTEM, Family.V4, "restore")):
        return Backend.SYSTEM
    return candidates[0]


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise CaptureError(f"{tool} not found on PATH: install the iptables package")


def read_state(backend: Backend, family: Family) -> SaveState:
    return parse_save(run_step(Step((tool_name(backend, family, "save"),))))


def read_policy_route(route: PolicyRoute) -> PolicyRouteState:
    return parse_policy_route(route, run_step(Step(route.show_rules())), run_step(Step(route.show_routes())))


def read_lo_source(source: LoSource | None) -> LoSourceState:
    return LO_SOURCE_ABSENT if source is None else parse_lo_source(source, run_step(Step(source.show())))


def apply(options: CaptureOptions, backend: Backend) -> tuple[Step, ...]:
    """Install the rules (idempotent: a re-run rewrites our chains and keeps one jump each), then verify them."""
    done: list[Step] = []
    for ruleset in build_rulesets(options):
        state = read_state(backend, ruleset.family)
        route_state = read_policy_route(ruleset.policy_route) if ruleset.policy_route else None
        lo_state = read_lo_source(ruleset.lo_source)
        for step in plan_apply(ruleset, backend, state, route_state, lo_state):
            run_step(step)
            done.append(step)
    differences = check(options, backend)
    if differences:
        raise CaptureError(f"the rules read back differ from the rules applied: {'; '.join(differences)}")
    return tuple(done)


def check(options: CaptureOptions, backend: Backend) -> tuple[str, ...]:
    """Differences between the namespace's rules and those `options` call for; empty when they match."""
    differences: list[str] = []
    for ruleset in build_rulesets(options):
        differences += compare(ruleset, read_state(backend, ruleset.family))
        if ruleset.policy_route is not None:
            differences += compare_policy_route(ruleset.policy_route, read_policy_route(ruleset.policy_route))
    return tuple(differences)


def cleanup(options: CaptureOptions, backend: Backend) -> tuple[Step, ...]:
    """Remove our chains, the jumps into them, TPROXY's policy routing (whatever mode put them there) and the ::6 we
    added to lo (one that was there before apply stays)."""
    done: list[Step] = []
    for family in options.families:
        route, lo = policy_route_for(options, family), lo_source_for(family)
        state, route_state, lo_state = read_state(backend, family), read_policy_route(route), read_lo_source(lo)
        steps = plan_cleanup(family, backend, state, route, route_state, lo, lo_state)
        for step in steps:
            run_step(step)
            done.append(step)
    leftovers = _leftovers(options.families, backend)
    if leftovers:
        raise CaptureError(f"our chains are still present after cleanup: {', '.join(leftovers)}")
    return tuple(done)


def _leftovers(families: Sequence[Family], backend: Backend) -> list[str]:
    found: list[str] = []
    for family in families:
        for table, saved in read_state(backend, family).items():
            found += [f"{family.value} {table} {chain}" for chain in saved.own_chains()]
            found += [f"{family.value} {table}: {line}" for line in saved.jumps_into_ours()]
    return found

"""From the namespace's current rules to ours: parse `iptables-save`, plan the commands, compare the result.

What it does: reads `iptables-save`, `ip -j rule/route` and `ip -j addr` (the ::6 on lo) output into values,
renders the `iptables-restore --noflush` payload that turns the current state into a `capture.RuleSet` (and the one
that removes our rules), lists the differences for `--check`, and spells out every command as a `Step`, which the
installer runs and `--dry-run` prints. What it does not: run anything; all of it is pure and golden-tested.

Idempotency: in `--noflush` mode a `:CHAIN - [0:0]` line creates the chain or, if it exists, empties it, so our
chains are rewritten whole on every run. Jumps live in built-in chains we must not flush, so the apply payload is
rendered against the current state: a missing jump is appended, a duplicate or outdated jump into one of our chains
is deleted, and our chains that the current options no longer use are removed. Since `capture` writes every rule in
the form `iptables-save` prints, comparing is comparing lines.
"""

from __future__ import annotations

import difflib
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from mtlsmesh.capture import (
    APP_SOURCE_NET_V6,
    BUILTIN_CHAINS,
    LO_SOURCE_FLAG,
    OWN_CHAINS,
    TABLES,
    CaptureOptions,
    Family,
    LoSource,
    PolicyRoute,
    RuleSet,
    build_rulesets,
    render_expected,
)


def _hex(value: int) -> str:
    return f"{value:#x}"  # how `ip -j rule` and iptables-save print marks


# ---------------------------------------------------------------------------------------------------------------
# iptables-save state


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One table as `iptables-save` printed it: declared chains and `-A` lines, in order."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]

    def chain_rules(self, chain: str) -> tuple[str, ...]:
        return tuple(line for line in self.rules if line.split()[1] == chain)

    def jumps_into_ours(self) -> tuple[str, ...]:
        """Rules in built-in chains whose target is one of our chains in this table."""
        ours = set(OWN_CHAINS.get(self.name, ()))
        return tuple(line for line in self.rules if line.split()[1] in BUILTIN_CHAINS and _target(line) in ours)

    def own_chains(self) -> tuple[str, ...]:
        return tuple(chain for chain in OWN_CHAINS.get(self.name, ()) if chain in self.chains)


SaveState = Mapping[str, SavedTable]


def _target(line: str) -> str | None:
    words = line.split()
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse `iptables-save` output (comments and counters ignored). Only tables we may touch are kept."""
    tables: dict[str, SavedTable] = {}
    name: str | None = None
    chains: list[str] = []
    rules: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:], [], []
        elif line.startswith(":") and name is not None:
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and name is not None:
            rules.append(" ".join(line.split()))
        elif line == "COMMIT" and name is not None:
            tables[name] = SavedTable(name, tuple(chains), tuple(rules))
            name = None
    return {table: saved for table, saved in tables.items() if table in TABLES}


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def render_apply(ruleset: RuleSet, state: SaveState | None = None) -> str:
    """The `iptables-restore --noflush` payload that turns `state` (default: no rules at all) into `ruleset`."""
    state = state or {}
    out: list[str] = []
    for table in TABLES:
        saved = state.get(table, SavedTable(table, (), ()))
        ours = [chain for t, chain in ruleset.chains if t == table]
        wanted_jumps = [jump.render() for jump in ruleset.jumps if jump.table == table]
        kept: set[str] = set()
        deletes: list[str] = []
        for line in saved.jumps_into_ours():
            if line in wanted_jumps and line not in kept:
                kept.add(line)
            else:  # a duplicate, or a jump an older version or other options left behind
                deletes.append("-D" + line[2:])
        stale = [chain for chain in saved.own_chains() if chain not in ours]
        if not (ours or deletes or stale):
            continue
        out.append(f"*{table}")
        # `:CHAIN - [0:0]` creates the chain, or empties it when it exists: our chains are rewritten whole.
        out += [f":{chain} - [0:0]" for chain in ours]
        out += deletes
        out += [f"-F {chain}" for chain in stale]
        out += [f"-X {chain}" for chain in stale]
        out += [rule.render() for rule in ruleset.rules if rule.table == table]
        # Jumps last: our chains are complete before a jump can lead into them (and a present one is kept).
        out += [line for line in wanted_jumps if line not in kept]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def render_cleanup(state: SaveState) -> str:
    """The payload that removes every jump into our chains and our chains themselves; nothing else."""
    out: list[str] = []
    for table in TABLES:
        saved = state.get(table)
        if saved is None:
            continue
        deletes = ["-D" + line[2:] for line in saved.jumps_into_ours()]
        chains = saved.own_chains()
        if not (deletes or chains):
            continue
        out.append(f"*{table}")
        out += deletes
        # Flush all before deleting any: our chains jump into each other (OUTPUT → IN_REDIRECT).
        out += [f"-F {chain}" for chain in chains]
        out += [f"-X {chain}" for chain in chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------------------------------------------------------
# Comparing


def compare(ruleset: RuleSet, state: SaveState) -> tuple[str, ...]:
    """Differences between what `ruleset` expects and `state`, one readable line each; empty when they match."""
    family = ruleset.family.value
    diffs: list[str] = []
    for table in TABLES:
        saved = state.get(table, SavedTable(table, (), ()))
        ours = [chain for t, chain in ruleset.chains if t == table]
        for chain in ours:
            where = f"{family} {table} {chain}"
            if chain not in saved.chains:
                diffs.append(f"{where}: chain is missing")
                continue
            expected = [rule.render() for rule in ruleset.rules if rule.table == table and rule.chain == chain]
            diffs += _diff_lines(where, expected, list(saved.chain_rules(chain)))
        diffs += [
            f"{family} {table} {chain}: chain should not exist with these options"
            for chain in saved.own_chains()
            if chain not in ours
        ]
        present = list(saved.jumps_into_ours())
        for jump in (j.render() for j in ruleset.jumps if j.table == table):
            count = present.count(jump)
            if count != 1:
                what = "missing" if count == 0 else f"present {count} times"
                diffs.append(f"{family} {table}: jump {what}: {jump}")
        wanted = {j.render() for j in ruleset.jumps if j.table == table}
        diffs += [f"{family} {table}: unexpected jump: {line}" for line in present if line not in wanted]
    return tuple(diffs)


def _diff_lines(where: str, expected: list[str], actual: list[str]) -> list[str]:
    missing: list[str] = []
    unexpected: list[str] = []
    matcher = difflib.SequenceMatcher(a=expected, b=actual, autojunk=False)
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op in ("delete", "replace"):
            missing += expected[a1:a2]
        if op in ("insert", "replace"):
            unexpected += actual[b1:b2]
    # A rule that is both "missing" and "unexpected" is there, in the wrong place: order decides what matches.
    misplaced = [line for line in missing if line in unexpected]
    return [
        *(f"{where}: missing rule: {line}" for line in missing if line not in misplaced),
        *(f"{where}: rule out of order: {line}" for line in misplaced),
        *(f"{where}: unexpected rule: {line}" for line in unexpected if line not in misplaced),
    ]


@dataclass(frozen=True, slots=True)
class PolicyRouteState:
    """How many `ip rule fwmark MARK lookup TABLE` exist, and whether the local default route is in TABLE."""

    rules: int
    route: bool


def parse_policy_route(route: PolicyRoute, rules_json: str, routes_json: str) -> PolicyRouteState:
    """Read `ip -j rule show` and `ip -j route show table all` output."""
    rules = _json_list(rules_json)
    routes = _json_list(routes_json)
    count = sum(
        1
        for entry in rules
        if str(entry.get("fwmark", "")).split("/")[0] in (_hex(route.mark), str(route.mark))
        and str(entry.get("table", "")) == str(route.table)
    )
    local = any(
        entry.get("type") == "local"
        and entry.get("dst") == "default"
        and entry.get("dev") == "lo"
        and str(entry.get("table", "")) == str(route.table)
        for entry in routes
    )
    return PolicyRouteState(count, local)


@dataclass(frozen=True, slots=True)
class LoSourceState:
    """Whether ::6/128 is on lo, and whether it is ours (it carries `LO_SOURCE_FLAG`)."""

    present: bool
    ours: bool


LO_SOURCE_ABSENT = LoSourceState(False, False)


def parse_lo_source(source: LoSource, addr_json: str) -> LoSourceState:
    """Read `ip -j -6 addr show dev lo` output."""
    for link in _json_list(addr_json):
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else ():
            if not isinstance(info, dict) or info.get("family") != "inet6":
                continue
            if info.get("local") == str(source.address.network_address) and info.get("prefixlen") == 128:
                return LoSourceState(True, info.get(LO_SOURCE_FLAG) is True)
    return LO_SOURCE_ABSENT


def _json_list(text: str) -> list[dict[str, object]]:
    if not text.strip():
        return []
    data = json.loads(text)
    return [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []


def compare_policy_route(route: PolicyRoute, found: PolicyRouteState) -> tuple[str, ...]:
    family = route.family.value
    diffs = []
    if found.rules != 1:
        what = "missing" if found.rules == 0 else f"present {found.rules} times"
        diffs.append(f"{family}: ip rule {what}: fwmark {_hex(route.mark)} lookup {route.table}")
    if not found.route:
        diffs.append(f"{family}: route missing: local default dev lo table {route.table}")
    return tuple(diffs)


# ---------------------------------------------------------------------------------------------------------------
# Plans: the exact commands the installer runs (and `--dry-run` prints)


class Backend(enum.Enum):
    """Which iptables command family: the system's default (`iptables`, a Debian alternative), or a named one."""

    SYSTEM = "system"
    NFT = "nft"
    LEGACY = "legacy"


# --noflush: keep every rule that is not ours. --wait: the legacy backend takes a machine-wide lock (xtables.lock)
# that another container's init step may hold for a moment; nf_tables accepts and ignores the flag.
RESTORE_FLAGS = ("--noflush", "--wait=10")


def tool_name(backend: Backend, family: Family, kind: str = "") -> str:
    """`iptables`, `ip6tables-nft-save`, `iptables-legacy-restore`, ..."""
    base = "iptables" if family is Family.V4 else "ip6tables"
    middle = "" if backend is Backend.SYSTEM else f"-{backend.value}"
    return base + middle + (f"-{kind}" if kind else "")


@dataclass(frozen=True, slots=True)
class Step:
    """One command to run, with what to feed it on stdin."""

    argv: tuple[str, ...]
    stdin: str = ""

    def render(self) -> str:
        """As a shell line; a payload becomes a quoted here-document, so the output is a runnable script."""
        command = " ".join(self.argv)
        return f"{command} <<'EOF'\n{self.stdin}EOF" if self.stdin else command


def plan_apply(
    ruleset: RuleSet,
    backend: Backend,
    state: SaveState | None = None,
    route_state: PolicyRouteState | None = None,
    lo_state: LoSourceState = LO_SOURCE_ABSENT,
) -> tuple[Step, ...]:
    """Commands that bring a namespace in `state` (default: no rules, no ::6 on lo) to `ruleset`."""
    steps: list[Step] = []
    if ruleset.lo_source is not None and not lo_state.present:  # present, ours or not: leave it as it is
        steps.append(Step(ruleset.lo_source.add()))
    payload = render_apply(ruleset, state)
    if payload:
        steps.append(Step((tool_name(backend, ruleset.family, "restore"), *RESTORE_FLAGS), payload))
    route = ruleset.policy_route
    if route is not None:
        found = route_state or PolicyRouteState(0, False)
        # `ip rule add` never refuses a duplicate, so presence decides; extra copies from a crashed run go.
        if found.rules == 0:
            steps.append(Step(route.rule_add()))
        steps += [Step(route.rule_delete())] * max(0, found.rules - 1)
        steps.append(Step(route.route_replace()))
    return tuple(steps)


def plan_cleanup(
    family: Family,
    backend: Backend,
    state: SaveState,
    route: PolicyRoute,
    route_state: PolicyRouteState,
    lo_source: LoSource | None = None,
    lo_state: LoSourceState = LO_SOURCE_ABSENT,
) -> tuple[Step, ...]:
    """Commands that remove our chains, the jumps into them, TPROXY's policy routing and the ::6 we added to lo;
    nothing else (a ::6 that was there before apply stays)."""
    steps: list[Step] = []
    payload = render_cleanup(state)
    if payload:
        steps.append(Step((tool_name(backend, family, "restore"), *RESTORE_FLAGS), payload))
    steps += [Step(route.rule_delete())] * route_state.rules
    if route_state.route:
        steps.append(Step(route.route_delete()))
    if lo_source is not None and lo_state.ours:
        steps.append(Step(lo_source.delete()))
    return tuple(steps)


def lo_source_for(family: Family) -> LoSource | None:
    """The ::6 apply adds to lo for this family (IPv6 only); cleanup looks for it whatever the options."""
    return LoSource(APP_SOURCE_NET_V6) if family is Family.V6 else None


def policy_route_for(options: CaptureOptions, family: Family) -> PolicyRoute:
    """The policy routing TPROXY would use; cleanup looks for it whatever the mode, to remove leftovers."""
    return PolicyRoute(family, options.tproxy_mark, options.tproxy_table)


def render_dry_run(options: CaptureOptions, backend: Backend, *, cleanup: bool = False) -> str:
    """The script `apply` (or `--cleanup`) would run, assuming no rules yet (or exactly these rules)."""
    out: list[str] = []
    for ruleset in build_rulesets(options):
        family = ruleset.family
        if cleanup:
            state = parse_save(render_expected(ruleset))
            route = policy_route_for(options, family)
            found = PolicyRouteState(1, True) if ruleset.policy_route else PolicyRouteState(0, False)
            lo = lo_source_for(family)
            steps = plan_cleanup(family, backend, state, route, found, lo, LoSourceState(lo is not None, True))
            out.append(f"# {family.value}: removing these rules (the real run reads iptables-save first)")
        else:
            steps = plan_apply(ruleset, backend)
            out.append(f"# {family.value}: into a namespace without our rules (a re-run keeps present jumps)")
        out += [step.render() for step in steps]
    return "\n".join(out) + "\n"

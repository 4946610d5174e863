"""Which namespaces count as stale: only `<tag><pid><letter>-...` whose creating process is gone."""

from __future__ import annotations

import pytest

from mtlsmesh.lab import netns

LIVE_PID = 4242


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["mm101a-node", "mm101a-web"], ["mm101a-"]),  # a dead run: one prefix for all its namespaces
        (["mm4242a-node"], []),  # its process still runs
        (["mm101a-node", "mm101b-node"], ["mm101a-", "mm101b-"]),  # two labs of one process
        (["mme101a-node"], []),  # another tag ("mme") is not ours when asked for "mm"
        (["mm101-node", "mmx-node", "other101a-node"], []),  # no letter, no pid, not our tag
    ],
)
def test_stale_prefixes(monkeypatch: pytest.MonkeyPatch, names: list[str], expected: list[str]) -> None:
    monkeypatch.setattr(netns, "list_namespaces", lambda: sorted(names))
    monkeypatch.setattr(netns, "alive", lambda pid: pid == LIVE_PID)
    assert netns.stale_prefixes("mm") == expected


def test_ns_exec() -> None:
    assert netns.ns_exec("mm1a-web", ["iptables", "-S"]) == ["ip", "netns", "exec", "mm1a-web", "iptables", "-S"]

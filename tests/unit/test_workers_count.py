"""`workers: auto`: how many workers the CPUs and the cgroup's CPU quota allow (files laid out as the kernel does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtlsmesh import workers
from mtlsmesh.config import Config


def cgroup_tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


V2 = "0::/kubepods/pod1/c1\n"
V1 = "4:memory:/kubepods/pod1/c1\n2:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n"
C1 = "cpu/kubepods/pod1/c1/"  # the v1 cpu controller's directory of that cgroup


@pytest.mark.parametrize(
    ("proc", "files", "cpus"),
    [
        (V2, {"kubepods/pod1/c1/cpu.max": "150000 100000\n"}, 2),  # limits.cpu 1.5: rounded up
        (V2, {"kubepods/pod1/c1/cpu.max": "50000 100000\n"}, 1),  # limits.cpu 500m
        (V2, {"kubepods/pod1/c1/cpu.max": "max 100000\n"}, None),  # no limit
        ("0::/\n", {"cpu.max": "300000 100000\n"}, 3),  # a container's namespaced view: its cgroup is the root
        (V2, {"cpu.max": "100000 100000\n"}, 1),  # its own directory not visible: the root a container sees
        (V1, {C1 + "cpu.cfs_quota_us": "250000\n", C1 + "cpu.cfs_period_us": "100000\n"}, 3),
        (V1, {C1 + "cpu.cfs_quota_us": "-1\n", C1 + "cpu.cfs_period_us": "100000\n"}, None),
        (V1, {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        (V2, {"kubepods/pod1/c1/cpu.max": "garbage\n"}, None),  # unreadable: no quota assumed
        (V2, {"kubepods/pod1/c1/cpu.max": "100000 0\n"}, None),
        ("", {}, None),
    ],
)  # fmt: skip
def test_the_quota_is_read_where_the_kernel_puts_it(
    tmp_path: Path, proc: str, files: dict[str, str], cpus: int | None
) -> None:
    root, proc_cgroup = cgroup_tree(tmp_path, proc, files)
    assert workers.cgroup_cpus(root, proc_cgroup) == cpus


def test_auto_takes_the_fewest_of_the_cpus_the_quota_and_the_cap(tmp_path: Path) -> None:
    allowed = len(os.sched_getaffinity(0))
    root, proc_cgroup = cgroup_tree(tmp_path, V2, {"kubepods/pod1/c1/cpu.max": "50000 100000\n"})
    assert workers.resolve(Config(workers=0), root, proc_cgroup) == 1
    root, proc_cgroup = cgroup_tree(tmp_path / "none", V2, {"kubepods/pod1/c1/cpu.max": "max 100000\n"})
    assert workers.resolve(Config(workers=0), root, proc_cgroup) == min(allowed, workers.DEFAULT_CAP)
    assert workers.resolve(Config(workers=3), root, proc_cgroup) == 3  # a number is taken as it is

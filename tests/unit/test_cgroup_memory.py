"""A container's memory limit, read from fake cgroup v1 and v2 trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from molink.errors import InvalidParameterError
from molink.stage import resources
from molink.stage.cgroup_memory import CgroupMemory, cgroup_memory

GIB = 1 << 30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def _proc(tmp_path: Path, text: str) -> Path:
    proc = tmp_path / "proc_cgroup"
    proc.write_text(text, encoding="ascii")
    return proc


def _v2_group(root: Path, relative: str, limit: str, current: int, inactive: int = 0) -> None:
    directory = root / relative
    _write(directory / "memory.max", f"{limit}\n")
    _write(directory / "memory.current", f"{current}\n")
    _write(directory / "memory.stat", f"anon 5\nfile {inactive}\nkernel 7\n")


def test_v2_limit_leaves_the_limit_minus_what_is_used_less_reclaimable_cache(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _v2_group(root, "app.slice/node", str(4 * GIB), 3 * GIB, inactive=GIB // 2)
    proc = _proc(tmp_path, "0::/app.slice/node\n")
    assert cgroup_memory(root, proc) == CgroupMemory(4 * GIB, GIB + GIB // 2)


def test_v2_an_ancestors_tighter_limit_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "memory\n")
    _v2_group(root, "outer", str(2 * GIB), GIB)
    _v2_group(root, "outer/inner", "max", GIB)
    proc = _proc(tmp_path, "0::/outer/inner\n")
    assert cgroup_memory(root, proc) == CgroupMemory(2 * GIB, GIB)


def test_v2_without_any_limit_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "memory\n")
    _v2_group(root, "free", "max", GIB)
    assert cgroup_memory(root, _proc(tmp_path, "0::/free\n")) is None


def test_v2_a_container_that_sees_its_group_as_the_root(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path, which the container's mount lacks."""
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", f"{GIB}\n")
    _write(root / "memory.current", f"{GIB // 4}\n")
    proc = _proc(tmp_path, "0::/docker/0123abcd\n")
    assert cgroup_memory(root, proc) == CgroupMemory(GIB, GIB - GIB // 4)


def test_v1_memory_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    mount = root / "memory"
    _write(mount / "memory.limit_in_bytes", f"{8 * GIB}\n")
    _write(mount / "memory.usage_in_bytes", f"{3 * GIB}\n")
    _write(mount / "memory.stat", f"cache 9\ntotal_inactive_file {GIB}\n")
    proc = _proc(tmp_path, "9:cpu,cpuacct:/\n4:memory:/process_api/42\n0::/\n")
    assert cgroup_memory(root, proc) == CgroupMemory(8 * GIB, 6 * GIB)


def test_v1_unlimited_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "memory.usage_in_bytes", "1000\n")
    proc = _proc(tmp_path, "4:memory:/\n")
    assert cgroup_memory(root, proc) is None


def test_no_cgroup_filesystem_is_none(tmp_path: Path) -> None:
    assert cgroup_memory(tmp_path / "absent", tmp_path / "absent_proc") is None
    proc = _proc(tmp_path, "0::/\n")
    assert cgroup_memory(tmp_path / "absent", proc) is None


def test_usage_above_the_limit_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "memory\n")
    _v2_group(root, "g", str(GIB), 2 * GIB)
    assert cgroup_memory(root, _proc(tmp_path, "0::/g\n")) == CgroupMemory(GIB, 0)


def test_host_memory_is_cut_to_the_containers_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "cgroup_memory", lambda: CgroupMemory(2 * GIB, GIB))
    memory = resources.host_memory()
    assert memory.total_bytes <= 2 * GIB
    assert memory.free_bytes <= GIB
    with pytest.raises(InvalidParameterError, match="kv_cache_memory.*container's memory limit"):
        resources.check_host_room(3 * GIB // 2)

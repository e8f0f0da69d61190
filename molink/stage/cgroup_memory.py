"""The memory limit of the control group this process runs in (a container's, a systemd
unit's), and how much of it is left.

/proc/meminfo describes the whole machine: inside a container limited to 4 GiB on a 64 GiB
host it reports ~64 GiB available, and a node sized by it (its KV cache, the layers
placement gives it) is killed by the kernel once it passes the container's 4 GiB. The
limit lies in the cgroup filesystem:

* cgroup v2 (the unified hierarchy): ``memory.max`` ("max" when unlimited) and
  ``memory.current`` in the group's directory, and in every ancestor's, which can be
  tighter;
* cgroup v1: ``memory.limit_in_bytes`` (a huge number when unlimited) and
  ``memory.usage_in_bytes`` under the ``memory`` controller's mount.

A container usually sees its own group as the root of the mount, while /proc/self/cgroup
names the path on the host; where that path does not exist the mount's root is read.
Usage counts page cache the kernel reclaims before it kills anything, so the group's
inactive file pages (``memory.stat``) are not counted as used, as ``docker stats`` does.

Standard library only: psutil, the usual choice for memory figures, reads /proc/meminfo
and knows no cgroup limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "unlimited" as the largest page-aligned 64-bit number; any limit this
# large means none.
_UNLIMITED_FROM = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int  # the tightest limit on this process's group or an ancestor
    available_bytes: int  # what that group may still fill before the limit


def cgroup_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> CgroupMemory | None:
    """The tightest memory limit on this process's groups, or None when there is none (or
    no cgroup filesystem to read)."""
    try:
        membership = proc_cgroup.read_text(encoding="ascii")
    except OSError:
        return None
    unified, v1 = _group_paths(membership)
    if unified is not None and (root / "cgroup.controllers").exists():
        return _tightest(_group_chain(root, unified), "memory.max", "memory.current", "file")
    if v1 is not None:
        mount = root / "memory"
        return _tightest(
            _group_chain(mount, v1),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    return None


def _group_paths(membership: str) -> tuple[str | None, str | None]:
    """The unified (v2) group path and the v1 memory controller's, from /proc/self/cgroup."""
    unified = v1 = None
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            v1 = path
    return unified, v1


def _group_chain(root: Path, path: str) -> list[Path]:
    """The group's directory and its ancestors' up to the mount, innermost first."""
    directory = _existing_group(root, path)
    chain = [directory]
    while directory != root and root in directory.parents:
        directory = directory.parent
        chain.append(directory)
    return chain


def _existing_group(root: Path, path: str) -> Path:
    """The group's directory under the mount; the mount itself where the host's path is
    not visible (a container that sees its own group as the root)."""
    directory = root / path.lstrip("/")
    return directory if directory.is_dir() else root


def _tightest(
    directories: list[Path], limit_file: str, usage_file: str, inactive_key: str
) -> CgroupMemory | None:
    best: CgroupMemory | None = None
    for directory in directories:
        limit = _read_limit(directory / limit_file)
        if limit is None:
            continue
        used = _read_int(directory / usage_file) or 0
        used -= min(used, _stat_value(directory / "memory.stat", inactive_key))
        candidate = CgroupMemory(limit, max(0, limit - used))
        if best is None or candidate.available_bytes < best.available_bytes:
            best = candidate
    return best


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED_FROM else value


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0

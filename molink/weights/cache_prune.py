"""Cache entries a newly built one makes useless, removed when it is built.

An entry's name says what it was made from and how: ``{stem}-{file key}-v{version}`` and,
for packed weights, a build suffix (``-torch2.13.0_cpu-b64``). The file key identifies the
file's content as of then (path, size, modification time), so an upgraded molink (a new
format version) or a changed file (a new key) makes a new entry beside the old one, which
for a large model is gigabytes nobody reads again. When an entry is built, the siblings
made from the same source path (their marker's ``source``) go if:

* their file key differs: the file at that path has changed since, so no start can look
  them up again;
* their key and build suffix are the same and their version is older: superseded by this
  entry. A newer version, or another torch build, may belong to another installation
  sharing the cache, and stays. (Removing only older versions means two installations
  never remove each other's entries back and forth.)

Pruning runs only when an entry is built, never on a start that finds its entry, and a
failure to remove costs disk space, nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_NAME = re.compile(
    r"^(?P<stem>.+)-(?P<key>[0-9a-f]{16})-v(?P<version>\d+(?:\.\d+)*)(?P<build>-.+)?$"
)


@dataclass(frozen=True)
class EntryName:
    stem: str
    key: str
    version: tuple[int, ...]
    build: str

    @classmethod
    def parse(cls, name: str) -> EntryName | None:
        match = _NAME.match(name)
        if match is None:
            return None
        version = tuple(int(part) for part in match["version"].split("."))
        return cls(match["stem"], match["key"], version, match["build"] or "")


def superseded_by(new: EntryName, old: EntryName) -> bool:
    """Whether ``old``, made from the same source path as ``new``, can go (module doc)."""
    if old.key != new.key:
        return True
    return old.build == new.build and old.version < new.version


def prune_superseded(entry: Path, source: str, marker_file: str) -> list[Path]:
    """Remove the siblings of the freshly built ``entry`` that it supersedes; returns them."""
    new = EntryName.parse(entry.name)
    if new is None:
        return []
    removed = []
    for sibling in entry.parent.iterdir():
        if sibling == entry or sibling.name.startswith(".") or not sibling.is_dir():
            continue  # ".name.XXXX": another process's entry being built
        old = EntryName.parse(sibling.name)
        if old is None:
            continue
        if source_of(sibling / marker_file) != source or not superseded_by(new, old):
            continue
        size = size_of(sibling)
        shutil.rmtree(sibling, ignore_errors=True)
        if not sibling.exists():
            logger.info(
                "removed %s from the cache (%.1f MiB): superseded by %s",
                sibling.name,
                size / 2**20,
                entry.name,
            )
            removed.append(sibling)
    return removed


def source_of(marker: Path) -> str | None:
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # being written, or not an entry of ours: left alone
    source = info.get("source") if isinstance(info, dict) else None
    return source if isinstance(source, str) else None


def size_of(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            continue
    return total

"""What the on-disk cache holds, and which entries no start can use any more.

``molink cache`` lists every entry (converted models, packed weights, tokenizers) with its
size, its source file and a state; ``molink cache --prune`` removes the entries that are
not ``current``. Building an entry already removes the ones it supersedes for the same
file (molink.weights.cache_prune); what remains for this command are entries of files
that were deleted or changed while no new entry was built for them.

States:

* ``current``: the source file exists as it was when the entry was made (same key);
* ``changed``: the source file exists but has changed since (another key): never used;
* ``missing``: the source file is gone (a deleted model, a temporary directory);
* ``superseded``: current, but another entry of the same file and build has a newer
  format version (left by a start that found its own entry and built nothing).

Folders without a marker (being built, or not ours) are not listed and never removed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from molink.weights.cache import MARKER_FILE, file_key
from molink.weights.cache_prune import EntryName, size_of, source_of, superseded_by

logger = logging.getLogger(__name__)

CACHE_KINDS = ("models", "packed", "tokenizers")


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # one of CACHE_KINDS
    source: str
    size_bytes: int
    state: str  # current, changed, missing or superseded (module doc)


def scan_cache(root: Path) -> list[CacheEntry]:
    """Every marked entry under ``root``'s kinds, sorted by kind and name."""
    entries: list[CacheEntry] = []
    for kind in CACHE_KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        named = []
        for directory in sorted(folder.iterdir()):
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            source = source_of(directory / MARKER_FILE)
            name = EntryName.parse(directory.name)
            if source is None or name is None:
                continue
            named.append((directory, source, name))
        entries += _states(kind, named)
    return entries


def _states(kind: str, named: list[tuple[Path, str, EntryName]]) -> list[CacheEntry]:
    result = []
    for directory, source, name in named:
        state = _file_state(Path(source), name)
        # Only an entry of the same key can supersede a current one (other keys are stale).
        if state == "current" and any(
            other_source == source and other.key == name.key and superseded_by(other, name)
            for _, other_source, other in named
        ):
            state = "superseded"
        result.append(CacheEntry(directory, kind, source, size_of(directory), state))
    return result


def _file_state(source: Path, name: EntryName) -> str:
    try:
        key = file_key(source)
    except OSError:
        return "missing"
    return "current" if key == name.key else "changed"


def prune_cache(root: Path) -> list[CacheEntry]:
    """Remove every entry that is not current; returns those removed."""
    return remove_entries([entry for entry in scan_cache(root) if entry.state != "current"])


def remove_entries(entries: list[CacheEntry]) -> list[CacheEntry]:
    """Remove these scanned entries' folders; returns those removed."""
    removed = []
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            logger.info("removed %s (%s)", entry.path, entry.state)
            removed.append(entry)
    return removed


def format_entries(entries: list[CacheEntry]) -> str:
    """One line per entry, then the total: state, size, kind/name, source."""
    lines = [
        f"{e.state:<10} {e.size_bytes / 2**20:9.1f} MiB  {e.kind}/{e.path.name}  <- {e.source}"
        for e in entries
    ]
    total = sum(e.size_bytes for e in entries)
    lines.append(f"{len(entries)} entries, {total / 2**20:.1f} MiB")
    return "\n".join(lines)

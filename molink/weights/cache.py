"""MoLink's on-disk cache: converted models and tokenizers, written atomically.

A cache entry is a directory that appears in one ``rename``: readers either see all of it or
nothing, so concurrent processes never load half a conversion. When two processes convert
at the same time, the first rename wins and the other discards its copy. Building an entry
removes the ones it makes useless (molink.weights.cache_prune).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from molink.weights.cache_prune import prune_superseded

logger = logging.getLogger(__name__)

CACHE_ENV = "MOLINK_CACHE_DIR"
MARKER_FILE = "molink-cache.json"


def default_cache_dir() -> Path:
    """``$MOLINK_CACHE_DIR``, else ``~/.cache/molink``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "molink"


def file_key(path: Path) -> str:
    """Identifies a file's current version by resolved path, size and modification time."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def is_complete(entry: Path) -> bool:
    return (entry / MARKER_FILE).is_file()


def build_entry(entry: Path, build: Callable[[Path], None], info: dict[str, object]) -> Path:
    """Return ``entry``, building it with ``build(tmp_dir)`` first if it does not exist yet."""
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        build(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2))
        _make_readable(tmp)
        _publish(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    source = info.get("source")
    if isinstance(source, str):
        try:
            prune_superseded(entry, source, MARKER_FILE)
        except OSError as exc:  # an unreadable cache folder costs disk space only
            logger.warning("cannot prune the cache beside %s: %s", entry, exc)
    return entry


def _make_readable(directory: Path) -> None:
    """mkdtemp and some writers create owner-only files; cache entries are world-readable."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _publish(tmp: Path, entry: Path) -> None:
    if entry.exists() and not is_complete(entry):
        # Left by an older, interrupted writer that did not rename atomically: replace it.
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not is_complete(entry):
            raise
        logger.info("another process already built %s; using its copy", entry)

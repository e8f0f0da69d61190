"""``molink cache``: every entry's state, and ``--prune`` removing those no start can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molink.cli.main import main
from molink.weights.cache import CACHE_ENV, MARKER_FILE, file_key
from molink.weights.cache_scan import prune_cache, scan_cache

BUILD = "-torch2.13.0_cpu-b64"
STALE_KEY = "0000000000000000"


def _entry(root: Path, kind: str, name: str, source: Path | None) -> Path:
    directory = root / kind / name
    directory.mkdir(parents=True)
    (directory / "part.bin").write_bytes(b"x" * 2048)
    if source is not None:
        (directory / MARKER_FILE).write_text(json.dumps({"source": str(source)}))
    return directory


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    model = tmp_path / "files" / "smol.gguf"
    model.parent.mkdir()
    model.write_bytes(b"gguf")
    key = file_key(model)
    root = tmp_path / "cache"
    entries = {
        "current": _entry(root, "packed", f"smol-{key}-v2.2{BUILD}", model),
        "superseded": _entry(root, "packed", f"smol-{key}-v2.1{BUILD}", model),
        "other_build": _entry(root, "packed", f"smol-{key}-v2.1-torch2.11.0_cu130-b64", model),
        "changed": _entry(root, "models", f"smol-{STALE_KEY}-v2", model),
        "missing": _entry(root, "tokenizers", f"gone-{key}-v2", tmp_path / "gone.gguf"),
        "unmarked": _entry(root, "models", f"smol-{key}-v1", None),
        "being_built": _entry(root, "models", f".smol-{key}-v3.abcd", model),
    }
    return root, entries


def test_scan_gives_each_entry_its_state(cache: tuple[Path, dict[str, Path]]) -> None:
    root, entries = cache
    states = {entry.path: entry.state for entry in scan_cache(root)}
    assert states == {
        entries["current"]: "current",
        entries["superseded"]: "superseded",
        entries["other_build"]: "current",
        entries["changed"]: "changed",
        entries["missing"]: "missing",
    }
    assert all(entry.size_bytes >= 2048 for entry in scan_cache(root))
    assert scan_cache(root.parent / "no-cache-here") == []


def test_prune_removes_what_is_not_current(cache: tuple[Path, dict[str, Path]]) -> None:
    root, entries = cache
    removed = {entry.path for entry in prune_cache(root)}
    assert removed == {entries["superseded"], entries["changed"], entries["missing"]}
    for name in ("current", "other_build", "unmarked", "being_built"):
        assert entries[name].exists(), name
    assert [entry.state for entry in scan_cache(root)] == ["current", "current"]


def test_the_command_lists_and_prunes(
    cache: tuple[Path, dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, entries = cache
    monkeypatch.setenv(CACHE_ENV, str(root))
    assert main(["cache"]) == 0
    listed = capsys.readouterr().out
    assert f"packed/{entries['superseded'].name}" in listed and "superseded" in listed
    assert "5 entries" in listed
    assert main(["cache", "--prune"]) == 0
    pruned = capsys.readouterr().out
    assert "removed from" in pruned and "3 entries" in pruned
    assert not entries["missing"].exists() and entries["current"].exists()

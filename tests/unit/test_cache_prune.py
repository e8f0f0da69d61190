"""Building a cache entry removes the entries of the same source it makes useless."""

from __future__ import annotations

import json
from pathlib import Path

from molink.weights.cache import MARKER_FILE, build_entry
from molink.weights.cache_prune import EntryName, superseded_by

KEY = "0123456789abcdef"
OTHER_KEY = "fedcba9876543210"
BUILD = "-torch2.13.0_cpu-b64"


def _entry(parent: Path, name: str, source: str | None) -> Path:
    directory = parent / name
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(b"x" * 100)
    if source is not None:
        (directory / MARKER_FILE).write_text(json.dumps({"source": source}))
    return directory


def test_entry_names_parse_with_and_without_a_build() -> None:
    packed = EntryName.parse(f"Smol-LM2.Q4_1-{KEY}-v2.2{BUILD}")
    assert packed == EntryName("Smol-LM2.Q4_1", KEY, (2, 2), BUILD)
    assert EntryName.parse(f"model-{KEY}-v3") == EntryName("model", KEY, (3,), "")
    assert EntryName.parse("model-v3") is None
    assert EntryName.parse(f"model-{KEY}") is None


def test_older_versions_and_changed_files_are_superseded() -> None:
    new = EntryName("m", KEY, (2, 2), BUILD)
    assert superseded_by(new, EntryName("m", KEY, (2, 1), BUILD))  # an older format
    assert superseded_by(new, EntryName("m", OTHER_KEY, (2, 3), BUILD))  # the file changed
    assert not superseded_by(new, EntryName("m", KEY, (2, 3), BUILD))  # a newer install's
    assert not superseded_by(new, EntryName("m", KEY, (2, 1), "-torch2.11.0_cu130-b64"))
    assert not superseded_by(new, new)


def test_building_an_entry_removes_what_it_supersedes(tmp_path: Path) -> None:
    source = "/models/smol.gguf"
    older = _entry(tmp_path, f"smol-{KEY}-v2.1{BUILD}", source)
    changed_file = _entry(tmp_path, f"smol-{OTHER_KEY}-v2.2{BUILD}", source)
    newer = _entry(tmp_path, f"smol-{KEY}-v2.3{BUILD}", source)
    other_build = _entry(tmp_path, f"smol-{KEY}-v2.1-torch2.11.0_cu130-b64", source)
    other_source = _entry(tmp_path, f"smol-{OTHER_KEY}-v2.1{BUILD}", "/elsewhere/smol.gguf")
    other_source_same_name = _entry(tmp_path / "other", f"smol-{KEY}-v2.1{BUILD}", source)
    unmarked = _entry(tmp_path, f"smol-{KEY}-v1{BUILD}", None)
    being_built = _entry(tmp_path, f".smol-{OTHER_KEY}-v2.2{BUILD}.k3j4", source)
    entry = tmp_path / f"smol-{KEY}-v2.2{BUILD}"

    def build(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"y")

    assert build_entry(entry, build, {"source": source}) == entry
    assert (entry / "weights.bin").read_bytes() == b"y"
    assert not older.exists() and not changed_file.exists()
    kept_ones = (newer, other_build, other_source, other_source_same_name, unmarked, being_built)
    for kept in kept_ones:
        assert kept.exists(), kept.name


def test_finding_an_entry_built_before_prunes_nothing(tmp_path: Path) -> None:
    source = "/models/smol.gguf"
    entry = _entry(tmp_path, f"smol-{KEY}-v2", source)
    older = _entry(tmp_path, f"smol-{KEY}-v1", source)

    def build(directory: Path) -> None:  # pragma: no cover - the entry is complete
        raise AssertionError("a complete entry is not built again")

    assert build_entry(entry, build, {"source": source}) == entry
    assert older.exists()

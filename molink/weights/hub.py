"""Models from the Hugging Face hub, fetched file by file.

At resolve time only config.json, generation_config.json, the tokenizer files and the
safetensors index are downloaded; a slice then downloads only the shards that hold its
tensors (see ``SafetensorsStore``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from molink.errors import WeightLoadError
from molink.weights.hf_dir import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsSource,
    load_hf_config,
    read_weight_map,
)

logger = logging.getLogger(__name__)

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)

# (repo_id, filename, revision) -> local path; raises when the file does not exist.
Downloader = Callable[[str, str, str | None], Path]


class _NotOnHub(Exception):
    """The repository exists but lacks this (optional) file."""


def looks_like_hub_id(model: str) -> bool:
    return bool(HUB_ID_RE.match(model)) and ".." not in model


def _hf_download(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError as exc:
        raise _NotOnHub(filename) from exc
    except LocalEntryNotFoundError as exc:
        # Offline and not cached: indistinguishable from a missing file, so say both.
        raise WeightLoadError(
            f"cannot fetch {filename} of {repo_id}: not in the local cache and the hub "
            f"is unreachable ({exc})"
        ) from exc
    except Exception as exc:
        raise WeightLoadError(f"cannot fetch {filename} of {repo_id}: {exc}") from exc


class HubFiles:
    """Downloads files of one repository and remembers which were asked for."""

    def __init__(self, repo_id: str, revision: str | None, download: Downloader) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self._download = download
        self.requested: list[str] = []

    def get(self, filename: str) -> Path:
        self.requested.append(filename)
        try:
            return self._download(self.repo_id, filename, self.revision)
        except _NotOnHub as exc:
            raise WeightLoadError(f"{self.repo_id} has no file {filename}") from exc

    def get_optional(self, filename: str) -> Path | None:
        self.requested.append(filename)
        try:
            return self._download(self.repo_id, filename, self.revision)
        except _NotOnHub:
            return None


class HubSource(SafetensorsSource):
    """A hub model; ``hub_files.requested`` lists every file it asked the hub for."""

    hub_files: HubFiles


def hub_source(
    repo_id: str, revision: str | None = None, download: Downloader | None = None
) -> HubSource:
    """A hub model; ``download`` is replaceable so that file selection can be tested offline."""
    files = HubFiles(repo_id, revision, download or _hf_download)
    config_path = files.get("config.json")
    generation_path = files.get_optional("generation_config.json")
    config = load_hf_config(config_path, generation_path)
    for name in TOKENIZER_FILES:
        files.get_optional(name)
    index_path = files.get_optional(INDEX_FILE)
    weight_map = read_weight_map(index_path) if index_path is not None else None
    source = HubSource(
        name=repo_id,
        model_config=config,
        tokenizer_dir=config_path.parent,
        fetch=files.get,
        weight_map=weight_map,
        where=f"hub:{repo_id}" + (f"@{revision}" if revision else ""),
    )
    source.hub_files = files
    if weight_map is None:
        logger.info("%s has no %s; reading %s", repo_id, INDEX_FILE, SINGLE_FILE)
    return source

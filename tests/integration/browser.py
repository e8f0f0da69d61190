"""A headless Chromium driven by Playwright, for the dashboard and playground tests.

Playwright drives the system's Chromium (Debian's ``chromium`` package, which .ci/run
installs): its own browser download needs an internet connection that test machines lack.
Every request a page makes is logged, so a test can check that none left the server.
Screenshots go to ``test-artifacts/browser`` (ignored by git), or ``$MOLINK_TEST_ARTIFACTS``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.server_process import REPO_ROOT

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
# Headless, no sandbox (tests may run as root in a container), nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
REQUIRE_ENV = "MOLINK_REQUIRE_BROWSER"  # set by .ci/run: a missing browser fails, not skips


def artifacts_dir() -> Path:
    configured = os.environ.get("MOLINK_TEST_ARTIFACTS")
    root = Path(configured) if configured else REPO_ROOT / "test-artifacts"
    path = root / "browser"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if found:
            return found
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Browser:
    context: object  # playwright BrowserContext
    requests: list[str] = field(default_factory=list)

    def new_page(self):
        page = self.context.new_page()
        page.set_default_timeout(30_000)
        return page

    def screenshot(self, page, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    executable = find_chromium()
    if executable is None:
        _unavailable("no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="molink-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": 1280, "height": 900},
        )
        browser = Browser(context)
        context.on("request", lambda request: browser.requests.append(request.url))
        try:
            yield browser
        finally:
            context.close()

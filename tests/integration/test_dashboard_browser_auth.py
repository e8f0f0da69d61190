"""With --api-key, the pages ask for the key once and then show their data (a fake engine
behind the real app; no model needed)."""

from __future__ import annotations

import pytest

from molink.api import ApiConfig, create_app
from molink.dashboard.providers import StaticSwarmProvider
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_process import ThreadedServer
from tests.integration.browser import chromium
from tests.integration.test_dashboard_browser import wait_true

pytestmark = pytest.mark.integration

KEY = "browser-key"


def test_pages_ask_for_the_api_key_then_work() -> None:
    app = create_app(
        FakeEngine(), ApiConfig(api_key=KEY, swarm=StaticSwarmProvider("fake-model", 30))
    )
    with ThreadedServer(app) as server, chromium() as browser:
        page = browser.new_page()
        page.goto(f"{server.base_url}/dashboard")
        page.locator("#key-form").wait_for(state="visible")
        assert page.locator('#nodes-body tr[data-node-id="local"]').count() == 0
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.locator('#nodes-body tr[data-node-id="local"]').wait_for()
        wait_true(page, "() => document.getElementById('coverage').dataset.covered === '30'")
        # The key is kept for the tab: the playground needs no second prompt.
        page.goto(f"{server.base_url}/playground")
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "Hi")
        page.click("#send")
        wait_true(
            page,
            "() => document.querySelector('article.message[data-role=assistant]')"
            "?.dataset.state === 'done'",
        )
        answer = page.locator('article.message[data-role="assistant"]')
        assert answer.get_attribute("data-raw"), answer.locator(".stats").inner_text()
        assert answer.get_attribute("data-route") == "local"
        assert page.locator("#key-form").is_hidden()
        browser.screenshot(page, "playground-with-api-key")
        outside = [url for url in browser.requests if not url.startswith(server.base_url + "/")]
        assert outside == []

"""The dashboard and the playground in a real browser, against a real pipeline.

A head and two stages (SmolLM2-135M, layers [0, 10), [10, 20), [20, 30)) on 127.0.0.1; a
headless Chromium opens /dashboard and /playground. The tests run in order on one pipeline:
the last one kills a stage. Screenshots are kept (see tests/integration/browser.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.browser import Browser, chromium
from tests.integration.pipeline_fixtures import Pipeline, running_pipeline

pytestmark = pytest.mark.integration

NUM_LAYERS = 30
BOUNDS = (0, 10, 20, 30)  # node i serves [BOUNDS[i], BOUNDS[i + 1])
SYSTEM = "You are a helpful assistant."
QUESTION = "Name three primary colors."
MAX_TOKENS = 24
# The head drops a stage after two failed health checks (1 s apart, 2 s timeout each);
# the page hears of it within a second more. Generous, for a loaded machine.
DEATH_SHOWN_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with running_pipeline(BOUNDS) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture(scope="module")
def dashboard(pipeline: Pipeline, browser: Browser):
    page = browser.new_page()
    page.goto(f"{pipeline.base_url}/dashboard")
    yield page
    page.close()


def wait_true(page, expression: str, timeout_s: float = 30.0, arg: object = None) -> None:
    """Polls a JavaScript function until it returns true. (Playwright's wait_for_function
    evaluates its predicate with eval, which the pages' Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting until {expression}")
        time.sleep(0.2)


def _node_ids(pipeline: Pipeline) -> list[str]:
    return [node.grpc_address for node in pipeline.nodes]


def _greedy_answer(pipeline: Pipeline, stop: list[str] | None = None) -> str:
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **({"stop": stop} if stop else {}),
    }
    response = httpx.post(f"{pipeline.base_url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_dashboard_lists_every_node_and_covers_every_layer(pipeline, browser, dashboard) -> None:
    ids = _node_ids(pipeline)
    for node_id, start, end in zip(ids, BOUNDS[:-1], BOUNDS[1:], strict=True):
        row = dashboard.locator(f'#nodes-body tr[data-node-id="{node_id}"]')
        row.wait_for()
        assert row.locator("td.layers").inner_text() == f"[{start}, {end})"
        assert row.locator("td.device").inner_text().startswith("cpu")  # as each node says
        span = dashboard.locator(f'#coverage g.span[data-node-id="{node_id}"]')
        assert span.get_attribute("data-start") == str(start)
        assert span.get_attribute("data-end") == str(end)
    wait_true(
        dashboard,
        "() => document.querySelectorAll('#nodes-body tr[data-health=alive]').length === 3",
    )
    coverage = dashboard.locator("#coverage")
    assert coverage.get_attribute("data-layers") == str(NUM_LAYERS)
    assert coverage.get_attribute("data-covered") == str(NUM_LAYERS)
    assert dashboard.locator("#coverage .missing-span").count() == 0
    assert "every layer is served" in dashboard.locator("#summary").inner_text()
    assert dashboard.locator("#links li").count() == 3  # head -> s1 -> s2 -> head
    labels = dashboard.locator("#coverage .link-label")
    assert labels.count() == 3 and "RTT" in labels.first.text_content()
    # It keeps updating by itself (one event a second).
    first = float(dashboard.locator("#status").get_attribute("data-updated-at"))
    wait_true(
        dashboard,
        "(first) => Number(document.getElementById('status').dataset.updatedAt) > first",
        10.0,
        arg=first,
    )
    browser.screenshot(dashboard, "dashboard-complete")


def _ask(page) -> object:
    """Sends QUESTION from the playground; returns the answer's element once it is done."""
    page.fill("#prompt", QUESTION)
    page.click("#send")
    wait_true(
        page,
        "() => document.querySelector('article.message[data-role=assistant]')"
        "?.dataset.state === 'done'",
        timeout_s=120,
    )
    return page.locator('article.message[data-role="assistant"]').last


def test_a_stage_shows_the_pipeline_as_the_head_reported_it(pipeline, browser) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{pipeline.nodes[1].base_url}/dashboard")
        wait_true(page, "() => document.querySelectorAll('#nodes-body tr').length === 3")
        assert page.locator("#coverage").get_attribute("data-covered") == str(NUM_LAYERS)
        head_row = page.locator(f'#nodes-body tr[data-node-id="{_node_ids(pipeline)[0]}"]')
        assert "as last reported by the head" in head_row.inner_text()
    finally:
        page.close()


def test_playground_streams_the_greedy_answer(pipeline, browser) -> None:
    expected = _greedy_answer(pipeline)
    assert len(expected.split()) > 3
    page = browser.new_page()
    try:
        page.goto(f"{pipeline.base_url}/playground")
        wait_true(page, "() => document.getElementById('model').textContent.length > 0")
        page.fill("#system", SYSTEM)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(MAX_TOKENS))
        answer = _ask(page)
        assert answer.get_attribute("data-raw") == expected
        assert answer.get_attribute("data-route") == ",".join(_node_ids(pipeline))
        assert float(answer.get_attribute("data-ttft")) > 0
        assert float(answer.get_attribute("data-rate")) > 0
        assert answer.get_attribute("data-tokens") == str(MAX_TOKENS) or "stop" in (
            answer.locator(".stats").inner_text()
        )
        assert "TTFT" in answer.locator(".stats").inner_text()
        browser.screenshot(page, "playground-answer")
        # The stop field reaches the server: the same question, cut at its third word.
        stop = expected.split()[2]
        page.click("#clear")
        page.fill("#stop", stop)
        stopped = _ask(page)
        assert stopped.get_attribute("data-raw") == _greedy_answer(pipeline, [stop])
        assert stop not in stopped.get_attribute("data-raw")
        assert "finished: stop" in stopped.locator(".stats").inner_text()
    finally:
        page.close()


def test_markdown_from_the_model_cannot_inject_html(pipeline, browser) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{pipeline.base_url}/playground")
        result = page.evaluate(
            """async () => {
                const { renderMarkdown } = await import('/dashboard/static/markdown.js');
                window.__injected = false;
                const evil = [
                    '# Title <img src=x onerror="window.__injected = true">',
                    '<script>window.__injected = true</script>',
                    '**bold** and `<b>code</b>` [ok](https://example.org/x) [bad](javascript:window.__injected=true)',
                    '- item <iframe src="javascript:1"></iframe>',
                    '```html', '<svg onload="window.__injected = true">', '```',
                ].join('\\n');
                const box = document.createElement('div');
                box.append(renderMarkdown(evil));
                document.body.append(box);
                await new Promise((resolve) => setTimeout(resolve, 200));
                const tags = [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase());
                const attrs = [...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name));
                return { tags, attrs, text: box.textContent, injected: window.__injected,
                         links: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')) };
            }"""
        )
    finally:
        page.close()
    assert not result["injected"]
    assert set(result["tags"]) <= {"h3", "p", "strong", "code", "a", "ul", "li", "pre"}
    assert {"h3", "strong", "code", "ul", "pre"} <= set(result["tags"])
    assert not any(name.startswith("on") or name == "src" for name in result["attrs"])
    assert result["links"] == ["https://example.org/x"]
    for shown in ("<img src=x", "<script>", "<iframe", "<svg onload", "<b>code</b>"):
        assert shown in result["text"]


def test_charts_have_points_after_requests(pipeline, dashboard, browser) -> None:
    for _ in range(2):
        _greedy_answer(pipeline)
    for chart in ("tokens", "requests", "ttft", "itl", "kv", "recovery"):
        wait_true(
            dashboard, f"() => Number(document.getElementById('chart-{chart}').dataset.points) > 0"
        )
    browser.screenshot(dashboard, "dashboard-charts")


def test_a_killed_stage_shows_missing_and_its_span_uncovered(pipeline, dashboard, browser) -> None:
    victim = pipeline.nodes[-1]
    node_id = victim.grpc_address
    victim.kill()
    killed_at = time.monotonic()
    wait_true(
        dashboard,
        "(id) => ['missing', 'dead'].includes("
        "document.querySelector(`#nodes-body tr[data-node-id='${id}']`)?.dataset.health)",
        DEATH_SHOWN_WITHIN_S,
        arg=node_id,
    )
    wait_true(
        dashboard,
        "() => document.getElementById('summary').dataset.missing === '[20, 30)'",
        DEATH_SHOWN_WITHIN_S,
    )
    shown_after = time.monotonic() - killed_at
    assert shown_after < DEATH_SHOWN_WITHIN_S
    assert dashboard.locator("#coverage").get_attribute("data-covered") == "20"
    gap = dashboard.locator("#coverage .missing-span")
    assert (gap.get_attribute("data-start"), gap.get_attribute("data-end")) == ("20", "30")
    print(f"the dead stage showed on the dashboard {shown_after:.1f}s after it was killed")
    browser.screenshot(dashboard, "dashboard-stage-killed")


def test_no_page_loaded_anything_from_elsewhere(pipeline, browser) -> None:
    assert browser.requests, "the pages made no requests at all"
    servers = tuple(f"{node.base_url}/" for node in pipeline.nodes)
    outside = [url for url in browser.requests if not url.startswith(servers)]
    assert outside == []

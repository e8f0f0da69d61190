"""/dashboard and /playground over HTTP: pages and assets, the data behind the API key,
the live event stream, and the route header on generation responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.dashboard.providers import StaticSwarmProvider
from molink.dashboard.routes import _event_stream
from tests.helpers.fake_engine import FakeEngine, FakeEngineOptions

PAGES = ("/dashboard", "/playground")
ASSETS = ("api.js", "charts.js", "coverage.js", "dashboard.js", "markdown.js", "playground.js",
          "style.css")  # fmt: skip
KEY = "secret-key"


@pytest.fixture
def client() -> Iterator[TestClient]:
    config = ApiConfig(swarm=StaticSwarmProvider("fake-model", 30))
    with TestClient(create_app(FakeEngine(), config)) as test_client:
        yield test_client


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    config = ApiConfig(api_key=KEY, swarm=StaticSwarmProvider("fake-model", 30))
    with TestClient(create_app(FakeEngine(), config)) as test_client:
        yield test_client


def test_pages_and_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    for path in [*PAGES, *(f"/dashboard/static/{name}" for name in ASSETS)]:
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert client.get("/dashboard").headers["content-type"].startswith("text/html")
    assert (
        client.get("/dashboard/static/api.js").headers["content-type"].startswith("text/javascript")
    )


@pytest.mark.parametrize(
    "path", ["/dashboard/static/nothing.js", "/dashboard/static/..%2F__init__.py",
             "/dashboard/static/snapshot.py", "/dashboard/static/%2E%2E%2Fstate.py"],
)  # fmt: skip
def test_only_shipped_assets_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_pages_reference_only_this_server() -> None:
    from importlib import resources

    static = resources.files("molink.dashboard") / "static"
    for asset in static.iterdir():
        text = asset.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), asset.name
        assert "https://" not in text and "//cdn" not in text, asset.name


def test_snapshot_json(client: TestClient) -> None:
    body = client.get("/dashboard/api/snapshot").json()
    assert body["snapshot"]["num_layers"] == 30
    assert body["snapshot"]["coverage"] == [1] * 30 and body["snapshot"]["missing_spans"] == []
    assert len(body["history"]) >= 1 and "tokens_per_s" in body["history"][0]


def test_with_an_api_key_pages_are_open_and_data_needs_the_key(keyed: TestClient) -> None:
    for path in [*PAGES, "/dashboard/static/dashboard.js"]:
        assert keyed.get(path).status_code == 200, path
    for path in ("/dashboard/api/snapshot", "/dashboard/api/events", "/v1/models"):
        assert keyed.get(path).status_code == 401, path
    authorized = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/dashboard/api/snapshot", headers=authorized).status_code == 200
    # The open paths are exactly these: no prefix trick reaches the data.
    assert keyed.get("/dashboard/static/../api/snapshot").status_code in (401, 404)
    assert keyed.get("/dashboardx").status_code == 401


def test_generation_responses_name_their_route(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["x-molink-route"] == "local"
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.headers["x-molink-route"] == "local"
    assert "x-molink-route" not in client.get("/v1/models").headers


def test_finished_requests_reach_the_charts(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    state = client.app.state.dashboard
    state.history._points.clear()  # sample now, whatever the sampler did
    state.history.sample_if_due()
    (point,) = state.history.points()
    assert point["tokens_per_s"] > 0 and point["ttft_p50"] is not None


class _Request:
    """Stands in for the HTTP request: disconnects after ``events`` events."""

    def __init__(self, events: int) -> None:
        self.left = events

    async def is_disconnected(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_event_stream_sends_snapshots_and_new_points_then_ends(
    client: TestClient, monkeypatch
) -> None:
    monkeypatch.setattr("molink.dashboard.routes.EVENT_INTERVAL_S", 0.0)
    state = client.app.state.dashboard

    async def collect() -> list[str]:
        return [event async for event in _event_stream(state, _Request(2))]

    events = asyncio.run(collect())
    assert len(events) == 2
    for event in events:
        name, data = event.strip().split("\n")
        assert name == "event: swarm"
        payload = json.loads(data.removeprefix("data: "))
        assert payload["snapshot"]["num_layers"] == 30
    first = json.loads(events[0].split("data: ")[1])
    second = json.loads(events[1].split("data: ")[1])
    assert first["history"]  # the whole history first, then only what is new
    assert all(p["t"] > first["history"][-1]["t"] for p in second["history"])


def test_event_stream_ends_when_the_server_stops(client: TestClient) -> None:
    state = client.app.state.dashboard
    client.app.state.molink.streams.close_all("stop requested")

    async def collect() -> list[str]:
        return [event async for event in _event_stream(state, _Request(100))]

    assert asyncio.run(collect()) == []


def test_a_watching_dashboard_does_not_hold_up_a_server_stop() -> None:
    import threading
    import time

    import httpx

    from tests.helpers.server_process import ThreadedServer

    app = create_app(FakeEngine(), ApiConfig(swarm=StaticSwarmProvider("fake-model", 30)))
    server = ThreadedServer(app).__enter__()
    received = threading.Event()
    ended = threading.Event()

    def watch() -> None:
        with httpx.stream("GET", f"{server.base_url}/dashboard/api/events", timeout=30) as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    received.set()
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert received.wait(20), "no event arrived"
    finally:
        started = time.monotonic()
        server.__exit__(None, None, None)
    assert ended.wait(10)
    assert time.monotonic() - started < 5.0


def test_charts_are_sampled_while_nobody_watches(client: TestClient) -> None:
    import time

    history = client.app.state.dashboard.history
    deadline = time.monotonic() + 20
    while len(history.points()) < 2:  # one point a second, from the app's own task
        assert time.monotonic() < deadline, "the sampler took no points"
        time.sleep(0.1)


def test_the_route_named_is_the_one_that_served_the_answer() -> None:
    """A request that moved to another route midway (a failover) names the route of its
    last tokens: in the header of a response sent once it finished, and, for a stream
    whose headers left earlier, at /dashboard/api/served/{id}."""
    first, second = ("head", "a", "b"), ("head", "c", "b")
    engine = FakeEngine(options=FakeEngineOptions(routes=(first, first, second)))
    config = ApiConfig(swarm=StaticSwarmProvider("fake-model", 30, node_id="head"))
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    with TestClient(create_app(engine, config)) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.headers["x-molink-route"] == "head,c,b"
        served = client.get(f"/dashboard/api/served/{response.json()['id']}")
        assert served.status_code == 200 and served.json()["route"] == list(second)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.headers["x-molink-route"] == "head"  # a new request's route, then
        stream_id = json.loads(streamed.text.split("data: ", 2)[1].split("\n")[0])["id"]
        assert client.get(f"/dashboard/api/served/{stream_id}").json()["route"] == list(second)
        unknown = client.get("/dashboard/api/served/chatcmpl-unknown")
        assert unknown.status_code == 404 and "chatcmpl-unknown" in unknown.text


def test_served_routes_keep_only_the_latest() -> None:
    from molink.dashboard.served import ServedRoutes
    from molink.outputs import RequestMetrics, RequestOutput

    served = ServedRoutes(max_kept=2)
    for name in ("a", "b", "c"):
        served.observe(RequestOutput(name, [], [], True, RequestMetrics(0.0), route=(name,)))
    served.observe(RequestOutput("local", [], [], True, RequestMetrics(0.0)))  # no route
    assert (served.get("a"), served.get("b"), served.get("c")) == (None, ("b",), ("c",))
    assert served.get("local") is None

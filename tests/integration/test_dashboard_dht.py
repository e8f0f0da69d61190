"""The dashboard of a head that finds its stages through the DHT (``molink serve``
processes, a tiny model): record age and expiry per node, and a killed stage shown missing
with its span uncovered within one record lifetime, and staying so (its leftover record
does not bring it back)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.pipeline_fixtures import running_pipeline, wait_until

pytestmark = pytest.mark.integration

TTL_S = 6.0
DHT = ("--molink-dht", "on", "--molink-dht-ttl", str(TTL_S))
BOUNDS = (0, 2, 3, 4)
# Health checks usually notice first (two failed checks, 1 s apart); the record expires
# after TTL_S at most. Margin for a loaded machine.
SHOWN_WITHIN_S = TTL_S + 10.0


def _snapshot(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/dashboard/api/snapshot", timeout=10.0)
    response.raise_for_status()
    return response.json()["snapshot"]


def _nodes(snapshot: dict) -> dict[str, dict]:
    return {node["node_id"]: node for node in snapshot["nodes"]}


def test_a_killed_stage_found_through_the_dht_shows_missing_and_stays_so(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    with running_pipeline(BOUNDS, model, extra_args=DHT) as pipeline:
        ids = [node.grpc_address for node in pipeline.nodes]

        def records_seen() -> bool:
            nodes = _nodes(_snapshot(pipeline.base_url))
            return all(nodes[i]["record_expires_s"] is not None for i in ids[1:])

        wait_until(records_seen, 30, "the head has read every stage's DHT record")
        nodes = _nodes(_snapshot(pipeline.base_url))
        for node_id in ids[1:]:
            node = nodes[node_id]
            assert node["health"] == "alive", node
            assert 0 <= node["record_age_s"] <= TTL_S and 0 < node["record_expires_s"] <= TTL_S

        victim = pipeline.nodes[-1]
        victim.kill()
        killed_at = time.monotonic()

        def shown_missing() -> bool:
            snapshot = _snapshot(pipeline.base_url)
            dead = _nodes(snapshot).get(victim.grpc_address, {}).get("health")
            return dead in ("missing", "dead") and snapshot["missing_spans"] == [
                {"start": 3, "end": 4}
            ]

        wait_until(shown_missing, SHOWN_WITHIN_S, "the killed stage shows missing")
        shown_after = time.monotonic() - killed_at
        print(f"the dead stage showed on the dashboard {shown_after:.1f}s after it was killed")
        # Until well past its record's expiry, it never counts as serving again.
        deadline = time.monotonic() + TTL_S + 3.0
        while time.monotonic() < deadline:
            snapshot = _snapshot(pipeline.base_url)
            assert snapshot["missing_spans"] == [{"start": 3, "end": 4}], snapshot
            assert _nodes(snapshot)[victim.grpc_address]["health"] in ("missing", "dead")
            time.sleep(0.3)
        gone = _nodes(_snapshot(pipeline.base_url))[victim.grpc_address]
        assert gone["health"] == "dead" and gone["record_expires_s"] is None, gone

"""DHT records: round trip, and records of other models, versions or spans are refused."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.discovery.records import RECORD_VERSION, RecordError, info_of, record_of, swarm_key
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from tests.helpers.dht_answers import answered

MODEL = toy_identity(4)
TTL = 15.0
INFO = NodeInfo(
    "s1",
    MODEL,
    LayerRange(2, 4),
    "127.0.0.1:5",
    10,
    16,
    free_kv_blocks=7,
    public_key=b"0Y0\x13\x06\x07*\x86H\xce=\x02\x01",
    throughput_tokens_per_s=812.5,
    device="cuda:1",
    memory_total_bytes=80 * 2**30,
    memory_free_bytes=61 * 2**30,
)


def test_a_record_round_trips() -> None:
    assert info_of(record_of(INFO, TTL), MODEL, INFO.protocol_version) == INFO
    assert swarm_key(MODEL) == f"molink/toy/{MODEL.fingerprint}/nodes"


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"fingerprint": "zzz"}, "fingerprint zzz"),
        ({"protocol": 1}, "protocol version 1"),
        ({"end": 9}, r"span \[2, 9\) is not part of \[0, 4\)"),
        ({"start": -1}, "field 'start' is missing or not a count"),
        ({"address": 5}, "field 'address' is missing or not a string"),
        ({"throughput": float("nan")}, "field 'throughput' is missing or not a finite number"),
        ({"v": 1}, "record version 1, this node reads 2"),
        ({"public_key": "abc"}, "field 'public_key' is missing or not a key"),
        ({"public_key": b"k" * 2000}, "field 'public_key' is missing or not a key"),
        ({"device": None}, "field 'device' is missing or not a string"),
        ({"memory_free": -1}, "field 'memory_free' is missing or not a count"),
        ({"ttl": "15"}, "field 'ttl' is missing or not a finite number"),
        ({"seq": -1}, "field 'seq' is not a count below 2"),
        ({"seq": 2**64}, "field 'seq' is not a count below 2"),
        ({"seq": True}, "field 'seq' is not a count"),
        ({"leaving": 1}, "field 'leaving' is not true or false"),
        ({"address": "a" * 100_000}, "field 'address' is longer than 512 characters"),
        ({"served_name": "m" * 513}, "field 'served_name' is longer than 512"),
        ({"node_id": ""}, "field 'node_id' is empty"),
        ({"address": ""}, "field 'address' is empty"),
        ({"device": "cpu\x1b[2J\x1b[H"}, "field 'device' holds control"),
        ({"node_id": "s1\nFAKE LINE"}, "field 'node_id' holds control"),
    ],
)
def test_foreign_or_malformed_records_are_refused(change: dict, reason: str) -> None:
    record = {**record_of(INFO, TTL), **change}
    with pytest.raises(RecordError, match=reason):
        info_of(record, MODEL, INFO.protocol_version)
    with pytest.raises(RecordError, match="not a map"):
        info_of([1, 2], MODEL, INFO.protocol_version)


def test_another_models_record_names_both_models() -> None:
    other = dataclasses.replace(INFO, model=toy_identity(4, served_name="other"))
    with pytest.raises(RecordError, match="model 'other'.*this swarm serves 'toy'"):
        info_of(record_of(other, TTL), MODEL, INFO.protocol_version)


def test_the_record_carries_identity_speed_and_device() -> None:
    record = record_of(INFO, TTL)
    assert record["v"] == RECORD_VERSION == 2
    assert record["public_key"] == INFO.public_key
    assert (record["device"], record["memory_total"], record["memory_free"]) == (
        "cuda:1",
        80 * 2**30,
        61 * 2**30,
    )
    assert (record["free_kv_blocks"], record["throughput"]) == (7, 812.5)


class _Entry:
    def __init__(self, value: object, expiration_time: float) -> None:
        self.value = value
        self.expiration_time = expiration_time


class _FakeDHT:
    """hivemind.DHT.get's answer shape: a value whose .value maps subkeys to entries."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._found = _Entry(entries, 0.0)

    def get(self, key: str, latest: bool, return_future: bool = False) -> Any:
        return answered(self._found, return_future)


def test_the_directory_ignores_foreign_records_and_logs_why_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hivemind.utils import get_dht_time

    later = get_dht_time() + 10  # announced about TTL - 10 = 5 s ago
    other_model = dataclasses.replace(INFO, node_id="s2", model=toy_identity(4, served_name="x"))
    old_protocol = {**record_of(dataclasses.replace(INFO, node_id="s3"), TTL), "protocol": 1}
    outside = {**record_of(dataclasses.replace(INFO, node_id="s4"), TTL), "end": 9}
    directory = SwarmDirectory(MODEL, INFO.protocol_version)
    directory._dht = _FakeDHT(
        {
            "s1": _Entry(record_of(INFO, TTL), later),
            "s2": _Entry(record_of(other_model, TTL), later),
            "s3": _Entry(old_protocol, later),
            "s4": _Entry(outside, later),
        }
    )
    with caplog.at_level(logging.WARNING, logger="molink.discovery.dht"):
        assert list(directory.nodes()) == ["s1"]
        assert list(directory.nodes()) == ["s1"]
    (record,) = directory.records()
    assert record.info == INFO and 0 < record.expires_in_s <= 10
    assert record.age_s + record.expires_in_s == pytest.approx(TTL)  # age: TTL less what is left
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 3  # once per node, not once per reading
    assert any("node s2" in r and "model 'x'" in r for r in reasons)
    assert any("node s3" in r and "protocol version 1" in r for r in reasons)
    assert any("node s4" in r and "span [2, 9) is not part of [0, 4)" in r for r in reasons)


def test_refused_records_are_remembered_in_bounded_number_and_logged_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hivemind.utils import get_dht_time

    from molink.discovery.dht import MAX_IGNORED_NODES

    later = get_dht_time() + 10
    bad = {**record_of(INFO, TTL), "protocol": 1}
    entries = {f"x{i}": _Entry(bad, later) for i in range(MAX_IGNORED_NODES + 50)}
    entries["y" * 5000] = _Entry(bad, later)
    directory = SwarmDirectory(MODEL, INFO.protocol_version)
    directory._dht = _FakeDHT(entries)
    with caplog.at_level(logging.WARNING, logger="molink.discovery.dht"):
        assert directory.nodes() == {}
    assert len(directory._ignored) == MAX_IGNORED_NODES
    assert max(len(r.getMessage()) for r in caplog.records) < 400
    assert any("(5000 chars)" in r.getMessage() for r in caplog.records)

"""DHT records: round trip, and records of other models, versions or spans are refused."""

from __future__ import annotations

import dataclasses

import pytest

from molink.config import LayerRange
from molink.discovery.records import RecordError, info_of, record_of, swarm_key
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity

MODEL = toy_identity(4)
INFO = NodeInfo("s1", MODEL, LayerRange(2, 4), "127.0.0.1:5", 10, 16, free_kv_blocks=7)


def test_a_record_round_trips() -> None:
    assert info_of(record_of(INFO), MODEL, INFO.protocol_version) == INFO
    assert swarm_key(MODEL) == f"molink/toy/{MODEL.fingerprint}/nodes"


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"fingerprint": "zzz"}, "fingerprint zzz"),
        ({"protocol": 1}, "protocol version 1"),
        ({"end": 9}, r"span \[2, 9\) is not part of \[0, 4\)"),
        ({"start": -1}, "field 'start' is missing or not a count"),
        ({"address": 5}, "field 'address' is missing or not a string"),
        ({"throughput": float("nan")}, "not a finite rate"),
    ],
)
def test_foreign_or_malformed_records_are_refused(change: dict, reason: str) -> None:
    record = {**record_of(INFO), **change}
    with pytest.raises(RecordError, match=reason):
        info_of(record, MODEL, INFO.protocol_version)
    with pytest.raises(RecordError, match="not a map"):
        info_of([1, 2], MODEL, INFO.protocol_version)


def test_another_models_record_names_both_models() -> None:
    other = dataclasses.replace(INFO, model=toy_identity(4, served_name="other"))
    with pytest.raises(RecordError, match="model 'other'.*this swarm serves 'toy'"):
        info_of(record_of(other), MODEL, INFO.protocol_version)

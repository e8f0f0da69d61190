"""A node's DHT record: what it serves and how to reach it, as plain values.

Records travel as msgpack maps of strings, numbers and bytes (hivemind's serializer),
never as pickles, and are checked field by field on receipt: a record of another record
version, another model's fingerprint, another protocol version or a span outside the model
is ignored, and the reason is logged once per node.

Schema, version 2 (every field required):

  v            int    the record version (RECORD_VERSION)
  node_id      str    the node's id (its key's hash; an open node's address)
  public_key   bytes  the node's identity key, DER (an open node's too: made at start, it is
                      vouched for by no authority and its records are not signed)
  address      str    advertised gRPC host:port
  dht          str    a multiaddress others may bootstrap the DHT from
  protocol     int    the wire protocol version it speaks
  served_name, fingerprint, num_layers, hidden_size, vocab_size   the model
  start, end   int    its layer span [start, end)
  num_kv_blocks, free_kv_blocks, block_size   int   its KV capacity and what is free now
  dtype, wire_dtype   str   compute dtype, and that of the activations it sends
  throughput   float  measured tokens per second of compute over its span (0: not yet)
  ttl          float  seconds the record lives from its announcement (0: not said)
  device       str    "cpu", "cuda:0", ...
  memory_total, memory_free   int   that device's memory, bytes (0: not reported)

Optional in version 2 (a record without it is read as 0: not measured; records of nodes
that predate it stay readable, so the version is unchanged):

  layer_step_s float  seconds one decoder layer takes for a probe step on its device,
                      measured at start (molink.stage.speed); placement balances by it
  seq          int    raised by the node with every announcement (0: not said); of one
                      node's records, readers take the newest (molink.discovery.newest)
  leaving      bool   the node has left: readers drop it, and its older records with it
"""

from __future__ import annotations

import math
from typing import Any

from molink.config import LayerRange
from molink.pipeline.identity import ModelIdentity, NodeInfo

RECORD_VERSION = 2
_STR_FIELDS = (
    "node_id",
    "address",
    "served_name",
    "fingerprint",
    "dtype",
    "wire_dtype",
    "dht",
    "device",
)
_INT_FIELDS = (
    "v",
    "protocol",
    "num_layers",
    "hidden_size",
    "vocab_size",
    "start",
    "end",
    "num_kv_blocks",
    "free_kv_blocks",
    "block_size",
    "memory_total",
    "memory_free",
)
# Node ids are key hashes or host:port, the rest names, dtypes, multiaddresses: a record
# from a peer is stored, shown and logged, so its text is bounded.
MAX_TEXT_CHARS = 512
_MAX_PUBLIC_KEY_BYTES = 1024  # a P-256 or Ed25519 key in DER is under 100 bytes


class RecordError(ValueError):
    """A record that is malformed or does not belong to this swarm's model."""


def record_of(
    info: NodeInfo, ttl_s: float = 0.0, seq: int = 0, leaving: bool = False
) -> dict[str, Any]:
    """``ttl_s``: the lifetime it is announced with (0: not said; then its age is unknown).
    ``seq``: this announcement's number; ``leaving``: the node is leaving the swarm."""
    return {
        "ttl": float(ttl_s),
        "v": RECORD_VERSION,
        "node_id": info.node_id,
        "address": info.address,
        "served_name": info.model.served_name,
        "fingerprint": info.model.fingerprint,
        "num_layers": info.model.num_layers,
        "hidden_size": info.model.hidden_size,
        "vocab_size": info.model.vocab_size,
        "start": info.layers.start,
        "end": info.layers.end,
        "num_kv_blocks": info.num_kv_blocks,
        "free_kv_blocks": info.free_kv_blocks,
        "block_size": info.block_size,
        "dtype": info.dtype,
        "wire_dtype": info.wire_dtype,
        "throughput": float(info.throughput_tokens_per_s),
        "protocol": info.protocol_version,
        "dht": info.dht_address,
        "public_key": info.public_key,
        "device": info.device,
        "memory_total": info.memory_total_bytes,
        "memory_free": info.memory_free_bytes,
        "layer_step_s": float(info.layer_step_s),
        "seq": seq,
        "leaving": leaving,
    }


def info_of(record: object, model: ModelIdentity, protocol_version: int) -> NodeInfo:
    """The NodeInfo a record describes; RecordError says why it is not usable here."""
    if not isinstance(record, dict):
        raise RecordError("the record is not a map")
    for name in _STR_FIELDS:
        value = record.get(name)
        if not isinstance(value, str):
            raise RecordError(f"field {name!r} is missing or not a string")
        if len(value) > MAX_TEXT_CHARS:
            raise RecordError(f"field {name!r} is longer than {MAX_TEXT_CHARS} characters")
        if not value.isprintable():  # shown in terminals and logs: no escape sequences
            raise RecordError(f"field {name!r} holds control or other unprintable characters")
    for name in ("node_id", "address"):
        if not record[name]:
            raise RecordError(f"field {name!r} is empty")
    for name in _INT_FIELDS:
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RecordError(f"field {name!r} is missing or not a count")
    if record["v"] != RECORD_VERSION:
        raise RecordError(f"record version {record['v']}, this node reads {RECORD_VERSION}")
    public_key = record.get("public_key")
    if not isinstance(public_key, bytes) or len(public_key) > _MAX_PUBLIC_KEY_BYTES:
        raise RecordError(
            f"field 'public_key' is missing or not a key of at most {_MAX_PUBLIC_KEY_BYTES} bytes"
        )
    throughput = _finite(record, "throughput")
    _finite(record, "ttl")
    layer_step_s = _finite(record, "layer_step_s") if "layer_step_s" in record else 0.0
    record_seq(record)
    record_leaving(record)
    if record["protocol"] != protocol_version:
        raise RecordError(
            f"protocol version {record['protocol']}, this node speaks {protocol_version}"
        )
    if (record["served_name"], record["fingerprint"]) != (model.served_name, model.fingerprint):
        raise RecordError(
            f"model {record['served_name']!r} (fingerprint {record['fingerprint']}), this "
            f"swarm serves {model.served_name!r} (fingerprint {model.fingerprint})"
        )
    if not 0 <= record["start"] < record["end"] <= model.num_layers:
        raise RecordError(
            f"span [{record['start']}, {record['end']}) is not part of [0, {model.num_layers})"
        )
    return NodeInfo(
        node_id=record["node_id"],
        model=model,
        layers=LayerRange(record["start"], record["end"]),
        address=record["address"],
        num_kv_blocks=record["num_kv_blocks"],
        block_size=record["block_size"],
        dtype=record["dtype"],
        wire_dtype=record["wire_dtype"],
        protocol_version=record["protocol"],
        free_kv_blocks=record["free_kv_blocks"],
        throughput_tokens_per_s=throughput,
        dht_address=record["dht"],
        public_key=public_key,
        device=record["device"],
        memory_total_bytes=record["memory_total"],
        memory_free_bytes=record["memory_free"],
        layer_step_s=layer_step_s,
    )


def record_ttl(record: dict[str, Any]) -> float:
    """The lifetime a record checked by ``info_of`` was announced with."""
    return record["ttl"]


def record_seq(record: dict[str, Any]) -> int:
    """The announcement number of a record (0 when it does not say)."""
    value = record.get("seq", 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise RecordError("field 'seq' is not a count below 2**63")
    return value


def record_leaving(record: dict[str, Any]) -> bool:
    """Whether a record says its node is leaving (False when it does not say)."""
    value = record.get("leaving", False)
    if not isinstance(value, bool):
        raise RecordError("field 'leaving' is not true or false")
    return value


def _finite(record: dict[str, Any], name: str) -> float:
    value = record.get(name)
    if not isinstance(value, float) or not math.isfinite(value) or value < 0:
        raise RecordError(f"field {name!r} is missing or not a finite number >= 0")
    return value


def swarm_key(model: ModelIdentity) -> str:
    """The DHT key under which every node of one model announces (one subkey per node)."""
    return f"molink/{model.served_name}/{model.fingerprint}/nodes"

"""Forward messages with the activations as a trailer: the same message to any protobuf
parser, and activations read in place on receipt."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from molink.transport.codec import decode_tensor, encode_tensor, encode_tensor_header
from molink.transport.framing import join_forward, parse_forward, split_forward
from molink.transport.generated import molink_pb2 as pb

WIRES = ("float32", "float16", "bfloat16", "int8")


def _request() -> pb.ForwardRequest:
    request = pb.ForwardRequest(head_id="head", epoch=4, sender_id="s1")
    request.step.plan.step_id = 9
    request.step.plan.micro_batch = 2
    request.step.trace.add(node_id="head", compute_s=0.5)
    return request


def _framed(hidden: torch.Tensor, wire: str) -> bytes:
    request = _request()
    data = encode_tensor_header(hidden, wire, request.step.hidden)
    return join_forward(request, data)


@pytest.mark.parametrize("rows", [0, 1, 300])
@pytest.mark.parametrize("wire", WIRES)
def test_framed_message_is_the_ordinary_message(wire: str, rows: int) -> None:
    hidden = torch.randn(rows, 64)
    ordinary = _request()
    encode_tensor(hidden, wire, ordinary.step.hidden)
    raw = _framed(hidden, wire)
    # The trailer repeats the headers of ``step`` and ``hidden``: a few bytes.
    assert 0 < len(raw) - ordinary.ByteSize() <= 8
    assert pb.ForwardRequest.FromString(raw) == ordinary


@pytest.mark.parametrize("wire", WIRES)
def test_activations_are_read_in_place(wire: str) -> None:
    hidden = torch.randn(50, 64)
    raw = _framed(hidden, wire)
    request, data = parse_forward(raw)
    assert data is not None and data.obj is raw  # a view of the received bytes
    assert request.step.hidden.data == b"" and request.step.plan.step_id == 9
    assert len(request.step.trace) == 1
    got = decode_tensor(request.step.hidden, (50, 64), len(raw), data=data)
    ordinary = pb.ForwardRequest.FromString(raw).step.hidden
    assert torch.equal(got, decode_tensor(ordinary, (50, 64), len(raw)))


def test_ordinary_messages_are_parsed_as_they_are() -> None:
    ordinary = _request()
    encode_tensor(torch.randn(3, 8), "float16", ordinary.step.hidden)
    ordinary.step.trace.add(node_id="s0")  # hidden is not the last field
    raw = ordinary.SerializeToString()
    request, data = parse_forward(raw)
    assert data is None and request == ordinary
    release = pb.ForwardRequest(head_id="head", epoch=1)
    release.release.seq_ids.extend([1, 2])
    assert parse_forward(release.SerializeToString()) == (release, None)


def test_a_trailer_that_alone_makes_a_step_is_read_whole() -> None:
    """Protobuf's last-field-wins for a oneof: a release followed by a step is a step."""
    release = pb.ForwardRequest(head_id="head", epoch=1)
    release.release.seq_ids.append(3)
    data = memoryview(bytes(range(16)))
    raw = join_forward(release, data)
    request, view = parse_forward(raw)
    assert view is None and request.WhichOneof("payload") == "step"
    assert request.step.hidden.data == bytes(range(16))


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_truncated_messages_are_decode_errors(cut: int) -> None:
    raw = _framed(torch.randn(20, 16), "float16")
    assert split_forward(raw[:-cut])[1] is None
    with pytest.raises(DecodeError):
        parse_forward(raw[:-cut])


def test_garbage_is_left_to_the_ordinary_parser() -> None:
    for raw in (b"\xff" * 12, b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b""):
        assert split_forward(raw) == (raw, None)


def test_a_message_of_many_small_fields_is_not_walked_field_by_field(monkeypatch) -> None:
    """Finding the trailer walks the top-level fields in Python: a peer's message of
    millions of two-byte fields (250 times slower to walk than protobuf parses it) would
    hold a server thread and the interpreter lock for about a minute per 256 MiB. The walk
    stops after a few dozen fields and leaves such a message to the ordinary parser."""
    from molink.transport import framing

    calls = 0
    read_field = framing._read_field

    def counting(*args):
        nonlocal calls
        calls += 1
        return read_field(*args)

    monkeypatch.setattr(framing, "_read_field", counting)
    padding = pb.ForwardRequest(epoch=1).SerializeToString() * 100_000
    request = _request()
    data = encode_tensor_header(torch.randn(2, 8), "float32", request.step.hidden)
    raw = padding + join_forward(request, data)
    parsed, view = parse_forward(raw)
    assert calls <= 100
    assert view is None and parsed == pb.ForwardRequest.FromString(raw)
    assert parsed.step.plan.step_id == 9 and len(parsed.step.hidden.data) == 2 * 8 * 4

"""Tensor codec: round trips per wire dtype and every receipt check."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from molink.errors import ProtocolError
from molink.transport.codec import decode_tensor, encode_tensor
from molink.transport.generated import molink_pb2 as pb

HIDDEN = 16
LIMIT = 1 << 20


def _sample(rows: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, HIDDEN, generator=gen) * torch.arange(1, rows + 1)[:, None]
    x[1] = 0.0  # an all-zero row must survive int8
    return x


def _round_trip(x: torch.Tensor, wire: str) -> torch.Tensor:
    msg = pb.Tensor.FromString(encode_tensor(x, wire).SerializeToString())
    return decode_tensor(msg, tuple(x.shape), LIMIT)


def test_float32_is_exact() -> None:
    x = _sample()
    assert torch.equal(_round_trip(x, "float32"), x)


@pytest.mark.parametrize("wire,dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_dtypes_equal_a_plain_cast(wire: str, dtype: torch.dtype) -> None:
    x = _sample()
    y = _round_trip(x, wire)
    assert y.dtype == dtype
    assert torch.equal(y, x.to(dtype))


def test_int8_error_is_within_half_a_step_per_row() -> None:
    x = _sample()
    y = _round_trip(x, "int8")
    assert y.dtype == torch.float32
    bound = x.abs().amax(dim=1, keepdim=True) / 254 + 1e-6
    assert bool(((y - x).abs() <= bound).all())
    assert torch.equal(y[1], torch.zeros(HIDDEN))


def test_int8_is_a_quarter_of_float32_plus_scales() -> None:
    msg = encode_tensor(_sample(), "int8")
    assert len(msg.data) == 5 * HIDDEN
    assert len(msg.scale) == 5 * 4


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_empty_batches_round_trip(wire: str) -> None:
    y = _round_trip(torch.empty(0, HIDDEN), wire)
    assert tuple(y.shape) == (0, HIDDEN)


def test_unknown_wire_dtype_name_is_refused() -> None:
    with pytest.raises(ProtocolError, match="float8"):
        encode_tensor(_sample(), "float8")


def _message(**overrides: object) -> pb.Tensor:
    msg = encode_tensor(_sample(), "float16")
    for name, value in overrides.items():
        if name == "shape":
            del msg.shape[:]
            msg.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"dtype": 99}, "wire dtype 99"),
        ({"dtype": pb.WIRE_DTYPE_UNSPECIFIED}, "wire dtype 0"),
        ({"shape": [5, HIDDEN + 1]}, r"shape \[5, 17\], expected \[5, 16\]"),
        ({"shape": [5]}, r"shape \[5\], expected"),
        ({"data": b"\x00" * 10}, "carries 10 bytes"),
        ({"scale": b"\x00" * 4}, "carries scales but is not int8"),
    ],
)
def test_malformed_tensors_are_refused(overrides: dict, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        decode_tensor(_message(**overrides), (5, HIDDEN), LIMIT)


def test_a_shape_of_a_million_dimensions_is_refused_by_its_count() -> None:
    """The shape's length is checked first and a long one is not printed: the refusal had
    every dimension in it (3 MB of text to log and send back for a 2 MB message; on a
    256 MiB message, hundreds of MB and tens of seconds of the receiving thread)."""
    msg = _message(shape=[1] * 1_000_000)
    with pytest.raises(ProtocolError) as info:
        decode_tensor(msg, (5, HIDDEN), LIMIT)
    assert "1000000 dimensions, expected [5, 16]" in str(info.value)
    assert len(str(info.value)) < 200


def test_oversized_tensor_is_refused_before_reading_it() -> None:
    big = pb.Tensor(dtype=pb.WIRE_DTYPE_FLOAT32, shape=[1 << 20, HIDDEN], data=b"")
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_tensor(big, (1 << 20, HIDDEN), LIMIT)


def test_int8_scales_are_checked() -> None:
    msg = encode_tensor(_sample(), "int8")
    short = pb.Tensor(dtype=msg.dtype, shape=msg.shape, data=msg.data, scale=msg.scale[:-4])
    with pytest.raises(ProtocolError, match="int8 scales"):
        decode_tensor(short, (5, HIDDEN), LIMIT)
    nan = torch.full((5,), float("nan")).numpy().tobytes()
    bad = pb.Tensor(dtype=msg.dtype, shape=msg.shape, data=msg.data, scale=nan)
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_tensor(bad, (5, HIDDEN), LIMIT)


def test_no_code_path_deserializes_objects_from_peers() -> None:
    root = pathlib.Path(__file__).resolve().parents[2] / "molink"
    forbidden = re.compile(r"\bpickle\b|cloudpickle|torch\.load|\beval\(|\bexec\(|marshal")
    for folder in ("transport", "pipeline"):
        for path in (root / folder).glob("*.py"):
            assert not forbidden.search(path.read_text()), path

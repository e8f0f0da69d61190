"""Tensors on the wire: raw little-endian bytes with an explicit dtype and shape.

Nothing a peer sends is ever unpickled or evaluated: a tensor is rebuilt with
``torch.frombuffer`` over the received bytes, after its dtype, shape and size have been
checked against what the step plan says it must be.

Wire dtypes:

* ``float32``, ``float16``, ``bfloat16``: the activations cast to that dtype.
* ``int8``: symmetric per-row (per-token) absmax quantization, with each row's few
  largest elements sent apart and exact (see molink.transport.int8). Every element is
  exact or off by at most ``max(|rest of its row|) / 254``; it about halves the bytes of
  float16.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from molink.errors import ProtocolError
from molink.transport import int8
from molink.transport.generated import molink_pb2 as pb

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as memory
    raise ImportError("molink's wire codec supports little-endian hosts only")

# torch warns that a tensor over immutable bytes is not writable; the decoded tensor is
# handed over as input and never written through, so the warning is noise.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

INT8_LEVELS = int8.LEVELS
quantize_int8 = int8.quantize
dequantize_int8 = int8.dequantize

_NAME_TO_WIRE = {
    "float32": pb.WIRE_DTYPE_FLOAT32,
    "float16": pb.WIRE_DTYPE_FLOAT16,
    "bfloat16": pb.WIRE_DTYPE_BFLOAT16,
    "int8": pb.WIRE_DTYPE_INT8,
}
_WIRE_TO_TORCH = {
    pb.WIRE_DTYPE_FLOAT32: torch.float32,
    pb.WIRE_DTYPE_FLOAT16: torch.float16,
    pb.WIRE_DTYPE_BFLOAT16: torch.bfloat16,
    pb.WIRE_DTYPE_INT8: torch.int8,
}
_WIRE_TO_NAME = {wire: name for name, wire in _NAME_TO_WIRE.items()}
_SHOWN_DIMS = 8  # a refused shape with more dimensions is named by their count


def wire_dtype_of(name: str) -> int:
    """The proto enum value of a wire dtype name (``float16``, ``int8``, ...)."""
    try:
        return _NAME_TO_WIRE[name]
    except KeyError:
        raise ProtocolError(
            f"wire dtype {name!r} is not one of {', '.join(_NAME_TO_WIRE)}"
        ) from None


def wire_row_bytes(columns: int, wire_dtype: str) -> int:
    """Bytes one row (one token's activations) of ``columns`` values takes on the wire."""
    if wire_dtype_of(wire_dtype) == pb.WIRE_DTYPE_INT8:
        return int8.row_bytes(columns)
    return columns * torch.empty((), dtype=_WIRE_TO_TORCH[wire_dtype_of(wire_dtype)]).element_size()


def encode_tensor(tensor: torch.Tensor, wire_dtype: str, out: pb.Tensor | None = None) -> pb.Tensor:
    """Cast (or quantize) on the tensor's device, then copy its bytes into a message.

    Pass ``out`` (e.g. ``request.step.hidden``) to fill a field of a larger message in
    place: assigning a finished submessage would copy the payload once more.
    """
    out = out if out is not None else pb.Tensor()
    out.data = bytes(encode_tensor_header(tensor, wire_dtype, out))
    return out


def encode_tensor_header(tensor: torch.Tensor, wire_dtype: str, out: pb.Tensor) -> memoryview:
    """Fill ``out``'s dtype, shape (and int8 scales) and return the data bytes as a view
    of the cast tensor, not copied: molink.transport.framing sends them as they are."""
    wire = wire_dtype_of(wire_dtype)
    out.dtype = wire
    out.shape[:] = list(tensor.shape)
    tensor = tensor.detach()
    if wire == pb.WIRE_DTYPE_INT8:
        return _byte_view(int8.encode(_as_rows(tensor), out))
    out.scale = out.outlier_columns = out.outlier_values = b""
    out.outliers_per_row = 0
    return _byte_view(tensor.to(_WIRE_TO_TORCH[wire]))


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order; copies only what is not on the CPU or not
    contiguous. The view keeps its array alive."""
    cpu = tensor.to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:  # numpy has no bfloat16; same bits as int16
        cpu = cpu.view(torch.int16)
    if cpu.numel() == 0:  # memoryview cannot cast an empty shape
        return memoryview(b"")
    return memoryview(cpu.numpy()).cast("B")


def decode_tensor(
    msg: pb.Tensor,
    expected_shape: tuple[int, ...],
    max_bytes: int,
    what: str = "tensor",
    data: memoryview | None = None,
) -> torch.Tensor:
    """Rebuild a tensor after checking dtype, shape, size and byte length.

    ``data``, when given, holds the payload instead of ``msg.data`` (the activation bytes
    of a Forward message, viewed in place; see molink.transport.framing).
    Returns float32 for int8 payloads (dequantized), else the wire dtype. The result may
    share memory with the received bytes; it must not be written in place.
    Raises ProtocolError naming what is wrong.
    """
    if msg.dtype not in _WIRE_TO_TORCH:
        raise ProtocolError(
            f"{what} has wire dtype {msg.dtype}, expected one of "
            f"{', '.join(f'{v} ({n})' for v, n in _WIRE_TO_NAME.items())}"
        )
    dtype = _WIRE_TO_TORCH[msg.dtype]
    if len(msg.shape) != len(expected_shape) and len(msg.shape) > _SHOWN_DIMS:
        # Counted, not read: a peer may declare millions of dimensions in one message.
        raise ProtocolError(
            f"{what} has {len(msg.shape)} dimensions, expected {list(expected_shape)}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if shape != tuple(expected_shape):
        raise ProtocolError(f"{what} has shape {list(shape)}, expected {list(expected_shape)}")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    num_bytes = numel * itemsize
    if num_bytes > max_bytes:
        raise ProtocolError(f"{what} of {num_bytes} bytes exceeds the limit of {max_bytes} bytes")
    if data is None:
        data = memoryview(msg.data)  # each access of a bytes field copies it; read it once
    if data.nbytes != num_bytes:
        raise ProtocolError(
            f"{what} carries {data.nbytes} bytes, but shape {list(shape)} of "
            f"{_WIRE_TO_NAME[msg.dtype]} needs {num_bytes}"
        )
    values = _from_bytes(data, dtype, shape)
    if msg.dtype != pb.WIRE_DTYPE_INT8:
        if msg.scale or msg.outliers_per_row or msg.outlier_columns or msg.outlier_values:
            raise ProtocolError(f"{what} carries scales but is not int8")
        return values
    return int8.decode(msg, _as_rows(values), what).reshape(shape)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View as [rows, columns]; explicit sizes because reshape(0, -1) is ambiguous."""
    rows = tensor.shape[0] if tensor.dim() else 1
    cols = tensor.numel() // rows if rows else 0
    return tensor.reshape(rows, cols)


def _from_bytes(
    data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if not len(data):  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)

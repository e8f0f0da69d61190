"""Forward messages whose activation bytes are copied once on the way out and never on
the way in.

Built the ordinary way, a step's activations would be copied into a bytes object, into
the message, and into its serialization; parsed the ordinary way, into the message and
out of it again on every read of the field. For a prefill of tens of megabytes those
copies cost more than everything else the node does to a message.

Instead, the sender serializes the message with ``step.hidden.data`` left empty and
appends a *trailer*: one more occurrence of field ``step`` holding only
``hidden { data }``. Protobuf merges repeated occurrences of a message field (a scalar's
last occurrence wins), so any protobuf parser reads the whole as the ordinary message,
which is only a few bytes shorter (the repeated headers of ``step`` and ``hidden``). The
receiver recognizes the trailer, parses only what precedes it, and views the activation
bytes in place (``memoryview``), from which the codec builds the tensor without a copy.
"""

from __future__ import annotations

from molink.transport.generated import molink_pb2 as pb

_LEN = 2  # wire type of length-delimited fields
_STEP_FIELD = pb.ForwardRequest.DESCRIPTOR.fields_by_name["step"].number
_HIDDEN_FIELD = pb.StepPayload.DESCRIPTOR.fields_by_name["hidden"].number
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_FIXED_SIZES = {1: 8, 5: 4}  # wire types 1 (64-bit) and 5 (32-bit)
_MAX_VARINT_BYTES = 10
# A Forward message has a handful of top-level fields (head, epoch, sender, payload, route,
# trailer). Walking them is Python code, so one of millions of tiny fields would hold a
# server thread for a minute: past this many, the ordinary parser reads the message.
_MAX_TOP_LEVEL_FIELDS = 64


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_prefix(field: int, length: int) -> bytes:
    return _varint((field << 3) | _LEN) + _varint(length)


def data_trailer_header(num_bytes: int) -> bytes:
    """What precedes ``num_bytes`` of activation data in a Forward message's trailer."""
    data = _length_prefix(_DATA_FIELD, num_bytes)
    hidden = _length_prefix(_HIDDEN_FIELD, len(data) + num_bytes)
    step_length = len(hidden) + len(data) + num_bytes
    return _length_prefix(_STEP_FIELD, step_length) + hidden + data


def join_forward(request: pb.ForwardRequest, data: memoryview) -> bytes:
    """``request`` (its ``step.hidden.data`` empty) serialized with ``data`` as trailer:
    the data is copied once, into the returned bytes."""
    return b"".join((request.SerializeToString(), data_trailer_header(data.nbytes), data))


def parse_forward(raw: bytes) -> tuple[pb.ForwardRequest, memoryview | None]:
    """A Forward message and, when it came with a trailer, its activation bytes in place
    (``step.hidden.data`` of the returned message is then empty). Raises DecodeError."""
    prefix, data = split_forward(raw)
    if data is None:
        return pb.ForwardRequest.FromString(raw), None
    request = pb.ForwardRequest.FromString(prefix)
    if request.WhichOneof("payload") != "step":
        # Only the trailer made this a step (a oneof's last field wins): read it whole.
        return pb.ForwardRequest.FromString(raw), None
    return request, data


def split_forward(raw: bytes) -> tuple[bytes, memoryview | None]:
    """``(message without the trailer, the trailer's data viewed in place)``, or
    ``(raw, None)`` when ``raw`` has no trailer (then parse it as it is). Any malformation
    also gives ``(raw, None)``: the ordinary parser then reports it."""
    view = memoryview(raw)
    last = _last_top_level_field(view)
    if last is None:
        return raw, None
    start, field, wire_type, body_start, body_end = last
    if field != _STEP_FIELD or wire_type != _LEN:
        return raw, None
    hidden = _single_len_field(view, body_start, body_end, _HIDDEN_FIELD)
    if hidden is None:
        return raw, None
    data = _single_len_field(view, hidden[0], hidden[1], _DATA_FIELD)
    if data is None:
        return raw, None
    return bytes(view[:start]), view[data[0] : data[1]]


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    value = shift = 0
    for offset in range(_MAX_VARINT_BYTES):
        if pos + offset >= end:
            return None
        byte = view[pos + offset]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + offset + 1
        shift += 7
    return None


def _read_field(view: memoryview, pos: int, end: int) -> tuple[int, int, int, int] | None:
    """``(field, wire type, body start, body end)`` of the field at ``pos``."""
    tag = _read_varint(view, pos, end)
    if tag is None:
        return None
    key, pos = tag
    field, wire_type = key >> 3, key & 7
    if wire_type == _LEN:
        length = _read_varint(view, pos, end)
        if length is None:
            return None
        size, pos = length
    elif wire_type == 0:
        varint = _read_varint(view, pos, end)
        if varint is None:
            return None
        return field, wire_type, pos, varint[1]
    elif wire_type in _FIXED_SIZES:
        size = _FIXED_SIZES[wire_type]
    else:
        return None
    if pos + size > end:
        return None
    return field, wire_type, pos, pos + size


def _last_top_level_field(view: memoryview) -> tuple[int, int, int, int, int] | None:
    pos, end, last = 0, len(view), None
    for _ in range(_MAX_TOP_LEVEL_FIELDS):
        if pos >= end:
            return last
        parsed = _read_field(view, pos, end)
        if parsed is None:
            return None
        last = (pos, *parsed)
        pos = parsed[3]
    return last if pos >= end else None


def _single_len_field(view: memoryview, start: int, end: int, field: int) -> tuple[int, int] | None:
    """The body of ``field`` when it is the only thing in ``[start, end)``."""
    parsed = _read_field(view, start, end)
    if parsed is None or parsed[0] != field or parsed[1] != _LEN or parsed[3] != end:
        return None
    return parsed[2], parsed[3]

"""LocalExecutor's wire-codec hand-over: exact for float32, close for the compressed dtypes;
and the int8 format's outliers, which that closeness rests on.

bench/wire_fidelity.py measures the same on the default model at length; this is the
fast check on a tiny one.
"""

from __future__ import annotations

import pytest
import torch

from molink.engine.local_executor import LocalExecutor
from molink.engine.offline import LLM
from molink.errors import ProtocolError
from molink.sampling_params import SamplingParams
from molink.transport import int8
from molink.transport.codec import decode_tensor, encode_tensor, wire_row_bytes
from molink.transport.generated import molink_pb2 as pb

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (5, 23, 40)]


def _run(path: str, wire: str | None) -> list[tuple[list[int], list[float]]]:
    llm = LLM(
        model=path,
        dtype="float32",
        layer_splits=[1],
        wire_dtype=wire,
        block_size=16,
        num_kv_blocks=64,
    )
    outputs = llm.generate(_prompts(llm.engine.tokenizer.vocab_size), GREEDY)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


def test_float32_wire_changes_nothing_and_int8_little(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    plain = _run(path, None)
    assert _run(path, "float32") == plain
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(
        _run(path, "int8"), plain, strict=True
    ):
        # The first token comes from the prefill alone: same token, nearly the same logprob.
        assert tokens[0] == ref_tokens[0]
        assert abs(logprobs[0] - ref_logprobs[0]) < 0.05


@pytest.mark.parametrize(
    ("wire", "tolerance"), [("float32", 0.0), ("bfloat16", 2**-8), ("float16", 2**-11)]
)
def test_handoff_casts_as_the_wire_does(wire: str, tolerance: float) -> None:
    executor = LocalExecutor([_Stage(first=True, last=False), _Stage(first=False, last=True)], wire)
    hidden = torch.randn(7, 32)
    received = executor.handoff(hidden)
    assert received.dtype == torch.float32 and received.shape == hidden.shape
    assert torch.allclose(received, hidden, rtol=tolerance, atol=0.0)


def test_handoff_int8_error_is_bounded_per_row() -> None:
    executor = LocalExecutor([_Stage(True, False), _Stage(False, True)], "int8")
    hidden = torch.randn(7, 32) * torch.arange(1, 8)[:, None]  # rows of different scales
    error = (executor.handoff(hidden) - hidden).abs().amax(dim=1)
    bound = hidden.abs().amax(dim=1) / 254 * (1 + 1e-5)
    assert bool((error <= bound).all())


def test_unknown_wire_dtype_is_refused() -> None:
    with pytest.raises(ProtocolError, match="int4"):
        LocalExecutor([_Stage(True, False), _Stage(False, True)], "int4")


class _Stage:
    def __init__(self, first: bool, last: bool) -> None:
        self.is_first, self.is_last = first, last


def _int8_message(hidden: torch.Tensor) -> pb.Tensor:
    return pb.Tensor.FromString(encode_tensor(hidden, "int8").SerializeToString())


def test_int8_sends_each_rows_outliers_exactly() -> None:
    hidden = torch.randn(6, 64)
    hidden[0, 5] = 24890.0  # an attention-sink token's massive activation
    hidden[3, 60] = -900.0
    msg = _int8_message(hidden)
    assert msg.outliers_per_row == int8.OUTLIERS_PER_ROW
    assert len(msg.data) + len(msg.scale) + len(msg.outlier_columns) + len(msg.outlier_values) == (
        6 * wire_row_bytes(64, "int8")
    )
    decoded = decode_tensor(msg, (6, 64), 1 << 20)
    assert decoded[0, 5] == 24890.0 and decoded[3, 60] == -900.0
    # The rest of the row keeps its resolution: the outliers do not set its scale.
    rest = hidden.clone()
    rest[0, 5] = rest[3, 60] = 0.0
    bound = rest.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)
    assert bool(((decoded - hidden).abs() <= bound).all())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("outlier_columns", (70).to_bytes(2, "little") * 8, "beyond its 64 columns"),
        ("outlier_columns", b"\x00" * 6, "bytes of int8 outlier columns"),
        ("outlier_values", b"\x00\x00\xc0\x7f" * 8, "non-finite int8 outlier values"),
        ("outliers_per_row", 65, "65 int8 outliers per row of 64 columns"),
    ],
)
def test_int8_outliers_are_checked(field: str, value: object, message: str) -> None:
    msg = _int8_message(torch.randn(2, 64))
    setattr(msg, field, value)
    with pytest.raises(ProtocolError, match=message):
        decode_tensor(msg, (2, 64), 1 << 20)


def test_outliers_on_a_float_tensor_are_refused() -> None:
    msg = encode_tensor(torch.randn(2, 8), "float16")
    msg.outliers_per_row = 1
    with pytest.raises(ProtocolError, match="not int8"):
        decode_tensor(msg, (2, 8), 1 << 20)

"""GGUF block types kept quantized: decoding, packing and products against gguf's dequantizers.

Blocks are built by the test with valid scales: gguf's own quantizer where it has one
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else random integers under realistic float16 scales.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from molink.errors import InvalidParameterError, WeightLoadError
from molink.models.parallel.shard import Segment
from molink.quant import bf16_gemm, kernels
from molink.quant.bf16_gemm import Bf16Packed, bf16_gemm_available
from molink.quant.factory import QuantLinearFactory
from molink.quant.fp16_gemm import fp16_gemm_available
from molink.quant.gguf_blocks import BLOCK_TYPES, decode_blocks
from molink.quant.int4 import (
    pack_plane,
    padded_plane_parts,
    padded_rows,
    rounding_report,
    to_int4_planes,
)
from molink.quant.kernels import (
    BATCH_KERNEL_CHOICES,
    INT4_FEW_ROWS,
    INT4_FEW_ROWS_BF16,
    INT4_MAX_ROWS,
    choose_kernel,
    int4_max_rows,
)
from molink.quant.linear import QuantLinear, dequant_matmul

gguf = pytest.importorskip("gguf")
ROWS, COLS = 200, 512  # 200: not a multiple of the kernel's row blocks
BATCHES = (1, 2, 3, 5, 8, 13, 21, 34, 64, 150)  # ragged, both sides of INT4_MAX_ROWS


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def make_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid [rows, bytes per row] blocks of ``type_name``."""
    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        weights = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(weights, qtype)
    block_bytes, block_weights, _ = BLOCK_TYPES[type_name]
    blocks = rng.integers(0, 256, (rows * cols // block_weights, block_bytes), dtype=np.uint8)
    count = len(blocks)
    if type_name in ("Q4_K", "Q5_K"):
        blocks[:, 0:2] = _f16_bytes(rng.uniform(2e-4, 2e-3, count))  # d
        blocks[:, 2:4] = _f16_bytes(rng.uniform(1e-4, 1e-3, count))  # dmin
    else:  # Q6_K: int8 sub-block scales as llama.cpp writes them (mostly positive)
        blocks[:, 192:208] = rng.integers(-20, 128, (count, 16)).astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = _f16_bytes(rng.uniform(1e-5, 1e-4, count))
    return blocks.reshape(rows, -1)


def reference(blocks: np.ndarray, type_name: str, rows: int, cols: int) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(rows, cols).copy())


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_decoding_matches_gguf(type_name: str) -> None:
    blocks = make_blocks(type_name, ROWS, COLS)
    ints = decode_blocks(blocks, type_name, ROWS, COLS)
    expected = reference(blocks, type_name, ROWS, COLS)
    got = ints.dequantize()
    if type_name != "Q6_K":
        assert torch.equal(got, expected)  # exact: integers and float16 scales as stored
        return
    # Q6_K: a pair of 16-weight sub-blocks shares the larger scale; the other half is
    # re-rounded to a quarter of that scale's step: at most 1/8 of a step off, or 1/4
    # where an opposite-signed half of equal magnitude hits the int8 limit (rare).
    step = ints.scale.abs().repeat_interleave(32, dim=1) * 4
    in_steps = (got - expected).abs() / step
    assert in_steps.max() <= 0.25 + 1e-6
    assert (in_steps > 0.125 + 1e-6).float().mean() < 1e-3


BATCH_KERNELS = (
    ["int4", "int8act"]
    + (["fp16"] if fp16_gemm_available() else [])
    + (["bf16"] if bf16_gemm_available() else [])
)


@pytest.mark.parametrize("batch_kernel", BATCH_KERNELS)
@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_products_match_dequantized_float32(type_name: str, batch_kernel: str) -> None:
    blocks = make_blocks(type_name, ROWS, COLS, seed=1)
    expected_w = reference(blocks, type_name, ROWS, COLS).double()
    layer = QuantLinear(COLS, ROWS, bias=False, batch_kernel=batch_kernel)
    layer.load_weight(decode_blocks(blocks, type_name, ROWS, COLS), pack=False)
    gen = torch.Generator().manual_seed(2)
    for batch in BATCHES:
        x = torch.randn(batch, COLS, generator=gen)
        out = layer(x)
        assert out.shape == (batch, ROWS) and out.dtype == torch.float32
        got = out.double()
        expected = x.double() @ expected_w.t()
        # bfloat16 scales and (int4 kernel) bfloat16 activations and outputs: about
        # 2**-8 relative per term; float16 weights 2**-11; int8 activations per block of
        # 32 (int8act) about 2**-8; bfloat16 weights (bf16) 2**-9 relative each; Q6_K adds
        # its sub-block merge.
        tolerance = 2e-2 if type_name == "Q6_K" else 1e-2
        err = (got - expected).norm() / expected.norm()
        assert err < tolerance, (type_name, batch, float(err))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K"])
def test_embedding_rows_match(type_name: str) -> None:
    blocks = make_blocks(type_name, ROWS, COLS, seed=3)
    ints = decode_blocks(blocks, type_name, ROWS, COLS)
    layer = QuantLinear(COLS, ROWS, bias=False)
    layer.load_weight(ints, pack=False)
    ids = torch.tensor([0, 5, 31, 32, 63, 64, 199, 5])
    rows = layer.embedding(ids)
    expected = reference(blocks, type_name, ROWS, COLS)[ids]
    assert (rows - expected).abs().max() <= ints.scale.abs().max() * 128 * 2**-8


def test_lossless_types_round_only_their_scales() -> None:
    """Q4_0: scales are the only rounding (float16 -> bfloat16, under 2**-8 relative)."""
    blocks = make_blocks("Q4_0", ROWS, COLS, seed=4)
    ints = decode_blocks(blocks, "Q4_0", ROWS, COLS)
    report = rounding_report(ints, to_int4_planes(ints))
    assert report["max_in_steps"] <= 8 * 2**-8  # |q - 8| <= 8 steps, each off by 2**-8


def test_wider_integers_take_two_planes_and_pad_rows() -> None:
    ints = decode_blocks(make_blocks("Q8_0", 70, 64), "Q8_0", 70, 64)
    planes = to_int4_planes(ints)
    assert len(planes.packed) == 2
    assert planes.scale_zero.shape == (2, 2, padded_rows(70), 2)


def test_two_planes_join_into_one_matrix() -> None:
    """A matrix's two planes become one packed [N, 2K] matrix (the planes are views into
    it): the same bytes, rows and saved state as planes packed apart."""
    ints = decode_blocks(make_blocks("Q8_0", ROWS, COLS, seed=10), "Q8_0", ROWS, COLS)
    layer = QuantLinear(COLS, ROWS, bias=False)
    layer.load_weight(ints, pack=False)
    apart = to_int4_planes(ints)
    assert layer.planes is not None and layer.planes.joined is not None
    assert apart.joined is None
    ints_parts = [q for q, _ in padded_plane_parts(ints, "int4 kernel")]
    assert torch.equal(layer.planes.joined[0], pack_plane(torch.cat(ints_parts, dim=1)))
    assert layer.weight_bytes == apart.nbytes
    saved, _ = layer.saved_state()
    assert set(saved) == {"joined", "scale_zero"}  # saved as the kernel reads it
    assert torch.equal(saved["joined"], layer.planes.joined[0])
    for mine, theirs in zip(layer.planes.plane_tensors(), apart.packed, strict=True):
        assert torch.equal(mine, theirs)
    ids = torch.tensor([0, 63, 64, 199])
    assert torch.equal(layer.embedding(ids), apart.gather_rows(ids))
    padded = padded_rows(ROWS)
    assert torch.equal(layer.planes.dequantize_rows(0, padded), apart.dequantize_rows(0, padded))
    restored = QuantLinear(COLS, ROWS, bias=False)
    restored.restore_state(*layer.saved_state())
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(11))
    assert restored.planes is not None and restored.planes.joined is not None
    # Restored as views of the saved (in the cache: mapped) bytes, not copied.
    assert restored.planes.joined[0].data_ptr() == saved["joined"].data_ptr()
    for mine, theirs in zip(restored.planes.plane_tensors(), apart.packed, strict=True):
        assert torch.equal(mine, theirs)
    assert torch.equal(restored.planes.dequantize_rows(0, padded), apart.dequantize_rows(0, padded))
    assert torch.equal(restored.embedding(ids), apart.gather_rows(ids))
    assert torch.equal(restored(x), layer(x))
    assert torch.equal(restored(x[:1]), layer(x[:1]))


def test_saved_planes_of_the_wrong_shape_are_refused() -> None:
    ints = decode_blocks(make_blocks("Q8_0", ROWS, COLS, seed=10), "Q8_0", ROWS, COLS)
    layer = QuantLinear(COLS, ROWS, bias=False)
    layer.load_weight(ints, pack=False)
    saved, info = layer.saved_state()
    cut = {**saved, "joined": saved["joined"][:, : COLS // 2]}
    with pytest.raises(WeightLoadError, match="joined int4 planes have shape"):
        QuantLinear(COLS, ROWS, bias=False).restore_state(cut, info)
    with pytest.raises(WeightLoadError, match="int4 scales have shape"):
        QuantLinear(COLS, ROWS + 64, bias=False).restore_state(saved, info)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])  # one plane, two planes
def test_lm_head_breaks_bfloat16_ties_in_float32(type_name: str) -> None:
    """Rows 0 and 1 differ in one small weight: their bfloat16 logits tie, and the LM head
    recomputes both in float32, so its argmax is the float32 product's; elsewhere (and in
    rows without a tie) its logits are the kernel's."""
    blocks = make_blocks(type_name, ROWS, COLS, seed=12)
    ints = decode_blocks(blocks, type_name, ROWS, COLS)
    q = ints.q.clone()
    q[1] = q[0]
    # Row 0 sets to 0 the integer of row 1 whose weight is the smallest non-zero one.
    step = ints.scale[0].abs().repeat_interleave(ints.group)
    size = torch.where(q[1] != 0, (q[1].abs() * step), torch.inf)
    q[0, int(size.argmin())] = 0
    scale, offset = ints.scale.clone(), ints.offset.clone()
    scale[1], offset[1] = scale[0], offset[0]
    near = replace(ints, q=q, scale=scale, offset=offset)
    head = QuantLinear(COLS, ROWS, bias=False, table=True)
    head.load_weight(near, pack=False)
    assert head.planes is not None
    w = head.planes.dequantize_rows(0, padded_rows(ROWS))[:ROWS].double()
    # Row 1 on top in float32, tied with row 0 (the lower id) in bfloat16.
    x = torch.stack([w[1].float() * 40, w[5].float() * 40])  # row 5 alone on top
    kernel = head.planes.matmul_float(x)
    assert kernel[0, 0] == kernel[0, 1] == kernel[0].max()  # tied in bfloat16
    assert int((kernel[1] == kernel[1].max()).sum()) == 1  # no tie in the second row
    got, exact = head(x), x.double() @ w.t()
    assert int(exact[0].argmax()) == 1 and int(got[0].argmax()) == 1
    assert torch.allclose(got[0, :2].double(), exact[0, :2], rtol=1e-6, atol=0)
    assert torch.equal(got[0, 2:], kernel[0, 2:]) and torch.equal(got[1], kernel[1])


def test_unsupported_type_and_bad_sizes_are_named() -> None:
    with pytest.raises(WeightLoadError, match="Q2_K"):
        decode_blocks(np.zeros(84, np.uint8), "Q2_K", 1, 256)
    with pytest.raises(WeightLoadError, match="expected"):
        decode_blocks(np.zeros(17, np.uint8), "Q4_0", 1, 32)


def test_kernel_choice_covers_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 1 <= INT4_MAX_ROWS < max(BATCHES)
    assert 1 <= INT4_FEW_ROWS < max(BATCHES)
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert [choose_kernel(r, "int4") for r in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1)] == [
        "int4",
        "int4",
        "dequant",
    ]
    # With bfloat16 dot products the int4 kernel leads at every size: prefill chunks too.
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    assert {choose_kernel(r, "int4", p) for r in (1, INT4_MAX_ROWS + 1, 4096) for p in (1, 2)} == {
        "int4"
    }
    fp16_few = ((False, "fp16", INT4_FEW_ROWS), (True, "fp16", INT4_FEW_ROWS_BF16))
    for native, kernel, few in (*fp16_few, (True, "bf16", INT4_FEW_ROWS_BF16)):
        monkeypatch.setattr(kernels, "native_bf16", lambda native=native: native)
        choices = [choose_kernel(r, kernel) for r in (1, few, few + 1, 4096)]
        assert choices == ["int4", "int4", kernel, kernel], (native, kernel)
    # Two planes (Q5, Q6_K, Q8_0) run the int4 kernel twice: the float16 copy wins.
    assert choose_kernel(1, "fp16", planes=2) == "fp16"
    assert choose_kernel(1, "bf16", planes=2) == "bf16"
    assert {choose_kernel(r, "int8act") for r in (1, INT4_MAX_ROWS + 1, 4096)} == {"nbits"}


def test_int4_rows_read_at_load_are_the_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    for native in (False, True):
        monkeypatch.setattr(kernels, "native_bf16", lambda native=native: native)
        for kernel in BATCH_KERNEL_CHOICES:
            for planes in (1, 2):
                most = int4_max_rows(kernel, planes)
                chosen = [choose_kernel(r, kernel, planes) == "int4" for r in range(1, 200)]
                assert chosen == [r <= most for r in range(1, 200)], (native, kernel, planes)


@pytest.mark.parametrize("native", [False, True])  # bfloat16 dot products or not
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])  # one plane, two planes
def test_products_are_the_chosen_kernels_bit_for_bit(
    type_name: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forward's shortcut to the int4 kernel gives exactly what the kernel choice runs:
    the planes' product of bfloat16 activations, the bias added in float32, the result in
    the activations' dtype; above INT4_MAX_ROWS the dequantizing path, where the CPU has
    no bfloat16 dot products."""
    monkeypatch.setattr(kernels, "native_bf16", lambda: native)
    ints = decode_blocks(make_blocks(type_name, ROWS, COLS, seed=8), type_name, ROWS, COLS)
    layer = QuantLinear(COLS, ROWS, bias=True)
    layer.load_weight(ints, pack=False)
    assert layer.planes is not None and layer.bias is not None
    layer.bias.copy_(torch.randn(ROWS, generator=torch.Generator().manual_seed(9)))
    for rows in (1, 2, 8, INT4_MAX_ROWS, INT4_MAX_ROWS + 1):
        x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(rows))
        if rows <= INT4_MAX_ROWS or native:
            product = layer.planes.matmul(x.to(torch.bfloat16)).float()
        else:
            product = dequant_matmul(layer.planes, x)
        expected = product + layer.bias
        assert torch.equal(layer(x), expected), rows
        assert torch.equal(layer.product(x), product), rows
        assert torch.equal(layer.add_to(x[:, :ROWS], x), x[:, :ROWS] + expected), rows
        assert torch.equal(
            layer(x.bfloat16()), (layer.product(x.bfloat16()) + layer.bias).bfloat16()
        )


def test_int8_activations_only_where_the_model_keeps_them() -> None:
    """Row matrices (attention output, MLP down) take int8 activations; those reading
    normalised hidden states (q/k/v, gate/up, the LM head) keep float activations."""
    factory = QuantLinearFactory(torch.float32, torch.device("cpu"), batch_kernel="int8act")
    float_kernel = "fp16" if fp16_gemm_available() else "int4"
    assert factory.row([Segment(COLS)], ROWS).batch_kernel == "int8act"
    assert factory.column(COLS, [Segment(ROWS)]).batch_kernel == float_kernel
    assert factory.table(ROWS, COLS).batch_kernel == float_kernel
    plain = QuantLinearFactory(torch.float32, torch.device("cpu"))
    assert plain.column(COLS, [Segment(ROWS)]).batch_kernel == "int4"


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_int8_activation_kernel_runs_the_planes_integers(type_name: str) -> None:
    """One plane (4 bits, float zero points added apart) or two joined into 8 bits."""
    ints = decode_blocks(make_blocks(type_name, ROWS, COLS, seed=6), type_name, ROWS, COLS)
    lean = QuantLinear(COLS, ROWS, bias=False)
    fast = QuantLinear(COLS, ROWS, bias=False, batch_kernel="int8act")
    lean.load_weight(ints, pack=False)
    fast.load_weight(ints, pack=False)
    assert fast.nbits is not None and lean.nbits is None
    assert (fast.nbits._zero is None) == (type_name != "Q4_1")
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(7))
    assert torch.equal(fast(x), fast.nbits.matmul(x))
    # Same matrix as the int4 kernel's: only the activations' rounding differs.
    assert (fast(x) - lean(x)).norm() / lean(x).norm() < 1e-2


@pytest.mark.skipif(not fp16_gemm_available(), reason="fbgemm is x86 only")
def test_float16_copy_is_counted_and_used_for_batches() -> None:
    ints = decode_blocks(make_blocks("Q4_1", ROWS, COLS, seed=5), "Q4_1", ROWS, COLS)
    lean = QuantLinear(COLS, ROWS, bias=False)
    wide = QuantLinear(COLS, ROWS, bias=False, batch_kernel="fp16")
    lean.load_weight(ints, pack=False)
    wide.load_weight(ints, pack=False)
    assert lean.wide is None and wide.wide is not None
    assert wide.weight_bytes == lean.weight_bytes + 2 * ROWS * COLS
    x = torch.randn(INT4_FEW_ROWS_BF16 + 1, COLS)
    assert torch.equal(wide(x), wide.wide.matmul(x))  # the float16 copy ran
    assert torch.equal(wide(x[:1]), lean(x[:1]))  # one row: the same int4 kernel


@pytest.mark.skipif(not bf16_gemm_available(), reason="oneDNN bfloat16 needs AVX-512 or AMX")
def test_bfloat16_copy_is_counted_and_used_for_batches() -> None:
    ints = decode_blocks(make_blocks("Q4_1", ROWS, COLS, seed=5), "Q4_1", ROWS, COLS)
    lean = QuantLinear(COLS, ROWS, bias=False)
    wide = QuantLinear(COLS, ROWS, bias=False, batch_kernel="bf16")
    lean.load_weight(ints, pack=False)
    wide.load_weight(ints, pack=False)
    assert isinstance(wide.wide, Bf16Packed)
    assert wide.weight_bytes == lean.weight_bytes + 2 * ROWS * COLS
    x = torch.randn(INT4_FEW_ROWS_BF16 + 1, COLS)
    assert torch.equal(wide(x), wide.wide.matmul(x))  # the bfloat16 copy ran
    assert torch.equal(wide(x[:1]), lean(x[:1]))  # one row: the same int4 kernel
    # The copy holds the planes' matrix rounded to bfloat16: the same product as the int4
    # kernel's up to bfloat16 rounding.
    assert (wide(x) - lean(x)).norm() / lean(x).norm() < 1e-2


def test_bfloat16_copy_refused_without_onednn_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16_gemm, "bf16_gemm_available", lambda: False)
    ints = decode_blocks(make_blocks("Q4_0", ROWS, COLS, seed=5), "Q4_0", ROWS, COLS)
    layer = QuantLinear(COLS, ROWS, bias=False, batch_kernel="bf16")
    with pytest.raises(InvalidParameterError, match="quantized_batch_kernel.*bf16"):
        layer.load_weight(ints, pack=False)


def test_unknown_batch_kernel_is_named() -> None:
    with pytest.raises(InvalidParameterError, match="quantized_batch_kernel"):
        QuantLinear(COLS, ROWS, bias=False, batch_kernel="int2")

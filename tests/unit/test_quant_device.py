"""Quantized matrices for CUDA, checked where the CPU can check them: the int4 byte planes
and row gathering, the fp8 row product (torch's ``_scaled_mm`` runs on CPU too), and
which device and method each load is sent to. The CUDA kernels themselves run in the
GPU check (bench/quant_gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from molink.errors import InvalidParameterError, WeightLoadError
from molink.quant.config import resolve_quantization
from molink.quant.cuda_int4 import (
    CudaInt4Planes,
    byte_planes,
    inner_k_tiles,
    nibble_bytes,
    unpack_nibble_bytes,
)
from molink.quant.factory import QuantLinearFactory
from molink.quant.fp8 import Fp8Rows, check_fp8_device, quantize_rows
from molink.quant.groups import quantize_float
from molink.quant.linear import QuantLinear
from molink.quant.memory import quant_factory


def test_nibble_bytes_round_trip_with_even_inputs_high() -> None:
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    packed = nibble_bytes(q)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])
    assert torch.equal(unpack_nibble_bytes(packed), q.to(torch.uint8))


@pytest.mark.parametrize(("cols", "tiles"), [(576, 4), (640, 8), (1536, 8), (96, 2)])
def test_inner_k_tiles_is_the_largest_that_divides(cols: int, tiles: int) -> None:
    assert inner_k_tiles(cols) == tiles


def test_inner_k_tiles_refuses_odd_widths() -> None:
    with pytest.raises(WeightLoadError, match="40 inputs"):
        inner_k_tiles(40)


@pytest.mark.parametrize("bits", [4, 8])
def test_gathered_rows_equal_the_dequantized_matrix(bits: int) -> None:
    w = torch.randn(100, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    ints = quantize_float(w, bits)
    raw, scale_zero = byte_planes(ints)
    assert len(raw) == (1 if bits == 4 else 2) and raw[0].shape == (128, 128)
    planes = CudaInt4Planes([], scale_zero, 100, 256, ints.group, raw)
    ids = torch.tensor([0, 7, 99, 7])
    got = planes.gather_rows(ids)
    expected = ints.dequantize()[ids]
    # bfloat16 scales and zero points: 2**-8 relative, up to 8 (or 128) steps away.
    step = ints.scale.abs().max()
    assert (got - expected).abs().max() <= step * (8 if bits == 4 else 136) * 2**-8


def test_rows_are_gathered_only_from_tables() -> None:
    ints = quantize_float(torch.randn(64, 64), 4)
    raw, scale_zero = byte_planes(ints)
    with pytest.raises(WeightLoadError, match="tables only"):
        CudaInt4Planes([], scale_zero, 64, 64, ints.group).gather_rows(torch.tensor([1]))


def test_fp8_rows_product_is_close_to_float() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=gen) * 0.02
    matrix = Fp8Rows(w)
    assert matrix.weight.dtype == torch.float8_e4m3fn and matrix.nbytes == 96 * 128 + 96 * 4
    for tokens in (1, 5, 16, 33):
        x = torch.randn(tokens, 128, generator=gen)
        got = matrix.matmul(x)
        expected = x @ w.t()
        assert got.shape == (tokens, 96)
        # e4m3 keeps 3 mantissa bits on both sides: a few percent, averaged over 128 terms.
        assert (got - expected).norm() / expected.norm() < 0.06
    rows = matrix.gather_rows(torch.tensor([3, 50]))
    assert ((rows - w[[3, 50]]).norm() / w[[3, 50]].norm()) < 0.06


def test_fp8_quantize_rows_uses_the_whole_range() -> None:
    values, scale = quantize_rows(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
    assert float(values[0].float().abs().max()) == 448.0
    assert float(scale[0]) == pytest.approx(2.0 / 448)
    assert torch.equal(values[1].float(), torch.zeros(2))  # an all-zero row stays zero


def test_fp8_needs_a_cuda_device() -> None:
    with pytest.raises(InvalidParameterError, match="CUDA GPU"):
        check_fp8_device(torch.device("cpu"))
    with pytest.raises(InvalidParameterError, match="multiples of 16"):
        Fp8Rows(torch.randn(10, 32))


def test_methods_go_to_their_device_kernels() -> None:
    cuda = torch.device("cuda")
    assert resolve_quantization("fp8", "none", cuda) == "fp8"
    factory = quant_factory("fp8", torch.bfloat16, cuda)
    assert isinstance(factory, QuantLinearFactory) and factory.fp8 and factory.device == cuda
    factory = quant_factory("int4", torch.bfloat16, cuda)
    assert isinstance(factory, QuantLinearFactory) and factory.bits == 4 and not factory.fp8
    table = factory.table(128, 64)
    assert isinstance(table, QuantLinear) and table.table and table.device == cuda
    with pytest.raises(InvalidParameterError, match="mps is not supported"):
        quant_factory("gguf", torch.float32, torch.device("mps"))


def test_checkpoints_stored_in_fp8_run_as_fp8_rows_on_a_gpu() -> None:
    """Read as float (molink.weights.fp8_store), then held as fp8 rows where the GPU
    multiplies fp8; dequantized on a CPU (tests/unit/test_quant_fp8_checkpoint.py)."""
    assert resolve_quantization(None, "fp8", "cuda") == "fp8"
    assert resolve_quantization(None, "fp8", "cpu") == "none"


class _HeldRows:
    """A ``DeviceMatrix`` stand-in that multiplies on the CPU: what a layer does with the
    matrix it holds on a device is checked here, the device's kernel in the GPU check."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.nbytes = weight.numel() * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.t()

    def gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight[index]


def test_a_matrix_held_on_a_device_multiplies_there() -> None:
    """A CUDA layer holds no int4 planes nor float matrix, only its device matrix: its
    products (and a row-parallel rank's partial sums) go to that matrix's kernel."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    layer = QuantLinear(64, 32, bias=True)
    layer.on_device = _HeldRows(weight)
    assert layer.bias is not None
    layer.bias.copy_(torch.arange(32.0))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(layer.product(x), x @ weight.t())
    assert torch.equal(layer(x), x @ weight.t() + torch.arange(32.0))
    assert torch.equal(layer.add_to(x[:, :32], x), x[:, :32] + layer(x))
    assert torch.equal(layer.embedding(torch.tensor([5, 1])), weight[[5, 1]])

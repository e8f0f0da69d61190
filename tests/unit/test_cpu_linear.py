"""oneDNN-packed copies of float matrices: which dtypes are packed, and that they multiply
as the plain matrix does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molink.errors import WeightLoadError
from molink.models import cpu_linear
from molink.models.blocks.linear import DenseLinear
from molink.quant.memory import resident_weight_bytes

IN, OUT = 96, 80


def _matrix() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.1


def _layer(dtype: torch.dtype, bias: bool) -> DenseLinear:
    layer = DenseLinear(IN, OUT, bias, dtype, torch.device("cpu"))
    layer.load_weight(_matrix(), pack=True)
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(OUT, generator=torch.Generator().manual_seed(1)))
    return layer


NATIVE_BF16_PACKING = pytest.mark.skipif(
    not (cpu_linear.native_bf16() and cpu_linear.bf16_packing_available()),
    reason="bfloat16 is packed only where the CPU multiplies it natively",
)


def test_float32_is_packed_and_used_for_decode_batches() -> None:
    layer = _layer(torch.float32, bias=True)
    assert layer.packed is not None
    x = torch.randn(cpu_linear.PACKED_MAX_ROWS, IN)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@NATIVE_BF16_PACKING
@pytest.mark.parametrize("rows", [1, 7, 33, 200])
def test_bfloat16_is_packed_and_used_at_every_row_count(rows: int) -> None:
    layer = _layer(torch.bfloat16, bias=False)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16
    x = torch.randn(rows, IN).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    expected = x.float() @ _matrix().to(torch.bfloat16).float().t()
    # Both round the float32 sums to bfloat16 once: about 2**-8 relative.
    assert float((got.float() - expected).norm() / expected.norm()) < 1e-2
    residual = torch.randn(rows, OUT).to(torch.bfloat16)
    added = layer.add_to(residual, x)
    assert float((added.float() - residual.float() - got.float()).abs().max()) < 0.1


def test_bfloat16_is_not_packed_without_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)
    assert not cpu_linear.prepack_supported(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert cpu_linear.prepack_supported(torch.zeros(4, 4)) == (torch.backends.mkldnn.is_available())
    assert not cpu_linear.prepack_supported(torch.zeros(4, 4, dtype=torch.float16))


@NATIVE_BF16_PACKING
def test_a_bfloat16_layer_keeps_only_its_packed_copy() -> None:
    layer = _layer(torch.bfloat16, bias=False)
    assert layer.weight.numel() == 0
    packed_bytes = layer.packed.numel() * layer.packed.element_size()
    assert resident_weight_bytes(layer) == packed_bytes


@NATIVE_BF16_PACKING
def test_the_plain_bfloat16_matrix_comes_back_exactly_when_needed() -> None:
    exact = _matrix().to(torch.bfloat16)
    layer = _layer(torch.bfloat16, bias=False)
    layer.prepack(False)
    assert layer.packed is None and torch.equal(layer.weight, exact)
    layer.prepack(True)
    assert layer.weight.numel() == 0 and layer.packed is not None
    layer.to(torch.float32)  # converts the plain matrix; the packed copy would be stale
    assert layer.packed is None and torch.equal(layer.weight, exact.float())
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), x @ exact.float().t())


@NATIVE_BF16_PACKING
def test_a_bfloat16_layer_loaded_again_without_packing_holds_its_plain_matrix() -> None:
    layer = _layer(torch.bfloat16, bias=False)
    layer.load_weight(_matrix() * 2, pack=False)
    assert layer.packed is None and torch.equal(layer.weight, (_matrix() * 2).to(torch.bfloat16))
    with pytest.raises(WeightLoadError, match=r"shape \(80, 95\), expected \(80, 96\)"):
        layer.load_weight(torch.zeros(OUT, IN - 1), pack=True)

"""oneDNN-packed copies of float matrices: which dtypes are packed, and that they multiply
as the plain matrix does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molink.models import cpu_linear
from molink.models.blocks.linear import DenseLinear

IN, OUT = 96, 80


def _layer(dtype: torch.dtype, bias: bool) -> DenseLinear:
    layer = DenseLinear(IN, OUT, bias, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    layer.load_weight(torch.randn(OUT, IN, generator=gen) * 0.1, pack=True)
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(OUT, generator=gen))
    return layer


def test_float32_is_packed_and_used_for_decode_batches() -> None:
    layer = _layer(torch.float32, bias=True)
    assert layer.packed is not None
    x = torch.randn(cpu_linear.PACKED_MAX_ROWS, IN)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not (cpu_linear.native_bf16() and cpu_linear.bf16_packing_available()),
    reason="bfloat16 is packed only where the CPU multiplies it natively",
)
@pytest.mark.parametrize("rows", [1, 7, 33, 200])
def test_bfloat16_is_packed_and_used_at_every_row_count(rows: int) -> None:
    layer = _layer(torch.bfloat16, bias=False)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16
    x = torch.randn(rows, IN).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    expected = x.float() @ layer.weight.float().t()
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

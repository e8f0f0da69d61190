"""A pre-norm layer's direct forward (molink/models/blocks/direct_decode.py) gives exactly
what its modules give, covers the steps it claims and hands the others back."""

from __future__ import annotations

import pytest
import torch

from molink.config import LayerRange
from molink.models import SeqChunk
from molink.models.blocks.direct_decode import DirectPreNorm
from molink.quant.linear import QuantLinear
from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner, Seq

BLOCK = 4


def _linear(bias: bool = False, table: bool = False, kernel: str = "int4") -> QuantLinear:
    layer = QuantLinear(64, 96, bias, bits=4, batch_kernel=kernel, table=table)
    layer.load_weight(torch.randn(96, 64, generator=torch.Generator().manual_seed(0)), False)
    return layer


@pytest.mark.parametrize("rows", [1, 5])
def test_plain_product_is_forward_bit_for_bit(rows: int) -> None:
    layer = _linear()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    product = layer.plain_product(rows)
    assert product is not None
    assert torch.equal(product(x), layer.forward(x))


def test_plain_product_refuses_what_forward_does_more_for() -> None:
    assert _linear(bias=True).plain_product(1) is None  # the bias
    assert _linear(table=True).plain_product(1) is None  # an LM head breaks ties
    assert QuantLinear(64, 96, False, bits=4).plain_product(1) is None  # nothing loaded
    layer = _linear()
    assert layer.plain_product(layer._int4_rows + 1) is None  # past the int4 kernel's rows


@pytest.fixture(scope="module")
def source():
    return resolve_model_source(None, quantization="gguf")


def _forward(runner: PagedRunner, work: list[tuple[Seq, int]]) -> torch.Tensor:
    chunks, token_ids = [], []
    for seq, num_new in work:
        start = seq.num_computed
        chunks.append(SeqChunk(start, num_new, seq.block_ids))
        token_ids.extend(seq.tokens[start : start + num_new])
        seq.num_computed += num_new
    return runner.forward(chunks, token_ids)


def _steps(runner: PagedRunner) -> list[torch.Tensor]:
    """Two prompts prefilled together, decodes of both (teacher-forced), then of one."""
    first = Seq(list(range(300, 316)), [0, 1, 2, 3])
    second = Seq(list(range(500, 510)), [4, 5, 6])
    outputs = [_forward(runner, [(first, 11), (second, 7)])]
    for _ in range(3):
        outputs.append(_forward(runner, [(first, 1), (second, 1)]))
    for _ in range(2):
        outputs.append(_forward(runner, [(first, 1)]))
    return outputs


def test_direct_forward_equals_the_modules(source, monkeypatch) -> None:
    model = source.load_slice(LayerRange(0, 3), "float32")
    directs = [layer.direct for layer in model.layers]
    assert all(d is not None for d in directs)
    ran = []
    forward = DirectPreNorm.forward

    def counted(self, *args):
        out = forward(self, *args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(DirectPreNorm, "forward", counted)
    direct = _steps(PagedRunner([model], 16, BLOCK))
    assert ran and all(ran)  # every step of every layer went the direct way
    for layer in model.layers:
        layer.direct = None
    modules = _steps(PagedRunner([model], 16, BLOCK))
    assert len(ran) == 6 * len(directs)  # the modules' run did not go through it
    for got, expected in zip(direct, modules, strict=True):
        assert torch.equal(got, expected)


def test_float_layers_keep_the_modules() -> None:
    model = resolve_model_source(None).load_slice(LayerRange(0, 2), "float32")
    assert all(layer.direct is None for layer in model.layers)

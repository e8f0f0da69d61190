"""Quantized linear layers for CPU: int4 planes, with the kernel chosen per batch size
(molink.quant.kernels holds the measured candidates and the choice).

Large batches without a float16 copy dequantize a band of rows at a time into a small
float32 buffer and multiply with MKL, keeping nothing but the int4 planes resident. The
int4 kernel and the dequantizing path read the same bfloat16 scales; the float16 copy is
made from those planes, so every path multiplies by the same matrix up to float16
rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import WeightLoadError
from molink.quant.bf16_gemm import Bf16Packed
from molink.quant.device import DeviceMatrix, check_device, device_matrix
from molink.quant.fp16_gemm import Fp16Packed
from molink.quant.groups import GroupInts, quantize_float
from molink.quant.int4 import Int4Planes, padded_rows, to_int4_planes
from molink.quant.kernels import check_batch_kernel, choose_kernel, int4_max_rows
from molink.quant.nbits import NBitsProduct

# Elements per band of dequantized rows: 2**17 float32 (512 KiB) stays in a core's L2.
BAND_ELEMENTS = 1 << 17


def _band_rows(cols: int) -> int:
    return max(64, (BAND_ELEMENTS // cols) // 64 * 64)


def dequant_matmul(planes: Int4Planes, x: torch.Tensor) -> torch.Tensor:
    """float32 ``x @ W.T`` for x float32 [T, cols], one band of W's rows at a time.

    Each band is dequantized in the packed blocking ([blocks, cols, block], see
    ``Int4Planes.dequantize_blocks``) and multiplied block by block in one batched product.
    """
    rows, padded = planes.rows, padded_rows(planes.rows)
    out = torch.empty(x.shape[0], padded, dtype=torch.float32)
    band = _band_rows(planes.cols)
    for start in range(0, padded, band):
        end = min(start + band, padded)
        w_t = planes.dequantize_blocks(start, end)  # [blocks, cols, block]
        part = torch.bmm(x.expand(w_t.shape[0], *x.shape), w_t)  # [blocks, T, block]
        out[:, start:end] = part.transpose(0, 1).reshape(x.shape[0], end - start)
    return out[:, :rows] if rows != padded else out


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with W kept as int4 planes (a ``LinearLike``).

    ``load_weight`` takes a ``GroupInts`` (a quantized checkpoint) or, with ``bits`` set,
    a float matrix quantized on the fly; a float matrix without ``bits`` stays float (a
    quantized checkpoint may keep small matrices unquantized). ``batch_kernel`` ``fp16``
    (``bf16``) also keeps a float16 (bfloat16) copy for batches (molink.quant.kernels).
    On a CUDA ``device`` the matrix is held by molink.quant.device instead (``fp8``: fp8
    rows; ``table``: the embedding, whose rows are also gathered).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int | None = None,
        batch_kernel: str = "int4",
        device: torch.device | str = "cpu",
        table: bool = False,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        check_batch_kernel(batch_kernel)
        self.device = torch.device(device)
        check_device(self.device)
        self.batch_kernel = batch_kernel
        self.table, self.fp8 = table, fp8
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=self.device), False) if bias else None
        )
        self.on_device: DeviceMatrix | None = None
        self.planes: Int4Planes | None = None
        self.wide: Fp16Packed | Bf16Packed | None = None
        self.nbits: NBitsProduct | None = None
        self.dense: torch.Tensor | None = None
        self.source_type = "unloaded"
        # Act-order GPTQ: the input each column of the held matrix multiplies (groups.py).
        self.input_order: torch.Tensor | None = None
        # Batches of up to this many rows run the int4 kernel (kernels.choose_kernel, read
        # once at load): forward goes there without the choice.
        self._int4_rows = 0

    @property
    def weight_bytes(self) -> int:
        if self.on_device is not None:
            return self.on_device.nbytes
        if self.planes is not None:
            extra = sum(k.nbytes for k in (self.wide, self.nbits) if k is not None)
            return self.planes.nbytes + extra
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    def load_weight(self, weight: torch.Tensor | GroupInts, pack: bool) -> None:
        quantized = isinstance(weight, GroupInts)
        self._check_shape(weight.shape if quantized else tuple(weight.shape))  # type: ignore[union-attr]
        self.source_type = weight.source_type if quantized else "float32"  # type: ignore[union-attr]
        order = weight.input_order if isinstance(weight, GroupInts) else None
        # fp8 rows are made from the dequantized matrix: its columns are in input order.
        self.input_order = None if order is None or self.fp8 else order.to(self.device)
        if self.device.type != "cpu":
            self.on_device = device_matrix(weight, self.device, self.bits, self.fp8, self.table)
            if self.on_device is None:
                self.dense = weight.float().to(self.device).contiguous()  # type: ignore[union-attr]
            return
        if isinstance(weight, GroupInts):
            ints = weight
        elif self.bits is not None:
            ints = quantize_float(weight, self.bits)
        else:
            self.dense, self.planes = weight.float().contiguous(), None
            return
        self._set_planes(to_int4_planes(ints), ints.source_type)

    def _set_planes(self, planes: Int4Planes, source_type: str) -> None:
        self.planes, self.dense, self.source_type = planes, None, source_type
        # One kernel call for two planes (molink.quant.int4); the LM head's ties broken.
        planes.join_planes()
        self.wide = self._wide_copy(planes, self.batch_kernel)
        self.nbits = NBitsProduct(planes) if self.batch_kernel == "int8act" else None
        # An act-order matrix takes the way through ``product``, which orders the inputs.
        most = int4_max_rows(self.batch_kernel, len(planes.packed))
        self._int4_rows = 0 if self.input_order is not None else most

    def saved_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The loaded weight as tensors and a description (molink.weights.packed_cache):
        the packed planes as the CPU kernel reads them, or the float matrix."""
        if self.on_device is not None:
            raise WeightLoadError("quantized matrices on an accelerator are not saved")
        if self.input_order is not None:
            raise WeightLoadError("act-order matrices are not saved")
        if self.planes is not None:
            planes = self.planes
            info = {"kind": "int4", "group": planes.group, "source_type": self.source_type}
            if planes.joined is not None:
                # As the kernel reads them: restored as views, with no joined copy made.
                return {"joined": planes.joined[0], "scale_zero": planes.scale_zero}, info
            tensors = {f"plane{i}": p for i, p in enumerate(planes.plane_tensors())}
            tensors["scale_zero"] = planes.scale_zero
            return tensors, info
        if self.dense is None:
            raise WeightLoadError("quantized linear layer saved before its weight was loaded")
        return {"dense": self.dense}, {"kind": "dense", "source_type": self.source_type}

    def restore_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Take back what ``saved_state`` gave, checking it fits this layer."""
        self.input_order = None
        if info.get("kind") == "dense":
            self._check_shape(tuple(tensors["dense"].shape))
            self.dense, self.planes, self.wide, self.nbits = tensors["dense"], None, None, None
            self.source_type = str(info["source_type"])
            return
        group, scale_zero = int(info["group"]), tensors["scale_zero"]
        count = len(tensors) - 1 if "joined" not in tensors else scale_zero.shape[0]
        expected = (count, self.in_features // group, padded_rows(self.out_features), 2)
        if tuple(scale_zero.shape) != expected:
            raise WeightLoadError(
                f"saved int4 scales have shape {tuple(scale_zero.shape)}, expected {expected}"
            )
        rows, cols = self.out_features, self.in_features
        if "joined" in tensors:
            joined = tensors["joined"]
            if tuple(joined.shape) != (padded_rows(rows), count * cols // 2):
                raise WeightLoadError(
                    f"saved joined int4 planes have shape {tuple(joined.shape)}, expected "
                    f"{(padded_rows(rows), count * cols // 2)}"
                )
            planes = Int4Planes.from_joined(joined, scale_zero, rows, cols, group)
        else:
            packed = [tensors[f"plane{i}"] for i in range(count)]
            planes = Int4Planes(packed, scale_zero, rows, cols, group)
        self._set_planes(planes, str(info["source_type"]))

    @staticmethod
    def _wide_copy(planes: Int4Planes, batch_kernel: str) -> Fp16Packed | Bf16Packed | None:
        """The float16 or bfloat16 copy a batch kernel multiplies (None for the others)."""
        if batch_kernel not in ("fp16", "bf16"):
            return None
        rows = planes.dequantize_rows(0, padded_rows(planes.rows))[: planes.rows]
        return Fp16Packed(rows) if batch_kernel == "fp16" else Bf16Packed(rows)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape != (self.out_features, self.in_features):
            raise WeightLoadError(
                f"matrix has shape {shape}, expected ({self.out_features}, {self.in_features})"
            )

    def prepack(self, enable: bool) -> None:
        """Nothing to do: the int4 planes are the kernel's packed form already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planes = self.planes
        if planes is not None and x.shape[0] <= self._int4_rows:
            # What ``product`` would run, without the choice; an LM head's ties broken (a
            # table: the embedding matrix may be the LM head too).
            y = planes.logits(x) if self.table else planes.matmul_float(x)
        else:
            y = self.product(x)
        if self.bias is not None:
            y += self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias (a tensor-parallel rank's partial sum)."""
        if self.input_order is not None:
            x = x[:, self.input_order]
        if self.on_device is not None:  # a CUDA layer holds neither planes nor a float matrix
            return self.on_device.matmul(x)
        if self.planes is None:
            if self.dense is None:
                raise WeightLoadError("quantized linear layer used before its weight was loaded")
            return F.linear(x.float(), self.dense)
        return self._quantized(x)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        assert self.planes is not None
        kernel = choose_kernel(x.shape[0], self.batch_kernel, len(self.planes.packed))
        if kernel in ("fp16", "bf16"):
            assert self.wide is not None  # made with the planes when the choice is fp16/bf16
            return self.wide.matmul(x)
        if kernel == "nbits":
            assert self.nbits is not None  # made with the planes when the choice is int8act
            return self.nbits.matmul(x)
        if kernel == "dequant":
            return dequant_matmul(self.planes, x.float())
        return self.planes.matmul_float(x)

    def plain_product(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``forward`` for float32 x of ``rows`` rows where it is the int4 planes' product
        alone (molink.models.blocks.direct_decode): no bias, no reordered inputs, not an
        LM head's ties, a row count the int4 kernel takes; else None."""
        planes = self.planes
        if planes is None or rows > self._int4_rows or self.table or self.bias is not None:
            return None
        return planes.matmul_float

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # forward() directly: no hooks are registered on these layers (as the decoder's
        # layer calls), and nn.Module.__call__ costs more than a small product's overhead.
        return residual + self.forward(x)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W as float32 (the same matrix as an input embedding)."""
        if self.on_device is not None:
            rows = self.on_device.gather_rows(ids)
        elif self.planes is None:
            if self.dense is None:
                raise WeightLoadError("quantized embedding used before its weight was loaded")
            return F.embedding(ids, self.dense)
        else:
            rows = self.planes.gather_rows(ids)
        if self.input_order is None:
            return rows
        inputs = torch.empty_like(rows)  # act-order: columns back in input order
        inputs[:, self.input_order] = rows
        return inputs

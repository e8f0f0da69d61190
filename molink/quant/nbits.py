"""int4/int8 weights multiplied with 8-bit activations: ONNX Runtime's ``MatMulNBits``.

ONNX Runtime's CPU library (MLAS) has AVX2 kernels for block-quantized weights that
quantize each activation row per block of 32 inputs to int8 and accumulate integer dot
products (``accuracy_level`` 4), the scheme llama.cpp's Q4 x Q8 products use. On this AVX2
CPU, one thread, SmolLM2-135M's products of one forward pass (bench/quant_kernels.py) it
is the fastest candidate from 1 to 32 rows: no kernel inside the torch wheel computes
with int8 activations per block (fbgemm's int8 path quantizes the whole activation matrix
with one scale, which LLM outliers break; ``torch._int_mm`` is a reference loop on CPU).
onnxruntime is maintained by Microsoft and ships MLAS prebuilt on PyPI; ``onnx`` builds the
one-node graph each matrix runs in.

The weights are the int4 planes' own integers and bfloat16 scales (molink.quant.int4), so
this path multiplies by the same matrix as the int4 kernel; only the activations are
rounded (to 8 bits per block of 32, a relative error ~2**-8 per block). ``MatMulNBits``
takes integer zero points only, so each group's float zero point is added separately:
``W = (q - 8) * s + z`` gives ``x @ W.T = MatMulNBits(x) + (x summed per group) @ z.T``,
a float32 product 1/group the size of the weights'. Two planes (Q5, Q6_K, Q8_0, int8)
are joined back into one 8-bit integer (``16 (hi - 8) + lo``) and run with ``bits=8``.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from molink.errors import InvalidParameterError
from molink.quant.int4 import Int4Planes, packed_block, padded_rows, unpack_plane

# Blocks of int8 activations, integer accumulation (MLAS's CompInt8 kernels).
ACCURACY_LEVEL = 4


@functools.cache
def nbits_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def _session(q: np.ndarray, scales: np.ndarray, rows: int, cols: int, bits: int, group: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
        K=cols, N=rows, bits=bits, block_size=group, accuracy_level=ACCURACY_LEVEL,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", rows])],
        [numpy_helper.from_array(q, "B"), numpy_helper.from_array(scales, "S")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # One session per matrix: a per-session arena would keep each one's largest output.
    options.enable_cpu_mem_arena = False
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _plane_ints(planes: Int4Planes, plane: int) -> torch.Tensor:
    padded = padded_rows(planes.rows)
    q = unpack_plane(planes.packed[plane], padded, planes.cols, packed_block())
    return q[: planes.rows].to(torch.int16)


class NBitsProduct:
    """``x @ W.T`` for float32 x [T, cols], W given as int4 planes (one or two)."""

    def __init__(self, planes: Int4Planes) -> None:
        if not nbits_available():
            raise InvalidParameterError(
                "quantized_batch_kernel", "int8act needs the onnxruntime and onnx packages"
            )
        rows, cols, group = planes.rows, planes.cols, planes.group
        sz = planes.scale_zero[:, :, :rows].float()  # [planes, K / group, N, 2]
        if len(planes.packed) == 1:
            bits, q = 4, _plane_ints(planes, 0)
            scale, zero = sz[0, ..., 0], sz[0, ..., 1]
        else:
            bits = 8
            q = 16 * (_plane_ints(planes, 0) - 8) + _plane_ints(planes, 1)
            scale, zero = sz[1, ..., 0], sz[1, ..., 1] - 8 * sz[1, ..., 0] + sz[0, ..., 1]
            # Centre the integers (Q5's 0..31 becomes -16..15): the activations' rounding
            # then multiplies the smaller part of W, the zero points the larger.
            centre = (int(q.min()) + int(q.max()) + 1) // 2
            q, zero = q - centre + 128, zero + centre * scale
        self.rows, self.cols, self.group = rows, cols, group
        blocks = q.to(torch.uint8).view(rows, cols // group, group)
        if bits == 4:
            blocks = blocks[..., 0::2] | (blocks[..., 1::2] << 4)
        self._session = _session(
            blocks.contiguous().numpy(), scale.t().contiguous().numpy(), rows, cols, bits, group
        )
        # The float zero points, [K / group, N]; None where they are all zero (Q4_0, Q8_0).
        self._zero = None if not bool(zero.any()) else zero.contiguous()
        self.nbytes = q.numel() * bits // 8 + scale.numel() * 4
        if self._zero is not None:
            self.nbytes += self._zero.numel() * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        (y,) = self._session.run(None, {"A": x.numpy()})
        out = torch.from_numpy(y)
        if self._zero is not None:
            sums = x.view(x.shape[0], -1, self.group).sum(-1)  # [T, K / group]
            out.addmm_(sums, self._zero)
        return out

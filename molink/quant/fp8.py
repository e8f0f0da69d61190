"""fp8 weights on GPUs that multiply in fp8 (compute capability 8.9+: Ada, Hopper).

``--quantization fp8`` on a float checkpoint quantizes each matrix at load to
``float8_e4m3fn`` with one scale per output row (absmax / 448), as vLLM's dynamic fp8
does; each step quantizes its activations per row the same way and multiplies through
``torch._scaled_mm`` (cuBLASLt's fp8 GEMM, in torch itself) with both scale vectors,
accumulating in float32 and writing bfloat16. Half of bfloat16's weight bytes.
``_scaled_mm`` wants every dimension a multiple of 16: rows of a step are padded.
"""

from __future__ import annotations

import torch

from molink.errors import InvalidParameterError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)
_ALIGN = 16


def check_fp8_device(device: torch.device) -> None:
    """fp8 matrix products need CUDA compute capability 8.9 or newer."""
    if device.type != "cuda":
        raise InvalidParameterError(
            "quantization", f"fp8 weights need a CUDA GPU with fp8 support; this is {device}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise InvalidParameterError(
            "quantization",
            f"fp8 weights need compute capability 8.9+ (Ada, Hopper); this GPU has "
            f"{capability[0]}.{capability[1]}",
        )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, float32 scales [rows, 1]) with ``x ~= values * scales`` per row."""
    scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Rows:
    """``x @ W.T`` with W [N, K] in fp8, one float32 scale per row."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.rows, self.cols = (int(d) for d in weight.shape)
        if self.rows % _ALIGN or self.cols % _ALIGN:
            raise InvalidParameterError(
                "quantization",
                f"fp8 needs matrix sides that are multiples of {_ALIGN}; got "
                f"[{self.rows}, {self.cols}]",
            )
        self.weight, scale = quantize_rows(weight)
        self.scale = scale.t().contiguous()  # [1, N]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        padded = -(-tokens // _ALIGN) * _ALIGN
        if padded != tokens:
            x = torch.cat([x, x.new_zeros(padded - tokens, x.shape[1])])
        values, scale = quantize_rows(x)
        out = torch._scaled_mm(
            values, self.weight.t(), scale_a=scale, scale_b=self.scale, out_dtype=torch.bfloat16
        )
        return out[:tokens].float()

    def gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight[index].float() * self.scale[0, index][:, None]

"""How fast this node computes one decoder layer, measured at start before it picks a span.

Automatic placement balances nodes by speed, so a node needs a figure it can compare with
other nodes' before it serves anything (its tokens/s come only once it serves). The probe
times the linear work of one decoder layer of this model (q, k, v, o and the gated MLP,
shapes from the model config) on the node's device and dtype at a fixed small batch: that
work is most of a step and is what differs between a GPU and a CPU; attention over a short
context adds little. Weights are constant-filled, not random: a product's time does not
depend on the values, and filling is cheaper than drawing. The figure is the fastest of a
few repetitions (after one warm-up): other work on the machine only ever adds time, so the
fastest repetition is the one closest to what the hardware does. An operator whose machine
is busy at start can pin the figure instead (--molink-layer-step-ms).
"""

from __future__ import annotations

import time

import torch

from molink.config import ModelConfig

PROBE_TOKENS = 16  # tokens per probe step: a small decode batch
_REPS = 5
_STEPS_PER_REP = 4


def layer_step_seconds(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds one decoder layer's linear work takes for a step of PROBE_TOKENS tokens."""
    hidden, q_width = config.hidden_size, config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    inner = config.intermediate_size

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.full((rows, cols), 0.01, dtype=dtype, device=device)

    qkv = weight(q_width + 2 * kv_width, hidden)
    out = weight(hidden, q_width)
    gate_up = weight(2 * inner, hidden)
    down = weight(hidden, inner)
    x = torch.full((PROBE_TOKENS, hidden), 0.01, dtype=dtype, device=device)

    def step() -> torch.Tensor:
        h = x + torch.nn.functional.linear(torch.nn.functional.linear(x, qkv)[:, :q_width], out)
        gate, up = torch.nn.functional.linear(h, gate_up).chunk(2, dim=-1)
        return h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)

    with torch.inference_mode():
        step()
        _sync(device)
        times = []
        for _ in range(_REPS):
            began = time.perf_counter()
            for _ in range(_STEPS_PER_REP):
                step()
            _sync(device)
            times.append((time.perf_counter() - began) / _STEPS_PER_REP)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

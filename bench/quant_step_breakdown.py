"""Where a decode step of SmolLM2 Q4_1 spends its time: matrix products vs the rest.

One process holds the model four ways (float32, and the Q4_1 file with each
``--quantized-batch-kernel``: int4, fp16, bf16, int8act) as offline engines, one torch thread.
For 1, 8 and 32 streams each engine prefills that many text prompts, then times decode
steps; every linear layer (LM head included) is wrapped with a timer, so a step splits
into ``linear_ms`` (the products, with their conversions) and ``other_ms`` (attention,
norms, rotary, sampling, scheduling, Python). Rounds alternate the engines' order (ABBA)
so that a loaded host's drift reaches all of them alike.

``bound_vs_float32`` is float32's step over the engine's ``other_ms``: the speed-up that
engine would reach if its products took no time at all. Where it is below 2, no kernel can
make that step twice as fast as float32's.

    OMP_NUM_THREADS=1 python bench/quant_step_breakdown.py [--streams 1,8,32] [--rounds 4]
        [--modes float32,bfloat16,int4,fp16,bf16,int8act] [--name quant_step_breakdown]

Writes ``bench/results/<name>.json``. The committed run (4 rounds, a host
loaded ~10x by other jobs, so absolute times are 3-7x a quiet host's and each engine's
``other_ms`` varies by tens of percent between rounds): float32's steps at 1, 8 and 32
streams are 140, 438 and 1379 ms, of which 69, 161 and 581 ms are not products, so even
free products would make them only 2.0x, 2.7x and 2.4x faster; to reach 2x, the products
would have to be 2.3-7x faster than float32's, while the fastest kernels on this CPU are
1.2-3x at these row counts (molink/quant/kernels.py). Measured speed-ups over float32:
int4 1.03, 1.06, 0.55; fp16 0.83, 1.66, 0.93; int8act 0.81, 1.32, 0.89.
That run was on an AVX2 CPU. ``quant_step_breakdown_avx512bf16.json`` (AVX-512 with
``avx512_bf16``, bfloat16 added, 4 rounds, load 1.1): float32's steps at 1, 8, 32 streams
35.1, 37.3, 78.4 ms (11.5, 13.4, 30.7 not products: bounds 3.0x, 2.8x, 2.6x); speed-ups
over float32: bfloat16 0.91, 0.82, 1.0; int4 2.54, 1.24, 0.75; fp16 2.62, 1.57, 0.99;
int8act 2.02, 1.42, 1.06. ``quant_step_breakdown_bf16_kernel.json`` (the same CPU, with the
``bf16`` kernel, 4 rounds, load 1.9): float32's steps 31.8, 36.6, 73.7 ms; speed-ups int4
2.34, 1.28, 0.78; fp16 2.05, 1.51, 1.05; bf16 2.48, 1.48, 1.43 (its products 8.1, 16.6,
33.9 ms against float32's 21.3, 22.0, 45.0; float32's LM head is not a wrapped layer, so
its "other" holds that product too).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from bench.quant_serving import cpu_flags  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.models.blocks.linear import LinearLike  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("quant_step_breakdown")

PROMPT = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle and "
    "decides to travel across the ocean to find the sender. Chapter"
)
MODES = ("float32", "int4", "fp16", "bf16", "int8act")  # --modes may add bfloat16
TIMED_STEPS = 6


class LinearClock:
    """Seconds spent inside the wrapped linear layers (outermost calls only: ``add_to``
    may call the layer's own ``forward``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any) -> torch.Tensor:
            self.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - started

        return timed


def build(mode: str, clock: LinearClock) -> LLM:
    options: dict[str, Any] = {"max_num_seqs": 64, "kv_cache_memory_bytes": 1 << 29}
    if mode in ("float32", "bfloat16"):
        options.update(quantization="none", dtype=mode)
    else:
        options.update(quantization="gguf", quantized_batch_kernel=mode)
    llm = LLM(model=str(default_model_gguf()), **options)
    for stage in llm.engine.executor.stages:
        for module in stage.model.modules():
            if isinstance(module, LinearLike):
                # Instance attributes: nn.Module.__call__ looks ``forward`` up on the instance.
                module.forward = clock.wrap(module.forward)  # type: ignore[method-assign]
                module.add_to = clock.wrap(module.add_to)  # type: ignore[method-assign]
    return llm


def decode_steps(llm: LLM, clock: LinearClock, streams: int, tag: str) -> tuple[float, float]:
    """Median step ms and the median step's linear ms, over TIMED_STEPS decode steps."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=TIMED_STEPS + 6, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"{tag}-{i}", llm.tokenizer.encode(f"{PROMPT} {i + 1}:"), params)
    for _ in range(2):  # prefill (the prompts fit one step) and a first decode step
        engine.step()
    samples = []
    for _ in range(TIMED_STEPS):
        clock.seconds = 0.0
        started = time.perf_counter()
        engine.step()
        samples.append((time.perf_counter() - started, clock.seconds))
    while engine.has_unfinished_requests():
        engine.step()
    step, linear = sorted(samples)[len(samples) // 2]
    return step * 1e3, linear * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="also: bfloat16")
    parser.add_argument("--name", default="quant_step_breakdown", help="results file name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    clocks = {mode: LinearClock() for mode in modes}
    llms = {mode: build(mode, clocks[mode]) for mode in modes}
    for mode in modes:
        decode_steps(llms[mode], clocks[mode], 2, f"warm-{mode}")
    results: dict[str, Any] = {}
    load_start = os.getloadavg()[0]
    for streams in (int(n) for n in args.streams.split(",")):
        samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                tag = f"{mode}-{streams}-{r}"
                samples[mode].append(decode_steps(llms[mode], clocks[mode], streams, tag))
        results[str(streams)] = summarize(samples)
        logger.info("streams=%d: %s", streams, results[str(streams)])
    write_results(
        args.name,
        {
            "rounds": args.rounds,
            "cpu_flags": cpu_flags(),
            "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "streams": results,
        },
    )


def summarize(samples: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, pairs in samples.items():
        step = statistics.median(s for s, _ in pairs)
        linear = statistics.median(lin for _, lin in pairs)
        out[mode] = {
            "step_ms": round(step, 1),
            "linear_ms": round(linear, 1),
            "other_ms": round(step - linear, 1),
        }
    if "float32" in out:
        f32 = out["float32"]["step_ms"]
        for entry in out.values():
            entry["speedup_vs_float32"] = round(f32 / entry["step_ms"], 2)
            entry["bound_vs_float32"] = round(f32 / max(entry["other_ms"], 1e-3), 2)
    return out


if __name__ == "__main__":
    main()

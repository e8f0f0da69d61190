"""Whether torch.compile would shorten a CPU decode step of SmolLM2 Q4_1 (int4 kernel, one
thread, one sequence), measured rather than assumed.

A decode step at one row spends ~6.4 ms in torch's int4 kernel and ~4 ms in the small ops
between (norms, rotary, attention, conversions) and the Python that issues them: the part
a compiler could fuse away. This probe runs the same offline engine three ways, one after
the other in one process:

* ``eager``: the engine as it is;
* ``compiled``: the slice's layer loop through ``torch.compile`` (Inductor, dynamic
  shapes) for decode-only steps. Attention runs as an opaque custom op that reads the
  layer's KV cache and the step's metadata from the probe (as vLLM's attention op reads
  its forward context): with the cache as an argument the op mutates, Inductor copies
  the whole cache for every layer (seconds per step). Rotary angles are looked up before
  the loop (their lazy lookup makes the first layer's graph differ from the others');
* ``compiled_skip_guards``: the same with ``torch.compiler.set_stance(...,
  skip_guard_eval_unsafe=True)`` once compiled.

Reports per mode the median and minimum wall ms of ``--steps`` decode steps, the compile
time (the first steps), and the greedy tokens' agreement with eager.

    OMP_NUM_THREADS=1 python bench/cpu_compile_probe.py [--steps 60] [--name cpu_compile_probe]

Writes ``bench/results/<name>.json``. The committed run (the 2-core AMD EPYC, quiet host,
load 0.1-0.5, 60 steps each): eager 11.09 ms median (10.12 min); compiled 12.36 (11.56),
20.6 s to compile; compiled with guards skipped 11.10 (9.97); 64 of 64 tokens equal to
eager in both. Dynamo's guard check alone took ~1-1.8 ms per step in profiles (30 layers'
modules), about what fusing the small ops saves, and the opaque attention op costs more
than eager's attention calls: at one row, compiling does not shorten the step, so the
engine runs eager on CPUs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import molink.models.blocks.attention as block_attention  # noqa: E402
from bench.common import quantized_default_model, write_results  # noqa: E402
from molink.models import attention as paged  # noqa: E402
from molink.models.forward_context import ForwardContext  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402

logger = logging.getLogger("cpu_compile_probe")
PROMPT = "Write a long story about a lighthouse keeper:"
STEP: dict[str, Any] = {}  # the step's metadata and KV cache, read by the attention op


@torch.library.custom_op("molink_probe::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    cache = STEP["kv"]
    return paged.paged_attention(q, k, v, cache.keys[layer], cache.values[layer], STEP["meta"])


@attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * v.shape[-1])


def _attention_by_layer(q, k, v, layer, _values, _meta, _options):  # type: ignore[no-untyped-def]
    """Stands in for paged_attention inside the compiled loop: ``layer`` is the index."""
    return attention_op(q, k.contiguous(), v.contiguous(), layer)


def _layer_loop(layers, x, ctx, keys, values, final_norm):  # type: ignore[no-untyped-def]
    for index, layer in enumerate(layers):
        x = layer.forward(x, ctx, keys[index], values[index])
    return final_norm(x)


def _compiled_forward(model: Any, compiled: Any) -> Any:
    eager_attention = block_attention.paged_attention

    def forward(inputs: torch.Tensor, meta: Any, kv_cache: Any) -> torch.Tensor:
        x = model.embed.embedding(inputs).to(model.dtype)
        ctx = ForwardContext(meta, model.rotaries)
        for key, tables in model.rotaries.items():
            ctx._angles[key] = tables.lookup(meta.positions, None)
        if meta.decode is None or meta.prefills:
            return _layer_loop(
                model.layers, x, ctx, kv_cache.keys, kv_cache.values, model.final_norm
            )
        STEP.update(meta=meta, kv=kv_cache)
        block_attention.paged_attention = _attention_by_layer
        try:
            indices = list(range(len(model.layers)))
            return compiled(model.layers, x, ctx, indices, indices, model.final_norm)
        finally:
            block_attention.paged_attention = eager_attention

    return forward


def run(mode: str, steps: int) -> dict[str, Any]:
    llm = quantized_default_model()
    engine = llm.engine
    (stage,) = engine.executor.stages
    if mode != "eager":
        torch._dynamo.reset()
        compiled = torch.compile(_layer_loop, dynamic=True)
        stage.model._forward = _compiled_forward(stage.model, compiled)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    engine.add_request("probe", llm.tokenizer.encode(PROMPT), params)
    tokens: list[int] = []
    start = time.perf_counter()
    for _ in range(4):  # prefill, then the decode steps that compile
        tokens += [t for out in engine.step() for t in out.outputs[0].delta_token_ids]
    first_steps_s = time.perf_counter() - start
    if mode == "compiled_skip_guards":
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    wall = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            outputs = engine.step()
            wall.append(time.perf_counter() - start)
            tokens += [t for out in outputs for t in out.outputs[0].delta_token_ids]
    finally:
        torch.compiler.set_stance("default")
    return {
        "median_ms": round(statistics.median(wall) * 1e3, 3),
        "min_ms": round(min(wall) * 1e3, 3),
        "first_four_steps_s": round(first_steps_s, 2),
        "tokens": tokens,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--name", default="cpu_compile_probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        mode: run(mode, args.steps) for mode in ("eager", "compiled", "compiled_skip_guards")
    }
    eager_tokens = results["eager"]["tokens"]
    for mode, result in results.items():
        tokens = result.pop("tokens")
        same = sum(a == b for a, b in zip(tokens, eager_tokens, strict=False))
        result["tokens_equal_to_eager"] = f"{same}/{len(eager_tokens)}"
        logger.info("%s: %s", mode, result)
    write_results(args.name, {"steps": args.steps, "results": results})


if __name__ == "__main__":
    main()

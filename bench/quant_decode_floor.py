"""How far a one-row decode step of SmolLM2 Q4_1 is from what torch's CPU ops allow.

One process (offline engine, ``--quantized-batch-kernel int4``, one torch thread) loads the
model and generates ``--steps`` tokens greedily after the serving benchmark's prompt. Then
three ways of taking a decode step are timed at the same positions, interleaved round by
round (medians of each round's median, ms):

* ``engine``: ``LLMEngine.step()`` (scheduler, attention metadata, the model's modules,
  sampling, detokenizing);
* ``lean``: the same 30 layers and LM head as one plain function over the engine's own
  packed weights and rotary tables: norm, products, rotation, a bfloat16 cache written and
  read through a view, SDPA, residual adds, argmax; no engine objects, one torch call per
  operation of the arithmetic. It is checked to predict the engine's tokens (teacher-forced
  top-1 agreement, reported; the run fails under 90%, i.e. if it is not the same model);
* ``products``: the step's 121 int4 products alone (4 per layer, the LM head's joined
  planes), on the same weights and shapes: no decode in torch can be faster;
* ``compiled`` (with ``--compiled``): the lean decode's layers through torch.compile with
  Inductor's C++ wrapper (``compiled_layers``): whether fusing the small ops and calling
  every kernel from C++ lowers what the lean decode spends between its products.

``--llama-tpot-ms`` (default: llama-server's one-stream TPOT in
``bench/results/quant_serving_prefill_int4.json``, the last committed serving run) turns
each into a ratio: llama-server's TPOT over it, the issue's "x llama-server at 1 stream"
were a served step to take only that long (a served step adds ~0.2-0.6 ms to the engine's,
measured in the serving runs).

    OMP_NUM_THREADS=1 python bench/quant_decode_floor.py [--steps 64] [--rounds 5]
        [--compiled] [--name quant_decode_floor]

Writes ``bench/results/<name>.json``. The committed run (AMD EPYC with avx512_bf16, load
~0.2, 5 rounds of 64 steps): engine 9.72 ms, lean 8.43, products 6.23 per step, i.e.
0.67x, 0.78x and 1.05x llama-server's 6.56 ms TPOT; the lean decode predicts 94.8% of the
engine's tokens (its prompt goes token by token, the engine's in one prefill chunk).
``quant_decode_floor_compiled.json`` (``--compiled``, the same host, load ~0.8, Inductor's
code already cached on disk: 30 s to load it, 228 s to compile it the first time): engine
9.72 ms, lean 8.56, compiled 8.52, products 6.28 (0.68x, 0.77x, 0.77x, 1.04x); the compiled
decode predicts the same 94.8%. Compiling does not lower the floor: what the lean decode
spends between its products (2.2-2.3 ms) is the small ops' own work, not Python's calls.
``quant_decode_floor_stop28.json`` (``--llama-tpot-ms 7.29``, llama-server's TPOT in
``quant_serving_stop28.json`` the same hour, a host ~7% slower than the day before, load
0.26-0.67): engine 10.99 ms, lean 9.36, products 6.86 (0.66x, 0.78x, 1.06x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, quantized_default_model, write_results  # noqa: E402
from bench.quant_serving import PROMPT, cpu_flags  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.quant.int4 import Int4Planes  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402

logger = logging.getLogger("quant_decode_floor")
LLAMA_RESULTS = RESULTS_DIR / "quant_serving_prefill_int4.json"


LayerLoop = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class LeanLayer:
    """One layer's weights; products are ``Int4Planes.matmul_float``, what the engine's
    int4 layers run (bfloat16 in, one kernel call, float32 out)."""

    input_norm: torch.Tensor
    qkv: Int4Planes
    o: Int4Planes
    post_norm: torch.Tensor
    gate_up: Int4Planes
    down: Int4Planes
    keys: torch.Tensor  # [max positions, kv heads, head dim], bfloat16
    values: torch.Tensor


class LeanDecoder:
    """SmolLM2's decode step as one function over the engine's weights (module doc)."""

    def __init__(self, llm: LLM, max_positions: int) -> None:
        (stage,) = llm.engine.executor.stages
        model = stage.model
        first = model.layers[0]
        spec = first.attn.spec
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.hidden = spec.hidden_size
        self.eps = first.input_norm.eps
        self.intermediate = first.mlp.intermediate
        self.rotary = model.rotaries["default"]
        self.embed = model.embed
        self.final_norm = model.final_norm.weight
        self.head: Int4Planes = model.lm_head.planes

        def cache() -> torch.Tensor:
            shape = (max_positions, self.kv_heads, self.head_dim)
            return torch.zeros(shape, dtype=torch.bfloat16)

        self.layers = [
            LeanLayer(
                layer.input_norm.weight,
                layer.attn.qkv.planes,
                layer.attn.o.planes,
                layer.post_norm.weight,
                layer.mlp.gate_up.planes,
                layer.mlp.down.planes,
                cache(),
                cache(),
            )
            for layer in model.layers
        ]

    def products(self) -> list[Int4Planes]:
        return [p for la in self.layers for p in (la.qkv, la.o, la.gate_up, la.down)] + [self.head]

    def step(self, token: int, position: int, layers: LayerLoop | None = None) -> torch.Tensor:
        """Logits [1, vocab] of the token after ``token`` at ``position``; ``layers``: the
        layer loop to run (default ``run_layers``; ``--compiled`` passes its compiled form)."""
        dim = self.head_dim
        x = self.embed.embedding(torch.tensor([token]))
        cos = self.rotary.cos[position].view(1, 1, dim)
        sin = self.rotary.sin_signed[position].view(1, 1, dim)
        h = (layers or self.run_layers)(x, cos, sin, position)
        return self.head.matmul_float(h)

    def run_layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int
    ) -> torch.Tensor:
        """The 30 layers and the final norm over one token's hidden state ``x`` [1, hidden]."""
        heads, kv, dim, hidden = self.heads, self.kv_heads, self.head_dim, self.hidden
        q_end, k_end = heads * dim, (heads + kv) * dim
        length = position + 1
        for la in self.layers:
            h = torch.rms_norm(x, (hidden,), la.input_norm, self.eps)
            qkv = la.qkv.matmul_float(h)
            qk = qkv[:, :k_end].view(1, heads + kv, dim)
            qk = torch.addcmul(qk * cos, torch.roll(qk, shifts=dim // 2, dims=-1), sin)
            la.keys[position] = qk[0, heads:]
            la.values[position] = qkv[0, k_end:].view(kv, dim)
            keys = la.keys[:length].float().transpose(0, 1).unsqueeze(0)
            values = la.values[:length].float().transpose(0, 1).unsqueeze(0)
            query = qk[:, :heads].reshape(1, kv, heads // kv, dim)
            attn = F.scaled_dot_product_attention(query, keys, values).reshape(1, q_end)
            x = x + la.o.matmul_float(attn)
            h = torch.rms_norm(x, (hidden,), la.post_norm, self.eps)
            gate_up = la.gate_up.matmul_float(h)
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            x = x + la.down.matmul_float(act)
        return torch.rms_norm(x, (hidden,), self.final_norm, self.eps)


def compiled_layers(lean: LeanDecoder) -> LayerLoop:
    """``lean.run_layers`` through torch.compile: Inductor fuses the small ops into
    generated C++ kernels and, with its C++ wrapper, calls them (and the int4 kernel, SDPA)
    from C++ without a Python call per operation; dynamic shapes, so that one graph serves
    every position. Guards are checked on every call (the default); compiling takes
    ~1-2 minutes on one core the first time (Inductor caches it on disk)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = True
    return torch.compile(lean.run_layers, fullgraph=True, dynamic=True)


def engine_tokens(llm: LLM, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after ``prompt`` and the wall time of each decode step."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    engine.add_request(f"floor-{time.monotonic_ns()}", prompt, params)
    tokens: list[int] = []
    times: list[float] = []
    for out in engine.step():  # prefill: the first token
        tokens.extend(out.outputs[0].delta_token_ids)
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        for out in outputs:
            tokens.extend(out.outputs[0].delta_token_ids)
    return tokens, times


def lean_pass(
    lean: LeanDecoder, sequence: list[int], first_timed: int, layers: LayerLoop | None = None
) -> tuple[int, list[float]]:
    """Teacher-forced over ``sequence``: top-1 hits on its next tokens from ``first_timed``
    on, and the wall time of each of those steps (the prompt's steps fill the cache)."""
    hits, times = 0, []
    with torch.inference_mode():
        for position, token in enumerate(sequence[:-1]):
            start = time.perf_counter()
            logits = lean.step(token, position, layers)
            predicted = int(logits.argmax())
            if position >= first_timed:
                times.append(time.perf_counter() - start)
                hits += predicted == sequence[position + 1]
    return hits, times


def products_pass(products: list[Int4Planes], steps: int) -> list[float]:
    calls = [(p, torch.randn(1, p.cols)) for p in products]
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            for planes, x in calls:
                planes.matmul_float(x)
            times.append(time.perf_counter() - start)
    return times


def llama_tpot_ms(path: Path) -> float | None:
    try:
        runs = json.loads(path.read_text())["servers"]["llama_server"]["runs"]
    except (OSError, KeyError, ValueError):
        return None
    return next((r["tpot_mean_ms"] for r in runs if r["streams"] == 1), None)


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-tpot-ms", type=float, default=None)
    parser.add_argument("--name", default="quant_decode_floor", help="results file name")
    parser.add_argument(
        "--compiled", action="store_true", help="also time the lean layers through torch.compile"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    llm = quantized_default_model()
    prompt = llm.tokenizer.encode(f"{PROMPT} 1:")
    lean = LeanDecoder(llm, len(prompt) + args.steps + 2)
    products = lean.products()
    rounds: dict[str, list[float]] = {"engine": [], "lean": [], "products": []}
    compiled: LayerLoop | None = None
    compile_s = None
    if args.compiled:
        compiled, rounds["compiled"] = compiled_layers(lean), []
        start = time.perf_counter()
        lean_pass(lean, prompt + [0] * 4, len(prompt), compiled)  # compiles
        compile_s = round(time.perf_counter() - start, 1)
    hits = compiled_hits = total = 0
    for index in range(args.rounds):
        tokens, engine_times = engine_tokens(llm, prompt, args.steps)
        got, lean_times = lean_pass(lean, prompt + tokens, len(prompt))
        hits, total = hits + got, total + len(tokens)
        timed = [("engine", engine_times), ("lean", lean_times)]
        if compiled is not None:
            got, compiled_times = lean_pass(lean, prompt + tokens, len(prompt), compiled)
            compiled_hits += got
            timed.append(("compiled", compiled_times))
        product_times = products_pass(products, args.steps)
        for key, times in timed:
            rounds[key].append(median_ms(times))
        rounds["products"].append(median_ms(product_times))
        logger.info("round %d: %s", index, {k: v[-1] for k, v in rounds.items()})
    agreement = hits / total
    if agreement < 0.9:
        raise SystemExit(f"the lean decode predicts {agreement:.1%} of the engine's tokens")
    if compiled is not None and compiled_hits / total < 0.9:
        raise SystemExit(f"the compiled decode predicts {compiled_hits / total:.1%} of them")
    llama = args.llama_tpot_ms or llama_tpot_ms(LLAMA_RESULTS)
    step_ms = {key: round(statistics.median(values), 3) for key, values in rounds.items()}
    payload: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 python bench/quant_decode_floor.py " + " ".join(sys.argv[1:]),
        "cpu_flags": cpu_flags(),
        "steps": args.steps,
        "prompt_tokens": len(prompt),
        "rounds": rounds,
        "step_ms": step_ms,
        "products_per_step": len(products),
        "lean_top1_agreement_with_engine": round(agreement, 4),
        "compiled_top1_agreement_with_engine": (
            round(compiled_hits / total, 4) if compiled is not None else None
        ),
        "compile_s": compile_s,
        "not_products_ms": {
            key: round(step_ms[key] - step_ms["products"], 3)
            for key in step_ms
            if key != "products"
        },
        "llama_server_tpot_ms": llama,
        "llama_server_tpot_over": (
            {key: round(llama / ms, 3) for key, ms in step_ms.items()} if llama else None
        ),
        "load_average": os.getloadavg(),
    }
    write_results(args.name, payload)
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()

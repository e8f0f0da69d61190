"""The seed's single-node command with ``--dtype half`` serves a GGUF file on a CPU."""

from __future__ import annotations

from molink.cli.engine_builder import engine_options
from molink.cli.main import parse_engine_args
from molink.engine.factory import build_local_engine
from molink.sampling_params import SamplingParams
from molink.weights import default_model_gguf
from molinkv1.entrypoints import api_server

NEW_TOKENS = 3


def test_dtype_half_on_a_quantized_gguf_generates() -> None:
    # Quantized matrices run with float32 activations on a CPU; the KV cache must follow
    # the dtype the model actually runs in, not the float16 asked for.
    argv = [
        "--model", str(default_model_gguf()), "--port", "8080",
        "--dtype", "half", "--max-model-len", "4096",
    ]  # fmt: skip
    parser = api_server.build_parser("api_server")
    args = parse_engine_args(parser, parser.parse_args(argv))
    engine, _, _ = build_local_engine(engine_options(args))
    ids = engine.tokenizer.encode("San Francisco is a")
    engine.add_request("half-0", ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    finished = []
    for _ in range(4 * NEW_TOKENS):  # a bounded number of steps: one token per step
        finished += [out for out in engine.step() if out.finished]
        if not engine.has_unfinished_requests():
            break
    assert [out.request_id for out in finished] == ["half-0"]
    completion = finished[0].outputs[0]
    assert len(completion.token_ids) == NEW_TOKENS
    assert completion.finish_reason == "length"

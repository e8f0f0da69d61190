"""A deterministic stand-in for a model, to exercise the pipeline runtime without weights.

The first stage turns each token id into a row of ``hidden_size`` copies of that id; every
stage adds the number of layers it holds; the last stage "samples", for each sequence
with ``sample=True``, ``(round(v) + seq_id) % vocab_size`` where ``v`` is the value of that
sequence's last row. With ``num_layers`` layers in all, a step whose last token of
sequence ``s`` is ``t`` therefore yields ``(t + num_layers + s) % vocab_size``.

Run a stage process (used by the integration tests)::

    python -m molink.pipeline.toy --node-id s1 --layers 2:4 --num-layers 6 \\
        --listen 127.0.0.1:50062 --initial-peer 127.0.0.1:50061
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

import torch

from molink.config import LayerRange
from molink.errors import ProtocolError
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.node import StageNode
from molink.step import SampledToken, StepPlan, StepResult
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)


def toy_identity(
    num_layers: int, hidden_size: int = 8, vocab_size: int = 1000, served_name: str = "toy"
) -> ModelIdentity:
    shape = f"toy/{num_layers}/{hidden_size}/{vocab_size}"
    return ModelIdentity(
        served_name=served_name,
        fingerprint=hashlib.sha256(shape.encode()).hexdigest()[:16],
        num_layers=num_layers,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
    )


def expected_token(last_token: int, seq_id: int, num_layers: int, vocab_size: int = 1000) -> int:
    return (last_token + num_layers + seq_id) % vocab_size


class ToyStageExecutor:
    """Implements molink.stage.protocol.StageExecutor with arithmetic."""

    def __init__(self, layers: LayerRange, model: ModelIdentity, delay_s: float = 0.0) -> None:
        self.layers = layers
        self.model = model
        self.delay_s = delay_s
        self.is_first = layers.start == 0
        self.is_last = layers.end == model.num_layers
        self.sequences: dict[tuple[str, int], int] = {}  # (head, seq) -> prompt length

    def execute(
        self, plan: StepPlan, hidden: torch.Tensor | None, head_id: str = ""
    ) -> torch.Tensor | StepResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        for seq_id in plan.finished_seq_ids:
            self.sequences.pop((head_id, seq_id), None)
        for new in plan.new_sequences:
            self.sequences[(head_id, new.seq_id)] = new.num_prompt_tokens
        if self.is_first:
            ids = torch.tensor(plan.token_ids, dtype=torch.float32)
            x = ids[:, None].expand(len(plan.token_ids), self.model.hidden_size)
        else:
            assert hidden is not None, "a later stage always receives hidden states"
            x = hidden.to(torch.float32)
        x = x + (self.layers.end - self.layers.start)
        if not self.is_last:
            return x
        return StepResult(
            step_id=plan.step_id, micro_batch=plan.micro_batch, sampled=self._sample(plan, x)
        )

    def execute_many(
        self, steps: Sequence[tuple[StepPlan, torch.Tensor | None]], head_id: str = ""
    ) -> list[torch.Tensor | StepResult | ProtocolError]:
        results: list[torch.Tensor | StepResult | ProtocolError] = []
        for plan, hidden in steps:
            try:
                results.append(self.execute(plan, hidden, head_id))
            except ProtocolError as exc:
                results.append(exc)
        return results

    def _sample(self, plan: StepPlan, x: torch.Tensor) -> tuple[SampledToken, ...]:
        sampled = []
        row = 0
        for seq in plan.scheduled:
            row += seq.num_new_tokens
            if seq.sample:
                value = round(float(x[row - 1, 0]))
                token = (value + seq.seq_id) % self.model.vocab_size
                sampled.append(SampledToken(seq_id=seq.seq_id, token_id=token))
        return tuple(sampled)

    def release(self, seq_ids: list[int], head_id: str = "") -> None:
        for seq_id in seq_ids:
            self.sequences.pop((head_id, seq_id), None)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a toy pipeline stage.")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--layers", required=True, help="start:end, end -1 for the last layer")
    parser.add_argument("--num-layers", type=int, required=True)
    parser.add_argument("--hidden-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--served-name", default="toy")
    parser.add_argument("--listen", required=True, help="host:port to bind")
    parser.add_argument("--advertise", default=None, help="host:port peers should dial")
    parser.add_argument("--initial-peer", required=True)
    parser.add_argument("--wire-dtype", default="float16")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of fake compute")
    parser.add_argument("--upstream-stall", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parse_args(argv)
    model = toy_identity(args.num_layers, args.hidden_size, args.vocab_size, args.served_name)
    start, end = (int(v) for v in args.layers.split(":"))
    layers = LayerRange.resolve(start, end, args.num_layers)
    info = NodeInfo(
        node_id=args.node_id,
        model=model,
        layers=layers,
        address=args.advertise or args.listen,
        wire_dtype=args.wire_dtype,
    )
    config = TransportConfig(upstream_stall_s=args.upstream_stall)
    node = StageNode(
        ToyStageExecutor(layers, model, args.delay),
        info,
        config,
        bind_address=args.listen,
        initial_peer=args.initial_peer,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        node.start()
    except Exception as exc:
        logger.error("toy stage %s failed to start: %s", args.node_id, exc)
        node.stop()
        return 1
    logger.info("toy stage %s ready", args.node_id)
    while not stop.wait(1.0):
        pass
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

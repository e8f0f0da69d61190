"""Runs one stage's layers over micro-batches with the stage's own paged KV cache.

A node that serves other heads (``owns_blocks``) allocates its blocks itself, per
(head id, sequence id), and refuses a plan it has no room for (KVRoomError, nothing
kept). A head's own stage, and the stages of a single process, use the block ids of the
plan, which the scheduler of that same process allocated (see molink/step.py). The last
stage also keeps each sequence's token history and samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from molink.config import LayerRange, ModelConfig
from molink.errors import MolinkError, ProtocolError
from molink.kv_cache.stage_pool import KVRoomError, StageBlockPool
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.kv_cache import KVCache
from molink.quant.memory import RESIDENT
from molink.sampling.prompt_logprobs import prompt_token_logprobs
from molink.sampling.sampler import Sampler, SequenceSamplingState
from molink.sampling.structured import GrammarCompiler
from molink.stage.decode_graphs import GraphSettings, capture_decode_graphs
from molink.stage.resources import check_host_room
from molink.step import SampledToken, ScheduledSequence, StepPlan, StepResult

logger = logging.getLogger(__name__)

SeqKey = tuple[str, int]
PlanFailure = ProtocolError | KVRoomError


class StageWorker:
    """A StageExecutor (molink/stage/protocol.py) backed by a DecoderSlice."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        layer_range: LayerRange,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        grammars: GrammarCompiler | None = None,
        owns_blocks: bool = False,
        kv_config: ModelConfig | None = None,
        graphs: GraphSettings | None = None,
    ) -> None:
        """``kv_config``: the layout of this process's KV cache when it differs from the
        model's (a tensor-parallel rank holds its share of the KV heads)."""
        self.model = model
        self.model_config = model_config
        self.layer_range = layer_range
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.is_first = layer_range.is_first()
        self.is_last = layer_range.is_last(model_config.num_layers)
        num_local_layers = layer_range.end - layer_range.start
        # Every tensor of a step lives where the model's weights do (--device).
        self.device = _device_of(model)
        kv_layout = kv_config or model_config
        if self.device.type == "cpu":
            per_block = KVCache.bytes_per_block(kv_layout, num_local_layers, block_size, dtype)
            check_host_room(per_block * num_blocks)
        self.kv_cache = KVCache.allocate(
            kv_layout, num_local_layers, num_blocks, block_size, dtype, self.device
        )
        RESIDENT.add("kv_cache", self.kv_cache.nbytes)
        self.graphs = capture_decode_graphs(model, self.kv_cache, graphs)
        self.sampler = (
            Sampler(model_config.eos_token_ids, model_config.vocab_size, grammars=grammars)
            if self.is_last
            else None
        )
        # None: block ids come with each plan from this process's own scheduler.
        self.block_pool = StageBlockPool(num_blocks, block_size) if owns_blocks else None
        self._block_tables: dict[SeqKey, list[int]] = {}
        self._sampling_states: dict[SeqKey, SequenceSamplingState] = {}

    @property
    def num_sequences(self) -> int:
        return len(self._block_tables)

    def release(self, seq_ids: list[int], head_id: str = "") -> None:
        for seq_id in seq_ids:
            key = (head_id, seq_id)
            self._block_tables.pop(key, None)
            self._sampling_states.pop(key, None)
            if self.block_pool is not None:
                self.block_pool.free(key)

    def execute(
        self, plan: StepPlan, hidden: torch.Tensor | None, head_id: str = ""
    ) -> torch.Tensor | StepResult:
        (result,) = self.execute_many([(plan, hidden)], head_id)
        if isinstance(result, ProtocolError | KVRoomError):
            raise result
        return result

    @torch.inference_mode()
    def execute_many(
        self, steps: Sequence[tuple[StepPlan, torch.Tensor | None]], head_id: str = ""
    ) -> list[torch.Tensor | StepResult | PlanFailure]:
        """Several plans of disjoint sequences (micro-batches queued here together) in one
        forward pass, so that the weights stream from memory once for all of them. Each
        plan is checked on its own: one that fails comes back as its ProtocolError (or
        KVRoomError, with none of its new sequences kept) and the others still run. Results are in the order of ``steps``; hidden states are row
        slices of one output."""
        results: list[torch.Tensor | StepResult | PlanFailure | None] = [None] * len(steps)
        chunks: list[SeqChunk] = []
        inputs: list[torch.Tensor] = []
        running: list[int] = []  # indexes of the plans in the forward pass
        for index, (plan, hidden) in enumerate(steps):
            try:
                self.release(list(plan.finished_seq_ids), head_id)
                self._register_new_sequences(plan, head_id)
                plan_chunks = self._chunks(plan, head_id)
                plan_inputs = None if plan.is_empty else self._inputs(plan, hidden)
            except (ProtocolError, KVRoomError) as exc:
                if isinstance(exc, KVRoomError):  # keep nothing of a refused plan
                    self.release([n.seq_id for n in plan.new_sequences], head_id)
                results[index] = exc
                continue
            if plan_inputs is None:
                results[index] = StepResult(step_id=plan.step_id, micro_batch=plan.micro_batch)
                continue
            chunks += plan_chunks
            inputs.append(plan_inputs)
            running.append(index)
        if running:
            meta = AttentionMetadata.build(chunks, self.block_size, device=self.device)
            batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
            if self.graphs is not None and self.graphs.can_run(meta):
                output = self.graphs.run(batch, meta)
            else:
                output = self.model(batch, meta, self.kv_cache)
            plans = [steps[i][0] for i in running]
            if self.is_last:
                outputs: list[torch.Tensor | StepResult] = list(
                    self._sample(plans, output, head_id)
                )
            else:
                outputs = list(output.split([p.num_tokens for p in plans]))
            for index, result in zip(running, outputs, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def _register_new_sequences(self, plan: StepPlan, head_id: str) -> None:
        for new_seq in plan.new_sequences:
            key = (head_id, new_seq.seq_id)
            # A re-sent sequence (preemption, replay) starts from scratch.
            self._block_tables[key] = [] if self.block_pool is None else self.block_pool.add(key)
            if self.sampler is not None:
                state = SequenceSamplingState(
                    params=new_seq.sampling,
                    token_ids=list(new_seq.token_ids),
                    num_prompt_tokens=new_seq.num_prompt_tokens,
                )
                self.sampler.attach(state)
                self._sampling_states[key] = state

    def _chunks(self, plan: StepPlan, head_id: str) -> list[SeqChunk]:
        tables = []
        for sched in plan.scheduled:
            table = self._block_tables.get((head_id, sched.seq_id))
            if table is None:
                raise ProtocolError(f"unknown sequence id {sched.seq_id} in step {plan.step_id}")
            if self.block_pool is not None and sched.new_block_ids:
                raise ProtocolError("block ids are this node's own; a plan cannot name them")
            self._check_blocks(sched.new_block_ids)
            tables.append(table)
        if self.block_pool is not None:
            self.block_pool.grow(
                {
                    (head_id, sched.seq_id): sched.num_computed_tokens + sched.num_new_tokens
                    for sched in plan.scheduled
                }
            )
        chunks = []
        for sched, table in zip(plan.scheduled, tables, strict=True):
            table.extend(sched.new_block_ids)
            end = sched.num_computed_tokens + sched.num_new_tokens
            if sched.num_new_tokens < 1 or end > len(table) * self.block_size:
                raise ProtocolError(
                    f"sequence {sched.seq_id}: {end} tokens do not fit its "
                    f"{len(table)} blocks of {self.block_size}"
                )
            chunks.append(SeqChunk(sched.num_computed_tokens, sched.num_new_tokens, table))
        return chunks

    def _check_blocks(self, block_ids: tuple[int, ...]) -> None:
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ProtocolError(f"block id {block_id} outside [0, {self.num_blocks})")

    def _inputs(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.is_first:
            if len(plan.token_ids) != plan.num_tokens:
                raise ProtocolError(
                    f"step {plan.step_id} has {len(plan.token_ids)} token ids for "
                    f"{plan.num_tokens} scheduled tokens"
                )
            return torch.tensor(plan.token_ids, dtype=torch.long, device=self.device)
        expected = (plan.num_tokens, self.model_config.hidden_size)
        if hidden is None or tuple(hidden.shape) != expected:
            got = None if hidden is None else tuple(hidden.shape)
            raise ProtocolError(f"step {plan.step_id}: hidden states {got}, expected {expected}")
        # Hidden states arrive as host bytes (or from a stage on another device).
        return hidden.to(self.device, non_blocking=True)

    def _sample(
        self, plans: Sequence[StepPlan], output: torch.Tensor, head_id: str
    ) -> list[StepResult]:
        """Samples the rows of ``plans`` (laid out one after the other in ``output``) with
        one LM-head matmul and one sampler call; one StepResult per plan. A sequence whose
        sampling fails gets a token with ``error`` set; the others are unaffected."""
        assert self.sampler is not None
        rows, states, seq_ids, owners = [], [], [], []
        offset = 0
        for index, plan in enumerate(plans):
            for sched in plan.scheduled:
                state = self._sampling_states[(head_id, sched.seq_id)]
                if state.params.prompt_logprobs is not None and state.num_output_tokens == 0:
                    self._gather_prompt_logprobs(state, sched, output[offset:])
                offset += sched.num_new_tokens
                if sched.sample:
                    rows.append(offset - 1)
                    states.append(state)
                    seq_ids.append(sched.seq_id)
                    owners.append(index)
        tokens: list[list[SampledToken]] = [[] for _ in plans]
        if rows:
            # The sampler works on host tensors: only the sampled rows' logits cross over.
            logits = self.model.compute_logits(output[rows]).cpu()
            sampled = self.sampler.sample_isolated(logits, states)
            for seq_id, state, owner, result in zip(seq_ids, states, owners, sampled, strict=True):
                tokens[owner].append(self._sampled_token(seq_id, state, result))
        return [
            StepResult(step_id=plan.step_id, sampled=tuple(own), micro_batch=plan.micro_batch)
            for plan, own in zip(plans, tokens, strict=True)
        ]

    def _sampled_token(self, seq_id: int, state: SequenceSamplingState, result) -> SampledToken:
        assert self.sampler is not None
        if isinstance(result, MolinkError):
            logger.warning("sequence %d failed on this stage: %s", seq_id, result)
            return SampledToken(seq_id, 0, error=str(result))
        token_id, logprob, top = result
        prompt_logprobs = tuple(state.prompt_logprobs)
        state.prompt_logprobs = []
        try:
            self.sampler.accept(state, token_id)
        except MolinkError as exc:
            logger.warning("sequence %d failed on this stage: %s", seq_id, exc)
            return SampledToken(seq_id, token_id, error=str(exc))
        return SampledToken(seq_id, token_id, logprob, top, prompt_logprobs=prompt_logprobs)

    def _gather_prompt_logprobs(
        self, state: SequenceSamplingState, sched: ScheduledSequence, hidden: torch.Tensor
    ) -> None:
        """Logprobs of the prompt tokens this chunk's rows predict."""
        first = sched.num_computed_tokens
        last_target = min(first + sched.num_new_tokens, state.num_prompt_tokens - 1)
        if last_target <= first:
            return
        if first == 0:
            state.prompt_logprobs = []
        targets = state.token_ids[first + 1 : last_target + 1]
        logits = self.model.compute_logits(hidden[: len(targets)])[:, : self.sampler.vocab_size]
        logits = logits.cpu()
        num_top = state.params.prompt_logprobs or 0
        state.prompt_logprobs.extend(prompt_token_logprobs(logits, targets, num_top))


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights (a slice without any is on the CPU)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")

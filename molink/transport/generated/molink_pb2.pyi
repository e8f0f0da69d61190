from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT32: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT16: _ClassVar[WireDtype]
    WIRE_DTYPE_BFLOAT16: _ClassVar[WireDtype]
    WIRE_DTYPE_INT8: _ClassVar[WireDtype]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    FAILURE_KIND_KV_FULL: _ClassVar[FailureKind]
    FAILURE_KIND_REJECTED: _ClassVar[FailureKind]
    FAILURE_KIND_NODE_ERROR: _ClassVar[FailureKind]
    FAILURE_KIND_UNREACHABLE: _ClassVar[FailureKind]
    FAILURE_KIND_DEADLINE: _ClassVar[FailureKind]

class HealthStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATUS_UNSPECIFIED: _ClassVar[HealthStatus]
    HEALTH_STATUS_SERVING: _ClassVar[HealthStatus]
    HEALTH_STATUS_DEGRADED: _ClassVar[HealthStatus]
WIRE_DTYPE_UNSPECIFIED: WireDtype
WIRE_DTYPE_FLOAT32: WireDtype
WIRE_DTYPE_FLOAT16: WireDtype
WIRE_DTYPE_BFLOAT16: WireDtype
WIRE_DTYPE_INT8: WireDtype
FAILURE_KIND_UNSPECIFIED: FailureKind
FAILURE_KIND_KV_FULL: FailureKind
FAILURE_KIND_REJECTED: FailureKind
FAILURE_KIND_NODE_ERROR: FailureKind
FAILURE_KIND_UNREACHABLE: FailureKind
FAILURE_KIND_DEADLINE: FailureKind
HEALTH_STATUS_UNSPECIFIED: HealthStatus
HEALTH_STATUS_SERVING: HealthStatus
HEALTH_STATUS_DEGRADED: HealthStatus

class ModelIdentity(_message.Message):
    __slots__ = ("served_name", "fingerprint", "num_layers", "hidden_size", "vocab_size")
    SERVED_NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    served_name: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    def __init__(self, served_name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class LayerSpan(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "model", "layers", "num_kv_blocks", "block_size", "dtype", "wire_dtype", "protocol_version", "address", "public_key", "free_kv_blocks", "throughput_tokens_per_s", "dht_address", "device", "memory_total_bytes", "memory_free_bytes", "layer_step_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DHT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_STEP_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model: ModelIdentity
    layers: LayerSpan
    num_kv_blocks: int
    block_size: int
    dtype: str
    wire_dtype: str
    protocol_version: int
    address: str
    public_key: bytes
    free_kv_blocks: int
    throughput_tokens_per_s: float
    dht_address: str
    device: str
    memory_total_bytes: int
    memory_free_bytes: int
    layer_step_s: float
    def __init__(self, node_id: _Optional[str] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., layers: _Optional[_Union[LayerSpan, _Mapping]] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., wire_dtype: _Optional[str] = ..., protocol_version: _Optional[int] = ..., address: _Optional[str] = ..., public_key: _Optional[bytes] = ..., free_kv_blocks: _Optional[int] = ..., throughput_tokens_per_s: _Optional[float] = ..., dht_address: _Optional[str] = ..., device: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., layer_step_s: _Optional[float] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("scheme", "token")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    token: bytes
    def __init__(self, scheme: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node", "credentials")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    credentials: Credentials
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class Pipeline(_message.Message):
    __slots__ = ("head_id", "head_address", "epoch", "stages", "num_layers", "missing", "readiness", "links", "timings", "hidden_bytes_per_token", "banned")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    READINESS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    head_address: str
    epoch: int
    stages: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    num_layers: int
    missing: _containers.RepeatedCompositeFieldContainer[LayerSpan]
    readiness: str
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    timings: _containers.RepeatedCompositeFieldContainer[StageTimingReport]
    hidden_bytes_per_token: int
    banned: _containers.RepeatedCompositeFieldContainer[BannedNode]
    def __init__(self, head_id: _Optional[str] = ..., head_address: _Optional[str] = ..., epoch: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., num_layers: _Optional[int] = ..., missing: _Optional[_Iterable[_Union[LayerSpan, _Mapping]]] = ..., readiness: _Optional[str] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTimingReport, _Mapping]]] = ..., hidden_bytes_per_token: _Optional[int] = ..., banned: _Optional[_Iterable[_Union[BannedNode, _Mapping]]] = ...) -> None: ...

class BannedNode(_message.Message):
    __slots__ = ("node_id", "reason", "banned_at")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BANNED_AT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    banned_at: float
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ..., banned_at: _Optional[float] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("head_id", "from_node_id", "to_node_id", "bandwidth_bytes_per_s", "rtt_s", "samples")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    from_node_id: str
    to_node_id: str
    bandwidth_bytes_per_s: float
    rtt_s: float
    samples: int
    def __init__(self, head_id: _Optional[str] = ..., from_node_id: _Optional[str] = ..., to_node_id: _Optional[str] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., rtt_s: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class StageTimingReport(_message.Message):
    __slots__ = ("node_id", "compute_s_per_step", "compute_s_per_token", "samples")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    compute_s_per_step: float
    compute_s_per_token: float
    samples: int
    def __init__(self, node_id: _Optional[str] = ..., compute_s_per_step: _Optional[float] = ..., compute_s_per_token: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("accepted", "reason", "pipeline")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    pipeline: Pipeline
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., pipeline: _Optional[_Union[Pipeline, _Mapping]] = ...) -> None: ...

class GetPipelineRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdatePipelineResponse(_message.Message):
    __slots__ = ("applied", "reason")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    reason: str
    def __init__(self, applied: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "ignore_eos", "logprobs", "skip_special_tokens", "include_stop_str_in_output", "spaces_between_special_tokens", "logit_bias", "structured", "prompt_logprobs", "allowed_token_ids", "bad_words")
    N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SPACES_BETWEEN_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    logprobs: int
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    spaces_between_special_tokens: bool
    logit_bias: _containers.RepeatedCompositeFieldContainer[LogitBias]
    structured: StructuredOutput
    prompt_logprobs: int
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    def __init__(self, n: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., skip_special_tokens: _Optional[bool] = ..., include_stop_str_in_output: _Optional[bool] = ..., spaces_between_special_tokens: _Optional[bool] = ..., logit_bias: _Optional[_Iterable[_Union[LogitBias, _Mapping]]] = ..., structured: _Optional[_Union[StructuredOutput, _Mapping]] = ..., prompt_logprobs: _Optional[int] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LogitBias(_message.Message):
    __slots__ = ("token_id", "bias")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    bias: float
    def __init__(self, token_id: _Optional[int] = ..., bias: _Optional[float] = ...) -> None: ...

class StructuredOutput(_message.Message):
    __slots__ = ("kind", "spec")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    kind: str
    spec: str
    def __init__(self, kind: _Optional[str] = ..., spec: _Optional[str] = ...) -> None: ...

class NewSequence(_message.Message):
    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "sampling")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class ScheduledSequence(_message.Message):
    __slots__ = ("seq_id", "num_computed_tokens", "num_new_tokens", "new_block_ids", "sample")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    num_computed_tokens: int
    num_new_tokens: int
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    def __init__(self, seq_id: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., num_new_tokens: _Optional[int] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("step_id", "scheduled", "token_ids", "new_sequences", "finished_seq_ids", "micro_batch", "witness")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    WITNESS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    scheduled: _containers.RepeatedCompositeFieldContainer[ScheduledSequence]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    new_sequences: _containers.RepeatedCompositeFieldContainer[NewSequence]
    finished_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    micro_batch: int
    witness: WitnessDeclaration
    def __init__(self, step_id: _Optional[int] = ..., scheduled: _Optional[_Iterable[_Union[ScheduledSequence, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., new_sequences: _Optional[_Iterable[_Union[NewSequence, _Mapping]]] = ..., finished_seq_ids: _Optional[_Iterable[int]] = ..., micro_batch: _Optional[int] = ..., witness: _Optional[_Union[WitnessDeclaration, _Mapping]] = ...) -> None: ...

class WitnessDeclaration(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scale", "outliers_per_row", "outlier_columns", "outlier_values")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    OUTLIERS_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    dtype: WireDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: bytes
    outliers_per_row: int
    outlier_columns: bytes
    outlier_values: bytes
    def __init__(self, dtype: _Optional[_Union[WireDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[bytes] = ..., outliers_per_row: _Optional[int] = ..., outlier_columns: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ...) -> None: ...

class HopTrace(_message.Message):
    __slots__ = ("node_id", "bytes_received", "queue_s", "compute_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    bytes_received: int
    queue_s: float
    compute_s: float
    def __init__(self, node_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., queue_s: _Optional[float] = ..., compute_s: _Optional[float] = ...) -> None: ...

class StepPayload(_message.Message):
    __slots__ = ("plan", "hidden", "trace")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    plan: StepPlan
    hidden: Tensor
    trace: _containers.RepeatedCompositeFieldContainer[HopTrace]
    def __init__(self, plan: _Optional[_Union[StepPlan, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., trace: _Optional[_Iterable[_Union[HopTrace, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("head_id", "seq_ids", "started_before_step")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_BEFORE_STEP_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    started_before_step: int
    def __init__(self, head_id: _Optional[str] = ..., seq_ids: _Optional[_Iterable[int]] = ..., started_before_step: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class RouteHop(_message.Message):
    __slots__ = ("node_id", "address", "layers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    layers: LayerSpan
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[LayerSpan, _Mapping]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("hops", "head_address", "seal")
    HOPS_FIELD_NUMBER: _ClassVar[int]
    HEAD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    hops: _containers.RepeatedCompositeFieldContainer[RouteHop]
    head_address: str
    seal: RouteSeal
    def __init__(self, hops: _Optional[_Iterable[_Union[RouteHop, _Mapping]]] = ..., head_address: _Optional[str] = ..., seal: _Optional[_Union[RouteSeal, _Mapping]] = ...) -> None: ...

class RouteSeal(_message.Message):
    __slots__ = ("version", "public_key", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    public_key: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("head_id", "epoch", "sender_id", "step", "release", "route")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    epoch: int
    sender_id: str
    step: StepPayload
    release: ReleaseRequest
    route: Route
    def __init__(self, head_id: _Optional[str] = ..., epoch: _Optional[int] = ..., sender_id: _Optional[str] = ..., step: _Optional[_Union[StepPayload, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class ForwardAck(_message.Message):
    __slots__ = ("step_id", "micro_batch", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    micro_batch: int
    error: str
    def __init__(self, step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob", "top_logprobs", "error", "prompt_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    error: str
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[PromptTokenLogprob]
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., error: _Optional[str] = ..., prompt_logprobs: _Optional[_Iterable[_Union[PromptTokenLogprob, _Mapping]]] = ...) -> None: ...

class PromptTokenLogprob(_message.Message):
    __slots__ = ("logprob", "top", "rank")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    rank: int
    def __init__(self, logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., rank: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "sampled", "micro_batch", "error", "trace", "failure_kind", "failed_node_id")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    FAILED_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    sampled: _containers.RepeatedCompositeFieldContainer[SampledToken]
    micro_batch: int
    error: str
    trace: _containers.RepeatedCompositeFieldContainer[HopTrace]
    failure_kind: FailureKind
    failed_node_id: str
    def __init__(self, step_id: _Optional[int] = ..., sampled: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., micro_batch: _Optional[int] = ..., error: _Optional[str] = ..., trace: _Optional[_Iterable[_Union[HopTrace, _Mapping]]] = ..., failure_kind: _Optional[_Union[FailureKind, str]] = ..., failed_node_id: _Optional[str] = ...) -> None: ...

class ReturnResultsRequest(_message.Message):
    __slots__ = ("head_id", "sender_id", "result")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    sender_id: str
    result: StepResult
    def __init__(self, head_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class ReturnResultsAck(_message.Message):
    __slots__ = ("step_id", "micro_batch")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    micro_batch: int
    def __init__(self, step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class WitnessQuery(_message.Message):
    __slots__ = ("step_id", "micro_batch", "seq_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    micro_batch: int
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ..., seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class WitnessRequest(_message.Message):
    __slots__ = ("head_id", "queries")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    queries: _containers.RepeatedCompositeFieldContainer[WitnessQuery]
    def __init__(self, head_id: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[WitnessQuery, _Mapping]]] = ...) -> None: ...

class WitnessAnswer(_message.Message):
    __slots__ = ("rows", "missing")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    missing: str
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ..., missing: _Optional[str] = ...) -> None: ...

class WitnessResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[WitnessAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[WitnessAnswer, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("head_id",)
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    def __init__(self, head_id: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "message", "steps_processed", "steps_rejected", "bytes_sent", "bytes_received", "queued_steps", "active_sequences", "pipeline_epoch", "uptime_s", "links", "total_kv_blocks", "free_kv_blocks", "heads", "throughput_tokens_per_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    STEPS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    status: HealthStatus
    message: str
    steps_processed: int
    steps_rejected: int
    bytes_sent: int
    bytes_received: int
    queued_steps: int
    active_sequences: int
    pipeline_epoch: int
    uptime_s: float
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    total_kv_blocks: int
    free_kv_blocks: int
    heads: _containers.RepeatedCompositeFieldContainer[HeadUsage]
    throughput_tokens_per_s: float
    def __init__(self, status: _Optional[_Union[HealthStatus, str]] = ..., message: _Optional[str] = ..., steps_processed: _Optional[int] = ..., steps_rejected: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., queued_steps: _Optional[int] = ..., active_sequences: _Optional[int] = ..., pipeline_epoch: _Optional[int] = ..., uptime_s: _Optional[float] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., total_kv_blocks: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[HeadUsage, _Mapping]]] = ..., throughput_tokens_per_s: _Optional[float] = ...) -> None: ...

class HeadUsage(_message.Message):
    __slots__ = ("head_id", "sequences", "kv_blocks")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    sequences: int
    kv_blocks: int
    def __init__(self, head_id: _Optional[str] = ..., sequences: _Optional[int] = ..., kv_blocks: _Optional[int] = ...) -> None: ...

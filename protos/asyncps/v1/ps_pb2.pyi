from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "lr", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps", "staleness_aware_lr", "average_gradients", "warmup_updates", "balance_batches", "update_rule", "dc_lambda", "history_versions", "local_steps", "outer_period", "lr_follows_split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_AWARE_LR_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_UPDATES_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RULE_FIELD_NUMBER: _ClassVar[int]
    DC_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    HISTORY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTER_PERIOD_FIELD_NUMBER: _ClassVar[int]
    LR_FOLLOWS_SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    staleness_aware_lr: bool
    average_gradients: bool
    warmup_updates: int
    balance_batches: bool
    update_rule: str
    dc_lambda: float
    history_versions: int
    local_steps: int
    outer_period: int
    lr_follows_split: bool
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., staleness_aware_lr: _Optional[bool] = ..., average_gradients: _Optional[bool] = ..., warmup_updates: _Optional[int] = ..., balance_batches: _Optional[bool] = ..., update_rule: _Optional[str] = ..., dc_lambda: _Optional[float] = ..., history_versions: _Optional[int] = ..., local_steps: _Optional[int] = ..., outer_period: _Optional[int] = ..., lr_follows_split: _Optional[bool] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("offset", "dtype", "shape")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offset: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class InitHeader(_message.Message):
    __slots__ = ("plan_hash", "shard_index", "num_shards", "numel", "optimizer", "worker_id", "staleness", "groups")
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    plan_hash: str
    shard_index: int
    num_shards: int
    numel: int
    optimizer: OptimizerConfig
    worker_id: str
    staleness: float
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    def __init__(self, plan_hash: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., numel: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., worker_id: _Optional[str] = ..., staleness: _Optional[float] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ...) -> None: ...

class ParamGroup(_message.Message):
    __slots__ = ("start", "stop", "optimizer")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    optimizer: OptimizerConfig
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "session", "plan_hash", "clock", "read_version", "samples", "busy_seconds", "compression")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    READ_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    plan_hash: str
    clock: int
    read_version: int
    samples: int
    busy_seconds: float
    compression: str
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ..., plan_hash: _Optional[str] = ..., clock: _Optional[int] = ..., read_version: _Optional[int] = ..., samples: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., compression: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "numel", "min_clock", "waited_seconds", "batch_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    numel: int
    min_clock: int
    waited_seconds: float
    batch_size: int
    def __init__(self, version: _Optional[int] = ..., numel: _Optional[int] = ..., min_clock: _Optional[int] = ..., waited_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("init", "push", "pull", "entry", "tensor", "data")
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    init: InitHeader
    push: PushHeader
    pull: PullHeader
    entry: ReplicaEntry
    tensor: TensorHeader
    data: bytes
    def __init__(self, init: _Optional[_Union[InitHeader, _Mapping]] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullHeader, _Mapping]] = ..., entry: _Optional[_Union[ReplicaEntry, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "plan_hash", "start_clock", "seen_version", "seen_incarnation", "batch_size", "compression")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    START_CLOCK_FIELD_NUMBER: _ClassVar[int]
    SEEN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEN_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    plan_hash: str
    start_clock: int
    seen_version: int
    seen_incarnation: int
    batch_size: int
    compression: str
    def __init__(self, worker_id: _Optional[str] = ..., plan_hash: _Optional[str] = ..., start_clock: _Optional[int] = ..., seen_version: _Optional[int] = ..., seen_incarnation: _Optional[int] = ..., batch_size: _Optional[int] = ..., compression: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("session", "clock", "staleness", "heartbeat_timeout_seconds", "incarnation", "data_port", "compression")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    session: int
    clock: int
    staleness: float
    heartbeat_timeout_seconds: float
    incarnation: int
    data_port: int
    compression: str
    def __init__(self, session: _Optional[int] = ..., clock: _Optional[int] = ..., staleness: _Optional[float] = ..., heartbeat_timeout_seconds: _Optional[float] = ..., incarnation: _Optional[int] = ..., data_port: _Optional[int] = ..., compression: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("min_clock", "live_workers")
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    min_clock: int
    live_workers: int
    def __init__(self, min_clock: _Optional[int] = ..., live_workers: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("accepted", "plan_hash", "version", "optimizer", "staleness", "groups")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    plan_hash: str
    version: int
    optimizer: OptimizerConfig
    staleness: float
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    def __init__(self, accepted: _Optional[bool] = ..., plan_hash: _Optional[str] = ..., version: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., staleness: _Optional[float] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "staleness")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    version: int
    staleness: int
    def __init__(self, version: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "session", "plan_hash", "clock", "own_lag", "chunk_bytes", "compression")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    OWN_LAG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: int
    plan_hash: str
    clock: int
    own_lag: int
    chunk_bytes: int
    compression: str
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[int] = ..., plan_hash: _Optional[str] = ..., clock: _Optional[int] = ..., own_lag: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., compression: _Optional[str] = ...) -> None: ...

class WorkerClock(_message.Message):
    __slots__ = ("worker_id", "clock", "seconds_since_seen")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    clock: int
    seconds_since_seen: float
    def __init__(self, worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("include_checksum",)
    INCLUDE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    include_checksum: bool
    def __init__(self, include_checksum: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("shard_index", "num_shards", "initialized", "plan_hash", "version", "numel", "clocks", "min_clock", "live_workers", "staleness", "max_read_gap", "pulls_waited", "wait_seconds", "pushes_applied", "pushes_rejected", "evictions", "weights_checksum", "optimizer", "checkpoint_version", "lost_updates", "incarnation", "restored_version", "data_port", "role", "epoch", "members")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    MAX_READ_GAP_FIELD_NUMBER: _ClassVar[int]
    PULLS_WAITED_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOST_UPDATES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    initialized: bool
    plan_hash: str
    version: int
    numel: int
    clocks: _containers.RepeatedCompositeFieldContainer[WorkerClock]
    min_clock: int
    live_workers: int
    staleness: float
    max_read_gap: int
    pulls_waited: int
    wait_seconds: float
    pushes_applied: int
    pushes_rejected: int
    evictions: int
    weights_checksum: float
    optimizer: OptimizerConfig
    checkpoint_version: int
    lost_updates: int
    incarnation: int
    restored_version: int
    data_port: int
    role: str
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., initialized: _Optional[bool] = ..., plan_hash: _Optional[str] = ..., version: _Optional[int] = ..., numel: _Optional[int] = ..., clocks: _Optional[_Iterable[_Union[WorkerClock, _Mapping]]] = ..., min_clock: _Optional[int] = ..., live_workers: _Optional[int] = ..., staleness: _Optional[float] = ..., max_read_gap: _Optional[int] = ..., pulls_waited: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., pushes_applied: _Optional[int] = ..., pushes_rejected: _Optional[int] = ..., evictions: _Optional[int] = ..., weights_checksum: _Optional[float] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., checkpoint_version: _Optional[int] = ..., lost_updates: _Optional[int] = ..., incarnation: _Optional[int] = ..., restored_version: _Optional[int] = ..., data_port: _Optional[int] = ..., role: _Optional[str] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RegisterEntry(_message.Message):
    __slots__ = ("request", "session")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    request: RegisterRequest
    session: int
    def __init__(self, request: _Optional[_Union[RegisterRequest, _Mapping]] = ..., session: _Optional[int] = ...) -> None: ...

class EvictEntry(_message.Message):
    __slots__ = ("worker_ids",)
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SplitEntry(_message.Message):
    __slots__ = ("clock", "batches")
    class BatchesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    clock: int
    batches: _containers.ScalarMap[str, int]
    def __init__(self, clock: _Optional[int] = ..., batches: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StateEntry(_message.Message):
    __slots__ = ("bytes", "members")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaEntry(_message.Message):
    __slots__ = ("epoch", "seq", "init", "push", "register", "leave", "evict", "state", "ping", "split")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seq: int
    init: InitHeader
    push: PushHeader
    register: RegisterEntry
    leave: LeaveRequest
    evict: EvictEntry
    state: StateEntry
    ping: bool
    split: SplitEntry
    def __init__(self, epoch: _Optional[int] = ..., seq: _Optional[int] = ..., init: _Optional[_Union[InitHeader, _Mapping]] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., register: _Optional[_Union[RegisterEntry, _Mapping]] = ..., leave: _Optional[_Union[LeaveRequest, _Mapping]] = ..., evict: _Optional[_Union[EvictEntry, _Mapping]] = ..., state: _Optional[_Union[StateEntry, _Mapping]] = ..., ping: _Optional[bool] = ..., split: _Optional[_Union[SplitEntry, _Mapping]] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("epoch", "version")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    version: int
    def __init__(self, epoch: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("address", "shard_index", "num_shards")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    shard_index: int
    num_shards: int
    def __init__(self, address: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("epoch", "members", "seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class ChainConfig(_message.Message):
    __slots__ = ("shard_index", "epoch", "members")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_index: _Optional[int] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigRequest(_message.Message):
    __slots__ = ("shard_index",)
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    def __init__(self, shard_index: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("shard_index", "from_epoch", "caller", "members")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    from_epoch: int
    caller: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_index: _Optional[int] = ..., from_epoch: _Optional[int] = ..., caller: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("acquired", "config")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    acquired: bool
    config: ChainConfig
    def __init__(self, acquired: _Optional[bool] = ..., config: _Optional[_Union[ChainConfig, _Mapping]] = ...) -> None: ...

class DataHello(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class DataRequest(_message.Message):
    __slots__ = ("hello", "pull", "push", "payload_bytes", "stripe")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    hello: DataHello
    pull: PullRequest
    push: PushHeader
    payload_bytes: int
    stripe: Stripe
    def __init__(self, hello: _Optional[_Union[DataHello, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., stripe: _Optional[_Union[Stripe, _Mapping]] = ...) -> None: ...

class Stripe(_message.Message):
    __slots__ = ("id", "index", "count")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    id: int
    index: int
    count: int
    def __init__(self, id: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class DataResponse(_message.Message):
    __slots__ = ("code", "message", "reason", "pull", "push", "payload_bytes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    pull: PullHeader
    push: PushResponse
    payload_bytes: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., pull: _Optional[_Union[PullHeader, _Mapping]] = ..., push: _Optional[_Union[PushResponse, _Mapping]] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

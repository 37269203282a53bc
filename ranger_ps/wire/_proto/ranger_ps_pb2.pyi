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
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT8: DType

class ParamSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LayoutSpec(_message.Message):
    __slots__ = ("params", "block_size", "fingerprint")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    block_size: int
    fingerprint: str
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., block_size: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class RuleSpec(_message.Message):
    __slots__ = ("msgpack",)
    MSGPACK_FIELD_NUMBER: _ClassVar[int]
    msgpack: bytes
    def __init__(self, msgpack: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "layout", "rule", "expected_shard_id", "expected_num_shards", "observer", "consistency", "shared_memory", "identity", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    layout: LayoutSpec
    rule: RuleSpec
    expected_shard_id: int
    expected_num_shards: int
    observer: bool
    consistency: str
    shared_memory: SharedMemoryOffer
    identity: bool
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., layout: _Optional[_Union[LayoutSpec, _Mapping]] = ..., rule: _Optional[_Union[RuleSpec, _Mapping]] = ..., expected_shard_id: _Optional[int] = ..., expected_num_shards: _Optional[int] = ..., observer: _Optional[bool] = ..., consistency: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemoryOffer, _Mapping]] = ..., identity: _Optional[bool] = ..., secret: _Optional[bytes] = ...) -> None: ...

class SharedMemoryOffer(_message.Message):
    __slots__ = ("path", "nonce", "request_bytes", "reply_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    nonce: bytes
    request_bytes: int
    reply_bytes: int
    def __init__(self, path: _Optional[str] = ..., nonce: _Optional[bytes] = ..., request_bytes: _Optional[int] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "shard_id", "num_shards", "must_initialize", "block_ids", "clock", "lease_seconds", "consistency", "exchange", "shared_memory", "pushed_clock", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    MUST_INITIALIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PUSHED_CLOCK_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    shard_id: int
    num_shards: int
    must_initialize: bool
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    clock: int
    lease_seconds: float
    consistency: str
    exchange: bool
    shared_memory: bool
    pushed_clock: int
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., must_initialize: _Optional[bool] = ..., block_ids: _Optional[_Iterable[int]] = ..., clock: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., consistency: _Optional[str] = ..., exchange: _Optional[bool] = ..., shared_memory: _Optional[bool] = ..., pushed_clock: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class BlockEntry(_message.Message):
    __slots__ = ("block_id", "version", "dtype", "nbytes", "scale")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    block_id: int
    version: int
    dtype: DType
    nbytes: int
    scale: float
    def __init__(self, block_id: _Optional[int] = ..., version: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., nbytes: _Optional[int] = ..., scale: _Optional[float] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "clock", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    clock: int
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class InitHeader(_message.Message):
    __slots__ = ("worker_id", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class FrameHeader(_message.Message):
    __slots__ = ("blocks", "push", "init", "exchange", "runs")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockEntry]
    push: PushHeader
    init: InitHeader
    exchange: ExchangeHeader
    runs: _containers.RepeatedCompositeFieldContainer[BlockRun]
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockEntry, _Mapping]]] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., init: _Optional[_Union[InitHeader, _Mapping]] = ..., exchange: _Optional[_Union[ExchangeHeader, _Mapping]] = ..., runs: _Optional[_Iterable[_Union[BlockRun, _Mapping]]] = ...) -> None: ...

class BlockRun(_message.Message):
    __slots__ = ("dtype", "block_ids", "versions", "scales", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    block_ids: bytes
    versions: bytes
    scales: bytes
    nbytes: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., block_ids: _Optional[bytes] = ..., versions: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ExchangeHeader(_message.Message):
    __slots__ = ("worker_id", "clock", "more", "known_versions", "shared", "shared_offset", "blocks_applied", "version_sum", "no_pull", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    SHARED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    VERSION_SUM_FIELD_NUMBER: _ClassVar[int]
    NO_PULL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    clock: int
    more: bool
    known_versions: bytes
    shared: bool
    shared_offset: int
    blocks_applied: int
    version_sum: int
    no_pull: bool
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., more: _Optional[bool] = ..., known_versions: _Optional[bytes] = ..., shared: _Optional[bool] = ..., shared_offset: _Optional[int] = ..., blocks_applied: _Optional[int] = ..., version_sum: _Optional[int] = ..., no_pull: _Optional[bool] = ..., secret: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class InitReply(_message.Message):
    __slots__ = ("blocks_initialized",)
    BLOCKS_INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    blocks_initialized: int
    def __init__(self, blocks_initialized: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("blocks_applied", "version_sum")
    BLOCKS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    VERSION_SUM_FIELD_NUMBER: _ClassVar[int]
    blocks_applied: int
    version_sum: int
    def __init__(self, blocks_applied: _Optional[int] = ..., version_sum: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "known_versions", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    known_versions: _containers.RepeatedScalarFieldContainer[int]
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., known_versions: _Optional[_Iterable[int]] = ..., secret: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., secret: _Optional[bytes] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "clock", "pushes", "seconds_since_seen", "observer", "live")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    clock: int
    pushes: int
    seconds_since_seen: float
    observer: bool
    live: bool
    def __init__(self, worker_id: _Optional[int] = ..., clock: _Optional[int] = ..., pushes: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ..., observer: _Optional[bool] = ..., live: _Optional[bool] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("shard_id", "num_shards", "initialized", "layout_fingerprint", "rule", "num_blocks", "num_elements", "nbytes", "version_sum", "pushes_applied", "blocks_applied", "pulls_served", "bytes_received", "bytes_sent", "uptime_seconds", "workers", "version", "consistency", "applied_clock", "staleness_counts", "version_lag_counts")
    class StalenessCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class VersionLagCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_SUM_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PULLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_CLOCK_FIELD_NUMBER: _ClassVar[int]
    STALENESS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_LAG_COUNTS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    initialized: bool
    layout_fingerprint: str
    rule: str
    num_blocks: int
    num_elements: int
    nbytes: int
    version_sum: int
    pushes_applied: int
    blocks_applied: int
    pulls_served: int
    bytes_received: int
    bytes_sent: int
    uptime_seconds: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    version: str
    consistency: str
    applied_clock: int
    staleness_counts: _containers.ScalarMap[int, int]
    version_lag_counts: _containers.ScalarMap[int, int]
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., initialized: _Optional[bool] = ..., layout_fingerprint: _Optional[str] = ..., rule: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_elements: _Optional[int] = ..., nbytes: _Optional[int] = ..., version_sum: _Optional[int] = ..., pushes_applied: _Optional[int] = ..., blocks_applied: _Optional[int] = ..., pulls_served: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., version: _Optional[str] = ..., consistency: _Optional[str] = ..., applied_clock: _Optional[int] = ..., staleness_counts: _Optional[_Mapping[int, int]] = ..., version_lag_counts: _Optional[_Mapping[int, int]] = ...) -> None: ...

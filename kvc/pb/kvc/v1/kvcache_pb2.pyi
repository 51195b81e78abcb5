from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PageSpec(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "page_size", "dtype", "kv_parts")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_PARTS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str
    kv_parts: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., page_size: _Optional[int] = ..., dtype: _Optional[str] = ..., kv_parts: _Optional[int] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("architecture", "spec", "weights_digest", "adapter", "cache_salt")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    spec: PageSpec
    weights_digest: str
    adapter: str
    cache_salt: str
    def __init__(self, architecture: _Optional[str] = ..., spec: _Optional[_Union[PageSpec, _Mapping]] = ..., weights_digest: _Optional[str] = ..., adapter: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "tokens", "hashes", "tokens_u32le")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_U32LE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    tokens_u32le: bytes
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., tokens_u32le: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hashes", "tiers", "located", "root")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOCATED_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    tiers: _containers.ScalarMap[str, int]
    located: _containers.RepeatedScalarFieldContainer[str]
    root: bytes
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ..., tiers: _Optional[_Mapping[str, int]] = ..., located: _Optional[_Iterable[str]] = ..., root: _Optional[bytes] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PageHeader(_message.Message):
    __slots__ = ("hash", "parent", "tokens", "checksum", "payload_bytes")
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    parent: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    checksum: int
    payload_bytes: int
    def __init__(self, hash: _Optional[bytes] = ..., parent: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., checksum: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class PageFrame(_message.Message):
    __slots__ = ("header", "data", "shm_offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: PageHeader
    data: bytes
    shm_offset: int
    def __init__(self, header: _Optional[_Union[PageHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., shm_offset: _Optional[int] = ...) -> None: ...

class GetPagesRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "shm")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    shm: SharedMemory
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., shm: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class GetPagesResponse(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[PageFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[PageFrame, _Mapping]]] = ...) -> None: ...

class PutPagesRequest(_message.Message):
    __slots__ = ("namespace", "shm", "frames")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    shm: SharedMemory
    frames: _containers.RepeatedCompositeFieldContainer[PageFrame]
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., shm: _Optional[_Union[SharedMemory, _Mapping]] = ..., frames: _Optional[_Iterable[_Union[PageFrame, _Mapping]]] = ...) -> None: ...

class PutPagesResponse(_message.Message):
    __slots__ = ("stored", "duplicate", "rejected", "reasons")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicate: int
    rejected: int
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stored: _Optional[int] = ..., duplicate: _Optional[int] = ..., rejected: _Optional[int] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "ttl_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "whole_namespace")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    WHOLE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    whole_namespace: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., whole_namespace: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _struct_pb2.Struct
    def __init__(self, stats: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ...) -> None: ...

class CacheEvent(_message.Message):
    __slots__ = ("event_id", "kind", "namespace_root", "hash", "parent", "tier")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ROOT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    kind: str
    namespace_root: bytes
    hash: bytes
    parent: bytes
    tier: str
    def __init__(self, event_id: _Optional[int] = ..., kind: _Optional[str] = ..., namespace_root: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., parent: _Optional[bytes] = ..., tier: _Optional[str] = ...) -> None: ...

"""Wire messages: frozen, validated value objects with a msgpack round trip.

Each class mirrors one table of docs/protocol.md §Messages. ``encode()`` gives the bytes
to publish; ``decode(bytes)`` validates and raises ``ProtocolError(BAD_REQUEST)`` on
anything malformed, so a shell can answer with a named error instead of crashing.
Field names on the wire are the attribute names; ``v`` is the schema version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from typing import Any, ClassVar

import msgpack
from typing_extensions import Self  # typing.Self is 3.11+

from skyhop.batching import BatchPoint
from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.topics import NAME_RE

SCHEMA_VERSION = 1
MAX_BUDGET_MS = 3_600_000.0  # one hour: anything longer is a batch job, not inference
MAX_PRIORITY = 7


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def packb(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)  # msgpack ships no types
    return out


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise _bad(f"malformed msgpack: {exc}") from None


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _bad(f"{what} must be a name of 1-64 [A-Za-z0-9._-], got {value!r}")
    return value


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(value: Any, what: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(f"{what} must be finite and in [{lo}, {hi}], got {value!r}")
    return float(value)


def _str(value: Any, what: str, max_len: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _bad(f"{what} must be a string of at most {max_len} characters")
    return value


class _Message:
    """Shared msgpack codec: a dataclass whose ``validate()`` checks every field."""

    v: int
    KIND: ClassVar[str]

    def __post_init__(self) -> None:
        if type(self.v) is not int or self.v != SCHEMA_VERSION:
            raise _bad(f"{self.KIND}: unsupported schema version {self.v!r}")
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        # Every subclass is a dataclass; this base is not one, so mypy cannot see it.
        out: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        return out

    def encode(self) -> bytes:
        return packb(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise _bad(f"{cls.KIND}: expected a map, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # see to_dict
        # Unknown keys are ignored so that a newer peer can add optional fields.
        known = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**known)
        except TypeError as exc:
            raise _bad(f"{cls.KIND}: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls.from_dict(unpackb(data))


@dataclass(frozen=True)
class RequestHeader(_Message):
    """Clear, authenticated routing header of a request envelope."""

    KIND: ClassVar[str] = "request header"
    id: str  # 32 lowercase hex characters, random per request
    model: str
    budget_ms: float  # latency budget; the broker counts it from its receipt (ADR 0002)
    sent_at_ms: int  # client wall clock, Unix ms: only for the replay window
    kid: str  # key id of the fleet key the body key is wrapped to
    size: int  # bytes of sealed body, for transfer-time prediction
    reply: str  # topic the requester reads replies on
    priority: int = 0  # 0 normal … 7 most urgent
    v: int = SCHEMA_VERSION

    def validate(self) -> None:
        if not isinstance(self.id, str) or len(self.id) != 32 or not _is_hex(self.id):
            raise _bad(f"id must be 32 lowercase hex characters, got {self.id!r}")
        _name(self.model, "model")
        _float(self.budget_ms, "budget_ms", 0.0, MAX_BUDGET_MS)
        if self.budget_ms <= 0:
            raise _bad(f"budget_ms must be positive, got {self.budget_ms!r}")
        _int(self.sent_at_ms, "sent_at_ms")
        _str(self.kid, "kid", 64)
        _int(self.size, "size")
        _str(self.reply, "reply", 256)
        if not self.reply or any(c in self.reply for c in "+#"):
            raise _bad(f"reply must be a topic without wildcards, got {self.reply!r}")
        _int(self.priority, "priority", 0, MAX_PRIORITY)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


OK = "OK"


@dataclass(frozen=True)
class ReplyHeader(_Message):
    """Clear header of a reply: ``status`` is ``OK`` or an ``ErrorCode``."""

    KIND: ClassVar[str] = "reply header"
    id: str
    status: str
    message: str = ""  # human-readable detail for an error; never tensor data
    node: str = ""  # node that ran it (empty when none did)
    where: str = ""  # "edge" | "cloud" | ""
    queue_ms: float = 0.0  # time queued at the node
    service_ms: float = 0.0  # model run time at the node
    v: int = SCHEMA_VERSION

    def validate(self) -> None:
        _str(self.id, "id", 64)
        if self.status != OK and self.status not in ErrorCode.__members__:
            raise _bad(f"status must be OK or an error code, got {self.status!r}")
        _str(self.message, "message", 4096)
        _str(self.node, "node", 64)
        if self.where not in ("edge", "cloud", ""):
            raise _bad(f"where must be edge, cloud or empty, got {self.where!r}")
        _float(self.queue_ms, "queue_ms")
        _float(self.service_ms, "service_ms")

    @property
    def ok(self) -> bool:
        return self.status == OK


ROLES = ("edge", "cloud")


@dataclass(frozen=True)
class NodeStatus(_Message):
    """Retained birth/death of a node; ``session`` grows with every agent start (bdSeq)."""

    KIND: ClassVar[str] = "node status"
    node: str
    online: bool
    session: int
    role: str = "edge"
    models: tuple[str, ...] = ()
    gpu: str = "cpu"  # device class, e.g. "cpu", "jetson-orin-nx", "nvidia-h100"
    concurrency: int = 1  # models run in parallel
    # Online but taking no new work: finishing what it holds before it leaves (a pool
    # worker chosen for scale-down). Brokers place nothing on it; its death follows.
    draining: bool = False
    # A death the agent published itself on a clean stop; the will (a crash, a lost
    # link) leaves it False. Brokers log the one as news, the other as an alarm.
    stopped: bool = False
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.models, list | tuple):
            raise _bad("models must be a list of model names")
        object.__setattr__(self, "models", tuple(self.models))
        super().__post_init__()

    def validate(self) -> None:
        _name(self.node, "node")
        if not all(isinstance(b, bool) for b in (self.online, self.draining, self.stopped)):
            raise _bad("online, draining and stopped must be booleans")
        _int(self.session, "session")
        if self.role not in ROLES:
            raise _bad(f"role must be one of {ROLES}, got {self.role!r}")
        for m in self.models:
            _name(m, "model")
        _str(self.gpu, "gpu", 64)
        _int(self.concurrency, "concurrency", 1, 1024)


@dataclass(frozen=True)
class ModelLoad:
    """Observed service time of one model on one node."""

    mean_ms: float
    p95_ms: float
    count: int
    # Where the node batches this model: run time by batch size (skyhop.batching).
    batches: tuple[BatchPoint, ...] = ()


@dataclass(frozen=True)
class LoadReport(_Message):
    """Periodic telemetry of a node (docs/protocol.md §load)."""

    KIND: ClassVar[str] = "load report"
    node: str
    session: int
    seq: int  # grows by one per report within a session
    queue: int  # requests waiting
    in_flight: int  # requests running
    capacity: int  # most requests (queued + running) the node accepts
    rtt_ms: float  # agent ↔ MQTT server round trip, measured by the agent
    gpu_util: float = 0.0  # 0..1, of the GPU (or CPU on a CPU-only node)
    mem_used_mb: float = 0.0
    mem_total_mb: float = 0.0
    probe: str = "cpu"  # which telemetry probe produced the numbers
    models: dict[str, ModelLoad] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.models, dict):
            raise _bad("models must be a map from model name to its load")
        object.__setattr__(self, "models", {k: _model_load(k, v) for k, v in self.models.items()})
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        # A batch curve goes as rows of numbers, and only where the node batches: the
        # report of a node that does not is byte for byte what it was before batching.
        out = super().to_dict()
        for name, load in self.models.items():
            entry = out["models"][name]
            del entry["batches"]
            if load.batches:
                entry["batches"] = [[p.size, p.mean_ms, p.p95_ms, p.count]
                                    for p in load.batches]
        return out

    def validate(self) -> None:
        _name(self.node, "node")
        for what in ("session", "seq", "queue", "in_flight", "capacity"):
            _int(getattr(self, what), what)
        _float(self.rtt_ms, "rtt_ms")
        _float(self.gpu_util, "gpu_util", 0.0, 1.0)
        _float(self.mem_used_mb, "mem_used_mb")
        _float(self.mem_total_mb, "mem_total_mb")
        _str(self.probe, "probe", 32)


def _model_load(name: str, value: Any) -> ModelLoad:
    _name(name, "model")
    if isinstance(value, ModelLoad):
        return value
    if not isinstance(value, dict):
        raise _bad(f"models[{name}] must be a map")
    return ModelLoad(
        mean_ms=_float(value.get("mean_ms"), "mean_ms"),
        p95_ms=_float(value.get("p95_ms"), "p95_ms"),
        count=_int(value.get("count"), "count"),
        batches=_batch_points(name, value.get("batches", ())),
    )


MAX_BATCH_POINTS = 32  # buckets by power of two: 65,536 needs 19


def _batch_points(model: str, value: Any) -> tuple[BatchPoint, ...]:
    """``[[size, mean_ms, p95_ms, count], ...]`` by growing size."""
    if not isinstance(value, list | tuple) or len(value) > MAX_BATCH_POINTS:
        raise _bad(f"models[{model}].batches must be a list of at most "
                    f"{MAX_BATCH_POINTS} [size, mean_ms, p95_ms, count]")
    points = []
    for item in value:
        if isinstance(item, BatchPoint):
            points.append(item)
            continue
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise _bad(f"models[{model}].batches: each is [size, mean_ms, p95_ms, count]")
        points.append(BatchPoint(_float(item[0], "batch size", 1.0), _float(item[1], "mean_ms"),
                                 _float(item[2], "p95_ms"), _int(item[3], "count")))
    if any(b.size <= a.size for a, b in pairwise(points)):
        raise _bad(f"models[{model}].batches must grow in size")
    return tuple(points)


@dataclass(frozen=True)
class SlaConfig(_Message):
    """Retained per-model SLA, published by an operator on ``config/sla/{model}``.

    ``cleared`` marks a withdrawn SLA (a signed tombstone: an empty retained message
    cannot be signed). ``signer`` is the operator's certificate (DER) and ``signature``
    ECDSA P-256 / SHA-256 over ``signed_bytes()``; see skyhop/security/sla.py.
    """

    KIND: ClassVar[str] = "SLA config"
    model: str
    budget_ms: float
    priority: int = 0
    issued_at_ms: int = 0  # newer wins; an older one is a rollback
    cleared: bool = False
    signer: bytes = b""
    signature: bytes = b""
    v: int = SCHEMA_VERSION

    def validate(self) -> None:
        _name(self.model, "model")
        _float(self.budget_ms, "budget_ms", 0.001, MAX_BUDGET_MS)
        _int(self.priority, "priority", 0, MAX_PRIORITY)
        _int(self.issued_at_ms, "issued_at_ms")
        if not isinstance(self.cleared, bool):
            raise _bad("cleared must be a boolean")
        if not isinstance(self.signer, bytes) or len(self.signer) > 4096:
            raise _bad("signer must be a DER certificate of at most 4096 bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) > 128:
            raise _bad("signature must be at most 128 bytes")

    def signed_bytes(self) -> bytes:
        """Every field but the signature: what the operator's key signs."""
        return packb({k: v for k, v in self.to_dict().items() if k != "signature"})


# A broker's order on a node's work topic, as a user property on an empty message: stop
# taking work, finish what is held, publish the death (docs/protocol.md §Drain).
DRAIN = ("skyhop-control", "drain")
# A broker's ask on a node's work topic: publish your birth again. Sent when load comes
# from a node whose status this broker never read (garbage or nothing retained there).
ANNOUNCE = ("skyhop-control", "announce")
# A broker's first word to a node it sees born: its clock's stamp (WorkMeta sent_ms and
# clock), so the node knows how quickly this broker's messages arrive before any work
# does, and can tell the first work that waited on its way (skyhop.protocol.age).
CLOCK = ("skyhop-control", "clock")


@dataclass(frozen=True)
class WorkMeta:
    """What the broker adds when it dispatches an envelope to a node.

    Carried as MQTT 5 user properties next to the untouched envelope, because the
    envelope's header is authenticated by the client and must not change.
    ``remaining_ms`` is relative so that node and broker clocks need not agree.
    ``sent_ms`` (the broker's monotonic clock) and ``clock`` (that clock's identity: a
    nonce per broker process) let the node tell how long the message waited on its way
    (skyhop.protocol.age); a broker that sends neither is taken at its word.
    """

    remaining_ms: float
    attempt: int = 1
    sent_ms: float | None = None
    clock: str = ""

    def properties(self) -> list[tuple[str, str]]:
        props = [("remaining_ms", f"{self.remaining_ms:.3f}"), ("attempt", str(self.attempt))]
        if self.sent_ms is not None:
            props += [("sent_ms", f"{self.sent_ms:.3f}"), ("clock", self.clock)]
        return props

    @classmethod
    def from_properties(cls, props: list[tuple[str, str]] | None) -> WorkMeta:
        d = dict(props or [])
        try:
            remaining = float(d["remaining_ms"])
            attempt = int(d.get("attempt", "1"))
            sent = float(d["sent_ms"]) if "sent_ms" in d else None
        except (KeyError, ValueError):
            raise _bad("work message lacks a valid remaining_ms user property") from None
        return cls(
            remaining_ms=_float(remaining, "remaining_ms", -MAX_BUDGET_MS, MAX_BUDGET_MS),
            attempt=_int(attempt, "attempt", 1, 1000),
            sent_ms=None if sent is None else _float(sent, "sent_ms", -math.inf),
            clock=_str(d.get("clock", ""), "clock", 64),
        )


@dataclass(frozen=True)
class KeyAnnouncement(_Message):
    """Retained on ``keys/fleet``: the current fleet public key, signed by the fleet CA.

    ``signature`` is ECDSA P-256 / SHA-256 (DER) over ``signed_bytes()``, the msgpack
    map of every other field; see skyhop/protocol/announcement.py.
    """

    KIND: ClassVar[str] = "key announcement"
    kid: str
    public: bytes  # raw 32-byte X25519 public key
    issued_at_ms: int  # newer announcements win; an older one is a rollback
    signature: bytes = b""
    v: int = SCHEMA_VERSION

    def validate(self) -> None:
        _str(self.kid, "kid", 64)
        if not isinstance(self.public, bytes) or len(self.public) != 32:
            raise _bad("public must be 32 bytes (a raw X25519 key)")
        _int(self.issued_at_ms, "issued_at_ms")
        if not isinstance(self.signature, bytes) or len(self.signature) > 128:
            raise _bad("signature must be at most 128 bytes")

    def signed_bytes(self) -> bytes:
        return packb(
            {"v": self.v, "kid": self.kid, "public": self.public, "issued_at_ms": self.issued_at_ms}
        )

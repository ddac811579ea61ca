"""Wire messages: encode/decode round trips and validation of every field."""

from __future__ import annotations

import math

import msgpack
import pytest

from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.messages import (
    LoadReport,
    ModelLoad,
    NodeStatus,
    ReplyHeader,
    RequestHeader,
    SlaConfig,
    WorkMeta,
)

GOOD = dict(
    id="0123456789abcdef" * 2,
    model="digits",
    budget_ms=50.0,
    sent_at_ms=1,
    kid="k1",
    size=10,
    reply="skyhop/v1/reply/c",
)

SAMPLES = [
    RequestHeader(**GOOD),
    ReplyHeader(id="x", status="OK", node="n", where="edge", queue_ms=1.5, service_ms=2.0),
    ReplyHeader(id="x", status="DEADLINE_EXCEEDED", message="late"),
    NodeStatus(
        node="cam-1",
        online=True,
        session=7,
        role="cloud",
        models=("a", "b"),
        gpu="nvidia-h100",
        concurrency=4,
    ),
    LoadReport(
        node="cam-1",
        session=7,
        seq=3,
        queue=2,
        in_flight=1,
        capacity=65,
        rtt_ms=3.5,
        gpu_util=0.5,
        models={"digits": ModelLoad(1.0, 2.0, 10)},
    ),
    SlaConfig(model="digits", budget_ms=40, priority=2),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert type(message).decode(message.encode()) == message


@pytest.mark.parametrize(
    "field,value",
    [
        ("budget_ms", -1),
        ("budget_ms", 0),
        ("budget_ms", math.nan),
        ("budget_ms", math.inf),
        ("budget_ms", 1e12),
        ("budget_ms", "50"),
        ("budget_ms", True),
        ("id", "short"),
        ("id", "G" * 32),
        ("model", "a/b"),
        ("model", "+"),
        ("model", ""),
        ("size", -1),
        ("priority", 8),
        ("reply", "a/#"),
        ("reply", ""),
        ("sent_at_ms", 1.5),
    ],
)
def test_bad_request_header_fields(field: str, value: object) -> None:
    data = {**GOOD, field: value, "v": 1}
    with pytest.raises(ProtocolError) as info:
        RequestHeader.decode(msgpack.packb(data))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert field in str(info.value) or "budget" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        msgpack.packb({"v": 2}),
        msgpack.packb({**GOOD, "v": 2}),
        msgpack.packb({"id": 1}),
    ],
)
def test_malformed_or_wrong_schema(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        RequestHeader.decode(raw)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = {**GOOD, "v": 1, "future_field": [1, 2]}
    assert RequestHeader.decode(msgpack.packb(data)).model == "digits"


def test_work_meta_properties() -> None:
    meta = WorkMeta(12.5, 2)
    assert WorkMeta.from_properties(meta.properties()) == meta
    with pytest.raises(ProtocolError):
        WorkMeta.from_properties([("remaining_ms", "nan?")])
    with pytest.raises(ProtocolError):
        WorkMeta.from_properties(None)

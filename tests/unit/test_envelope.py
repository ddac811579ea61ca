"""Envelope sealing and opening with the real cryptography primitives."""

from __future__ import annotations

import pytest

from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.envelope import (
    FleetKeyPair,
    body_size,
    error_reply,
    open_reply,
    open_request,
    peek_reply,
    peek_request,
    seal_reply,
    seal_request,
)
from skyhop.protocol.messages import ReplyHeader, RequestHeader

BODY = b"\x81\xa6inputs\x80" + bytes(range(256))


def _header(kp: FleetKeyPair, body: bytes = BODY, **kw: object) -> RequestHeader:
    fields = dict(
        id="ab" * 16,
        model="digits",
        budget_ms=50.0,
        sent_at_ms=1_700_000_000_000,
        kid=kp.kid,
        size=body_size(len(body)),
        reply="skyhop/v1/reply/c1",
    )
    fields.update(kw)
    return RequestHeader(**fields)


@pytest.fixture(scope="module")
def kp() -> FleetKeyPair:
    return FleetKeyPair.generate()


def test_round_trip_request_and_reply(kp: FleetKeyPair) -> None:
    envelope, key = seal_request(_header(kp), BODY, kp.public)
    assert peek_request(envelope) == _header(kp)
    opened = open_request(envelope, {kp.kid: kp.private})
    assert opened.body == BODY and opened.request_key == key
    reply = seal_reply(ReplyHeader(id=opened.header.id, status="OK", node="n1"), b"out", key)
    header, body = open_reply(reply, key)
    assert body == b"out" and header.node == "n1" and peek_reply(reply) == header


def test_plaintext_is_not_in_the_envelope(kp: FleetKeyPair) -> None:
    envelope, _ = seal_request(_header(kp), BODY, kp.public)
    assert bytes(range(64, 128)) not in envelope


def test_every_flipped_byte_is_refused(kp: FleetKeyPair) -> None:
    envelope, _ = seal_request(_header(kp), BODY, kp.public)
    for i in range(len(envelope)):
        bad = bytearray(envelope)
        bad[i] ^= 0x01
        with pytest.raises(ProtocolError) as info:
            open_request(bytes(bad), {kp.kid: kp.private})
        assert info.value.code in (
            ErrorCode.BAD_REQUEST,
            ErrorCode.BAD_ENVELOPE,
            ErrorCode.UNKNOWN_KEY,
        ), i


def test_unknown_key_id(kp: FleetKeyPair) -> None:
    envelope, _ = seal_request(_header(kp), BODY, kp.public)
    other = FleetKeyPair.generate()
    with pytest.raises(ProtocolError) as info:
        open_request(envelope, {other.kid: other.private})
    assert info.value.code == ErrorCode.UNKNOWN_KEY


def test_wrong_private_key_under_the_same_kid_fails_authentication(kp: FleetKeyPair) -> None:
    envelope, _ = seal_request(_header(kp), BODY, kp.public)
    with pytest.raises(ProtocolError) as info:
        open_request(envelope, {kp.kid: FleetKeyPair.generate().private})
    assert info.value.code == ErrorCode.BAD_ENVELOPE


def test_truncated_envelopes_are_bad_requests(kp: FleetKeyPair) -> None:
    envelope, _ = seal_request(_header(kp), BODY, kp.public)
    for n in (0, 3, 6, 10, 120, len(envelope) - len(BODY) - 17):
        with pytest.raises(ProtocolError):
            open_request(envelope[:n], {kp.kid: kp.private})


def test_reply_cannot_be_opened_with_another_request_key(kp: FleetKeyPair) -> None:
    reply = seal_reply(ReplyHeader(id="x" * 32, status="OK"), b"secret", b"k" * 32)
    with pytest.raises(ProtocolError) as info:
        open_reply(reply, b"j" * 32)
    assert info.value.code == ErrorCode.BAD_ENVELOPE


def test_error_reply_is_clear_and_has_no_body() -> None:
    reply = error_reply(ReplyHeader(id="x" * 32, status="INFEASIBLE", message="too slow"))
    header, body = open_reply(reply, b"k" * 32)
    assert body is None and header.status == "INFEASIBLE" and header.message == "too slow"
    with pytest.raises(ValueError):
        error_reply(ReplyHeader(id="x", status="OK"))


def test_seal_checks_kid_and_size(kp: FleetKeyPair) -> None:
    with pytest.raises(ProtocolError):
        seal_request(_header(kp, kid="0" * 16), BODY, kp.public)
    with pytest.raises(ProtocolError):
        seal_request(_header(kp, size=1), BODY, kp.public)

"""Signed SLAs (skyhop.security.sla), with real certificates and ECDSA keys: what a
broker applies, what it ignores and why."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from skyhop.errors import ProtocolError
from skyhop.protocol.messages import SlaConfig
from skyhop.security.pki import make_ca, make_leaf
from skyhop.security.sla import UNSIGNED, Rejected, SlaBook, sign

NOW = dt.datetime(2026, 12, 2, 12, tzinfo=dt.timezone.utc)
CA_CERT, CA_KEY = make_ca(now=NOW)
ALICE = make_leaf(CA_CERT, CA_KEY, "alice", "operator", now=NOW)
EDGE = make_leaf(CA_CERT, CA_KEY, "cam-1", "edge", now=NOW)


def signed(budget_ms: float = 40, at_ms: int = 1000, by=ALICE, **kw) -> bytes:
    return sign(SlaConfig(model="digits", budget_ms=budget_ms, **kw), *by, at_ms).encode()


def book(revoked: frozenset[int] = frozenset()) -> SlaBook:
    return SlaBook(CA_CERT.public_key(), revoked)


def reason(b: SlaBook, payload: bytes, topic: str = "digits", now: dt.datetime = NOW) -> str:
    with pytest.raises(Rejected) as info:
        b.offer(topic, payload, now)
    return info.value.reason


def test_an_operator_signed_sla_is_applied_with_its_signer() -> None:
    b = book()
    change = b.offer("digits", signed(), NOW)
    assert change is not None and change.signer == "alice"
    assert b.current["digits"].budget_ms == 40 and b.signers["digits"] == "alice"


def test_unsigned_forged_and_foreign_slas_are_ignored_with_a_reason() -> None:
    b = book()
    assert reason(b, SlaConfig(model="digits", budget_ms=40).encode()) == "unsigned"
    assert reason(b, b"") == "unsigned"  # an empty retained message cannot clear it
    tampered = dataclasses.replace(SlaConfig.decode(signed()), budget_ms=5000)
    assert reason(b, tampered.encode()) == "forged"
    other_ca, other_key = make_ca(now=NOW)
    assert reason(b, signed(by=make_leaf(other_ca, other_key, "alice", "operator",
                                         now=NOW))) == "forged"
    assert reason(b, signed(by=EDGE)) == "not-operator"
    assert reason(b, signed(), topic="other") == "topic"
    assert reason(b, signed(), now=NOW + dt.timedelta(days=3650)) == "expired"
    assert reason(book(frozenset({ALICE[0].serial_number})), signed()) == "revoked"
    assert b.current == {}


def test_newer_wins_an_old_one_is_a_rollback_and_a_repeat_is_no_change() -> None:
    b = book()
    b.offer("digits", signed(40, at_ms=2000), NOW)
    assert reason(b, signed(10, at_ms=1000)) == "stale"
    assert b.offer("digits", signed(40, at_ms=2000), NOW) is None  # a resubscription
    b.offer("digits", signed(60, at_ms=3000), NOW)
    assert b.current["digits"].budget_ms == 60


def test_a_signed_clear_removes_it_and_cannot_be_rolled_back() -> None:
    b = book()
    b.offer("digits", signed(at_ms=1000), NOW)
    change = b.offer("digits", signed(at_ms=2000, cleared=True), NOW)
    assert change is not None and change.sla is None and "digits" not in b.current
    assert reason(b, signed(at_ms=1500)) == "stale"


def test_without_a_fleet_ca_slas_are_taken_unsigned() -> None:
    b = SlaBook(None)
    change = b.offer("digits", SlaConfig(model="digits", budget_ms=40).encode(), NOW)
    assert change is not None and change.signer == UNSIGNED
    b.offer("digits", b"", NOW)
    assert b.current == {}


def test_malformed_is_a_protocol_error_not_a_rejection() -> None:
    with pytest.raises(ProtocolError):
        book().offer("digits", b"\xc1", NOW)

"""Signed SLAs: who may set a model's latency budget, and which SLA is in force.

An operator signs each SLA change (set or clear) with its own certificate's key, and
puts the certificate in the message. A broker or client applies it only if that
certificate was issued by the fleet CA to the ``operator`` role, is valid now and not
revoked, the signature holds, and it is newer than the SLA it replaces (no rollback).
Anything else is ignored, with a reason the shell counts (docs/security.md §SLAs).

A home with no fleet CA (a plain-``mqtt://`` trial) has nothing to check against: its
SLAs are taken unsigned, and the book says so (``signer`` "unsigned").
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from skyhop.protocol.messages import SlaConfig

UNSIGNED = "unsigned"


class Rejected(Exception):
    """An SLA message that is well formed but must not be applied; ``reason`` is the
    counter's label: unsigned, forged, not-operator, expired, revoked, stale, topic."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def sign(sla: SlaConfig, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
         now_ms: int) -> SlaConfig:
    unsigned = replace(sla, issued_at_ms=now_ms, signature=b"",
                       signer=cert.public_bytes(serialization.Encoding.DER))
    signature = key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    return replace(unsigned, signature=signature)


def signer_of(sla: SlaConfig, ca: ec.EllipticCurvePublicKey, revoked: frozenset[int],
              now: dt.datetime) -> str:
    """The name of the operator who signed ``sla``, or Rejected."""
    if not sla.signer or not sla.signature:
        raise Rejected("unsigned", "not signed by an operator")
    try:
        cert = x509.load_der_x509_certificate(sla.signer)
        ca.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public.verify(sla.signature, sla.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise Rejected("forged", "its certificate or signature does not chain to the "
                       "fleet CA") from None
    name, role = (_attribute(cert, oid) for oid in (NameOID.COMMON_NAME,
                                                    NameOID.ORGANIZATIONAL_UNIT_NAME))
    if role != "operator":
        raise Rejected("not-operator", f"signed by {name}, a {role}, not an operator")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Rejected("expired", f"{name}'s certificate is not valid now")
    if cert.serial_number in revoked:
        raise Rejected("revoked", f"{name}'s certificate is revoked")
    return name


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    """As skyhop.security.pki reads the CN (name) and OU (role); that module writes
    files, and this one is pure."""
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else "?"


@dataclass(frozen=True)
class Change:
    """What one SLA message did: ``sla`` None means the model's SLA was cleared."""

    model: str
    sla: SlaConfig | None
    signer: str


@dataclass
class SlaBook:
    """The SLAs in force, from the retained messages on ``config/sla/+``.

    ``ca`` None: no fleet CA to check against, so SLAs are taken unsigned.
    """

    ca: ec.EllipticCurvePublicKey | None
    revoked: frozenset[int] = frozenset()
    current: dict[str, SlaConfig] = field(default_factory=dict)
    signers: dict[str, str] = field(default_factory=dict)
    _latest: dict[str, int] = field(default_factory=dict)  # issued_at_ms, cleared or not

    def offer(self, topic_model: str | None, payload: bytes,
              now: dt.datetime) -> Change | None:
        """Apply one retained message (None: it was in force already), or raise
        ProtocolError (malformed) or Rejected."""
        if not payload:
            if self.ca is not None:
                raise Rejected("unsigned", "an empty message cannot clear a signed SLA "
                               "(use `skyhop sla clear`)")
            return self._apply(Change(topic_model or "", None, UNSIGNED), 0)
        sla = SlaConfig.decode(payload)
        if topic_model is not None and sla.model != topic_model:
            raise Rejected("topic", f"an SLA for {sla.model} on {topic_model}'s topic")
        signer = (signer_of(sla, self.ca, self.revoked, now) if self.ca is not None
                  else UNSIGNED)
        latest = self._latest.get(sla.model, -1)
        if sla.issued_at_ms == latest:
            return None  # the same message again: a resubscription's retained copy
        if sla.issued_at_ms < latest:
            raise Rejected("stale", f"older than the SLA in force for {sla.model}")
        return self._apply(Change(sla.model, None if sla.cleared else sla, signer),
                           sla.issued_at_ms)

    def _apply(self, change: Change, issued_at_ms: int) -> Change:
        self._latest[change.model] = issued_at_ms
        if change.sla is None:
            self.current.pop(change.model, None)
            self.signers.pop(change.model, None)
        else:
            self.current[change.model] = change.sla
            self.signers[change.model] = change.signer
        return change

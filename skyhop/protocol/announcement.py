"""Signed announcements of the fleet key, so clients follow a rotation on their own.

The operator signs ``KeyAnnouncement`` with the fleet CA's key (the same CA that issues
every TLS certificate); clients verify it with ``pki/ca.crt`` and ignore anything else.
An announcement must also be newer than the one the client holds (no rollback) and
its ``kid`` must match its key.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.envelope import FleetPublicKey
from skyhop.protocol.messages import KeyAnnouncement


def sign(key: FleetPublicKey, ca_key: ec.EllipticCurvePrivateKey, now_ms: int) -> KeyAnnouncement:
    unsigned = KeyAnnouncement(kid=key.kid, public=key.raw, issued_at_ms=now_ms)
    signature = ca_key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    return KeyAnnouncement(kid=key.kid, public=key.raw, issued_at_ms=now_ms, signature=signature)


def verify(announcement: KeyAnnouncement, ca_public: ec.EllipticCurvePublicKey) -> FleetPublicKey:
    """Return the announced key, or raise ProtocolError(BAD_ENVELOPE) if it is not genuine."""
    try:
        ca_public.verify(
            announcement.signature, announcement.signed_bytes(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "key announcement: bad signature") from None
    key = FleetPublicKey.from_raw(announcement.public)
    if key.kid != announcement.kid:
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "key announcement: kid does not match key")
    return key

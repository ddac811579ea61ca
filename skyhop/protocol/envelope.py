"""The sealed envelope (docs/protocol.md §Envelope).

A request travels as::

    "SKH1" | kind=0x01 | u16 hlen | header | u16 wlen | wrapped_key | nonce(12) | ciphertext

The header (msgpack ``RequestHeader``) is in the clear so that the MQTT server and the
router can route, but it is authenticated: the body's AEAD takes every byte before the
ciphertext as associated data. The body key is fresh per request and reaches the
workers wrapped with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256, ChaCha20-Poly1305) to the fleet public key; the router never holds the
private key. A reply is sealed under a key derived from the request key, so only the
requester (and the worker) can read it::

    "SKH1" | kind=0x02 | u16 hlen | header | nonce(12) | ciphertext      sealed result
    "SKH1" | kind=0x03 | u16 hlen | header                               clear error

A clear error carries no tensor, only an error code and message; it is not
authenticated (a router that cannot read the request cannot seal for it).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.messages import ReplyHeader, RequestHeader

MAGIC = b"SKH1"
NONCE_LEN = 12
KEY_LEN = 32
TAG_LEN = 16
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
WRAP_INFO = b"skyhop/v1 wrap "  # + key id: binds the wrapped key to the key it was sealed to
REPLY_INFO = b"skyhop/v1 reply "  # + request id: one reply key per request


class Kind(IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3


def key_id(public: X25519PublicKey) -> str:
    """First 8 bytes of SHA-256 of the raw public key, as 16 hex characters."""
    return hashlib.sha256(_raw(public)).digest()[:8].hex()


def _raw(public: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class FleetPublicKey:
    """What clients seal to: the fleet's public key and its id."""

    public: X25519PublicKey

    @property
    def kid(self) -> str:
        return key_id(self.public)

    @property
    def raw(self) -> bytes:
        return _raw(self.public)

    @classmethod
    def from_raw(cls, raw: bytes) -> FleetPublicKey:
        return cls(X25519PublicKey.from_public_bytes(raw))


@dataclass(frozen=True)
class FleetKeyPair:
    """What workers open with. Only agents load it; never the broker."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> FleetKeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, raw: bytes) -> FleetKeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def public(self) -> FleetPublicKey:
        return FleetPublicKey(self.private.public_key())

    @property
    def kid(self) -> str:
        return self.public.kid


@dataclass(frozen=True)
class OpenedRequest:
    header: RequestHeader
    body: bytes
    request_key: bytes  # keep to seal the reply


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
    return ProtocolError(code, message)


# -- layout ---------------------------------------------------------------------------


def _frame_header(kind: Kind, header: bytes) -> bytes:
    if len(header) > 0xFFFF:
        raise _bad("header longer than 65535 bytes")
    return MAGIC + bytes([kind]) + struct.pack(">H", len(header)) + header


def _split_header(envelope: bytes) -> tuple[Kind, bytes, int]:
    """Return (kind, header bytes, offset after header) or raise BAD_REQUEST."""
    if len(envelope) < 7 or envelope[:4] != MAGIC:
        raise _bad("not a skyhop envelope (bad magic)")
    try:
        kind = Kind(envelope[4])
    except ValueError:
        raise _bad(f"unknown envelope kind {envelope[4]}") from None
    (hlen,) = struct.unpack_from(">H", envelope, 5)
    end = 7 + hlen
    if len(envelope) < end:
        raise _bad("envelope shorter than its header length")
    return kind, envelope[7:end], end


def peek_request(envelope: bytes) -> RequestHeader:
    """Decode a request's clear header without decrypting anything (what a router does)."""
    kind, header, _ = _split_header(envelope)
    if kind != Kind.REQUEST:
        raise _bad(f"expected a request envelope, got {kind.name}")
    return RequestHeader.decode(header)


def peek_reply(envelope: bytes) -> ReplyHeader:
    kind, header, _ = _split_header(envelope)
    if kind not in (Kind.REPLY, Kind.ERROR):
        raise _bad(f"expected a reply envelope, got {kind.name}")
    return ReplyHeader.decode(header)


# -- requests -------------------------------------------------------------------------


def body_size(plaintext_len: int) -> int:
    """The ``size`` a header must declare for a body of ``plaintext_len`` bytes."""
    return plaintext_len + TAG_LEN


def seal_request(
    header: RequestHeader,
    body: bytes,
    fleet: FleetPublicKey,
    *,
    request_key: bytes | None = None,
    nonce: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Seal ``body`` for the fleet; return (envelope, request_key).

    ``request_key`` and ``nonce`` are random unless given (test vectors fix them).
    """
    if header.kid != fleet.kid:
        raise _bad(f"header kid {header.kid} does not match the fleet key {fleet.kid}")
    if header.size != body_size(len(body)):
        raise _bad(f"header size {header.size} != sealed body size {body_size(len(body))}")
    key = os.urandom(KEY_LEN) if request_key is None else request_key
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    if len(key) != KEY_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("request_key must be 32 bytes and nonce 12 bytes")
    wrapped = SUITE.encrypt(key, fleet.public, info=WRAP_INFO + fleet.kid.encode())
    prefix = _frame_header(Kind.REQUEST, header.encode()) + struct.pack(">H", len(wrapped))
    prefix += wrapped + nonce
    return prefix + ChaCha20Poly1305(key).encrypt(nonce, body, prefix), key


def open_request(envelope: bytes, keys: Mapping[str, X25519PrivateKey]) -> OpenedRequest:
    """Authenticate and decrypt a request with the worker keys (kid -> private key).

    Raises ProtocolError: BAD_REQUEST (malformed), UNKNOWN_KEY, BAD_ENVELOPE (tampered).
    """
    kind, raw_header, off = _split_header(envelope)
    if kind != Kind.REQUEST:
        raise _bad(f"expected a request envelope, got {kind.name}")
    header = RequestHeader.decode(raw_header)
    private = keys.get(header.kid)
    if private is None:
        raise _bad(f"no worker key with id {header.kid!r}", ErrorCode.UNKNOWN_KEY)
    if len(envelope) < off + 2:
        raise _bad("envelope truncated before the wrapped key")
    (wlen,) = struct.unpack_from(">H", envelope, off)
    ct_start = off + 2 + wlen + NONCE_LEN
    if len(envelope) < ct_start + TAG_LEN:
        raise _bad("envelope truncated before the ciphertext")
    if len(envelope) - ct_start != header.size:
        raise _bad(f"header size {header.size} != ciphertext length {len(envelope) - ct_start}")
    wrapped = envelope[off + 2 : off + 2 + wlen]
    nonce = envelope[ct_start - NONCE_LEN : ct_start]
    try:
        key = SUITE.decrypt(wrapped, private, info=WRAP_INFO + header.kid.encode())
        body = ChaCha20Poly1305(key).decrypt(nonce, envelope[ct_start:], envelope[:ct_start])
    except (InvalidTag, ValueError):
        raise _bad(
            "authentication failed: header or ciphertext was altered", ErrorCode.BAD_ENVELOPE
        ) from None
    return OpenedRequest(header, body, key)


# -- replies --------------------------------------------------------------------------


def reply_key(request_key: bytes, request_id: str) -> bytes:
    """HKDF-SHA256(ikm=request_key, salt="", info="skyhop/v1 reply " + id), 32 bytes."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_LEN, salt=b"", info=REPLY_INFO + request_id.encode()
    )
    return hkdf.derive(request_key)


def seal_reply(
    header: ReplyHeader, body: bytes, request_key: bytes, *, nonce: bytes | None = None
) -> bytes:
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    prefix = _frame_header(Kind.REPLY, header.encode()) + nonce
    key = reply_key(request_key, header.id)
    return prefix + ChaCha20Poly1305(key).encrypt(nonce, body, prefix)


def error_reply(header: ReplyHeader) -> bytes:
    if header.ok:
        raise ValueError("an error reply needs an error status")
    return _frame_header(Kind.ERROR, header.encode())


def open_reply(
    envelope: bytes, request_key: bytes, request_id: str | None = None
) -> tuple[ReplyHeader, bytes | None]:
    """Return (header, body); body is None for a clear error reply.

    With ``request_id``, a reply that names another request is refused (BAD_ENVELOPE).
    """
    kind, raw_header, off = _split_header(envelope)
    header = ReplyHeader.decode(raw_header)
    if request_id is not None and header.id not in (request_id, ""):
        raise _bad(f"reply is for request {header.id}, not {request_id}", ErrorCode.BAD_ENVELOPE)
    if kind == Kind.ERROR:
        return header, None
    if kind != Kind.REPLY or len(envelope) < off + NONCE_LEN + TAG_LEN or not header.ok:
        raise _bad("not a sealed reply (a sealed reply has status OK)")
    ct_start = off + NONCE_LEN
    key = reply_key(request_key, header.id)
    try:
        body = ChaCha20Poly1305(key).decrypt(
            envelope[off:ct_start], envelope[ct_start:], envelope[:ct_start]
        )
    except InvalidTag:
        raise _bad("reply authentication failed", ErrorCode.BAD_ENVELOPE) from None
    return header, body

#!/usr/bin/env python3
"""Write the skyhop wire-format test vectors into tests/vectors/ (docs/protocol.md §13).

    python tools/make_vectors.py                          # deterministic files only
    python tools/make_vectors.py --out /tmp/v             # somewhere else
    python tools/make_vectors.py --regenerate-envelopes   # also re-seal request_envelopes.json

Every file is JSON, bytes as lowercase hex. Five files are fully deterministic and are
rewritten byte-identically on every run (tests/unit/test_vectors.py checks that):

- ``header_encoding.json``  message values and their exact msgpack bytes, plus invalid
  and leniently-accepted encodings;
- ``tensor_encoding.json``  arrays and their exact request/result body bytes;
- ``key_derivation.json``   reply keys (HKDF) and key ids (SHA-256 of the public key);
- ``aead.json``             ChaCha20-Poly1305 vectors, sealed and clear reply envelopes;
- ``hpke_wrap.json``        the HPKE key wrap with a *fixed* ephemeral key, computed by the
  small RFC 9180 implementation in this file (not by the library skyhop uses), with its
  intermediate values and a complete request envelope built from the spec alone.

``request_envelopes.json`` holds request envelopes sealed by
``skyhop.protocol.envelope.seal_request`` itself. HPKE draws a fresh ephemeral key for
every seal, so they cannot be reproduced byte-for-byte: they were generated once and are
committed. This script writes that file only when it does not exist yet, or when
``--regenerate-envelopes`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from skyhop.errors import ErrorCode  # noqa: E402
from skyhop.protocol.envelope import (  # noqa: E402
    REPLY_INFO,
    SUITE,
    WRAP_INFO,
    FleetKeyPair,
    Kind,
    body_size,
    error_reply,
    key_id,
    open_request,
    reply_key,
    seal_reply,
    seal_request,
)
from skyhop.protocol.messages import (  # noqa: E402
    LoadReport,
    ModelLoad,
    NodeStatus,
    ReplyHeader,
    RequestHeader,
    SlaConfig,
)
from skyhop.protocol.tensors import encode_body  # noqa: E402

VECTORS = ROOT / "tests" / "vectors"
ENVELOPES = "request_envelopes.json"
MESSAGE_TYPES = {
    "RequestHeader": RequestHeader,
    "ReplyHeader": ReplyHeader,
    "NodeStatus": NodeStatus,
    "LoadReport": LoadReport,
    "SlaConfig": SlaConfig,
}


def fixed_bytes(label: str, n: int = 32) -> bytes:
    """Deterministic test bytes: SHA-256 of ``"skyhop test vector " + label``, cut to n."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"skyhop test vector {label} {counter}".encode()).digest()
        counter += 1
    return out[:n]


def raw_public(public: X25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def packb(obj: Any, **kwargs: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, **kwargs)


# The fleet key every request vector is sealed to. Test-only: its private half is public.
FLEET = FleetKeyPair.from_raw(fixed_bytes("fleet private key"))
OTHER = FleetKeyPair.from_raw(fixed_bytes("other fleet private key"))
REQUEST_ID = "0123456789abcdef0123456789abcdef"
SENT_AT_MS = 1_700_000_000_000


# -- an independent RFC 9180 base mode, single shot, for this one suite -------------------
#
# DHKEM(X25519, HKDF-SHA256) = 0x0020, HKDF-SHA256 = 0x0001, ChaCha20-Poly1305 = 0x0003.
# Written from the RFC, not from the library, so that the vectors check that what
# docs/protocol.md says is what the library does.

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003
KEM_SUITE_ID = b"KEM" + KEM_ID.to_bytes(2, "big")
HPKE_SUITE_ID = b"HPKE" + b"".join(i.to_bytes(2, "big") for i in (KEM_ID, KDF_ID, AEAD_ID))
MODE_BASE = 0x00
NK, NN, NH = 32, 12, 32


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(NH), ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 0
    while len(out) < length:
        i += 1
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
    return hkdf_expand(prk, labeled_info, length)


def _kem_shared_secret(dh: bytes, enc: bytes, pk_r: bytes) -> bytes:
    eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE_ID, eae_prk, b"shared_secret", enc + pk_r, NH)


def _key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info)
    context = bytes([MODE_BASE]) + psk_id_hash + info_hash
    secret = labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = labeled_expand(HPKE_SUITE_ID, secret, b"key", context, NK)
    base_nonce = labeled_expand(HPKE_SUITE_ID, secret, b"base_nonce", context, NN)
    return key, base_nonce


def hpke_seal(pk_r: bytes, info: bytes, plaintext: bytes, sk_e: bytes) -> dict[str, bytes]:
    """SealBase(pkR, info, aad="", pt) with a given ephemeral key; returns every step."""
    eph = X25519PrivateKey.from_private_bytes(sk_e)
    enc = raw_public(eph.public_key())
    dh = eph.exchange(X25519PublicKey.from_public_bytes(pk_r))
    shared = _kem_shared_secret(dh, enc, pk_r)
    key, base_nonce = _key_schedule(shared, info)
    ct = ChaCha20Poly1305(key).encrypt(base_nonce, plaintext, b"")  # sequence 0: nonce = base
    return {"enc": enc, "dh": dh, "shared_secret": shared, "key": key,
            "base_nonce": base_nonce, "ct": ct, "wrapped": enc + ct}


def hpke_open(sk_r: bytes, info: bytes, wrapped: bytes) -> bytes:
    """OpenBase(enc, skR, info, aad="", ct) with wrapped = enc(32) || ct."""
    enc, ct = wrapped[:32], wrapped[32:]
    private = X25519PrivateKey.from_private_bytes(sk_r)
    dh = private.exchange(X25519PublicKey.from_public_bytes(enc))
    shared = _kem_shared_secret(dh, enc, raw_public(private.public_key()))
    key, base_nonce = _key_schedule(shared, info)
    return ChaCha20Poly1305(key).decrypt(base_nonce, ct, b"")


def spec_request_envelope(header: RequestHeader, body: bytes, pk_r: bytes, sk_e: bytes,
                          request_key: bytes, nonce: bytes) -> tuple[bytes, dict[str, bytes]]:
    """Build a request envelope from docs/protocol.md alone (no skyhop.protocol.envelope code)."""
    kid = hashlib.sha256(pk_r).digest()[:8].hex()
    wrap = hpke_seal(pk_r, b"skyhop/v1 wrap " + kid.encode("ascii"), request_key, sk_e)
    raw_header = header.encode()
    prefix = (b"SKH1" + b"\x01" + struct.pack(">H", len(raw_header)) + raw_header
              + struct.pack(">H", len(wrap["wrapped"])) + wrap["wrapped"] + nonce)
    return prefix + ChaCha20Poly1305(request_key).encrypt(nonce, body, prefix), wrap


# -- helpers --------------------------------------------------------------------------


def message_fields(msg: Any) -> dict[str, Any]:
    """A message's fields as JSON holds them: tuples as lists, bytes as {"hex": ...}."""
    return json.loads(json.dumps(msg.to_dict(), default=lambda b: {"hex": b.hex()}))


def from_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``message_fields`` for constructor arguments."""
    return {k: bytes.fromhex(v["hex"]) if isinstance(v, dict) and set(v) == {"hex"} else v
            for k, v in fields.items()}


def request_header(body: bytes, **changes: Any) -> RequestHeader:
    fields: dict[str, Any] = {
        "id": REQUEST_ID, "model": "digits", "budget_ms": 50.0, "sent_at_ms": SENT_AT_MS,
        "kid": FLEET.kid, "size": body_size(len(body)), "reply": "skyhop/v1/reply/client-1",
        "priority": 0,
    }
    fields.update(changes)
    return RequestHeader(**fields)


def tensor_json(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "values": array.tolist()}


def digits_inputs() -> dict[str, np.ndarray]:
    return {"image": np.arange(16, dtype=np.float32).reshape(1, 16) / 4}


# -- header_encoding.json ---------------------------------------------------------------


def header_encoding() -> dict[str, Any]:
    valid = [
        ("request header, normal priority", RequestHeader(
            id=REQUEST_ID, model="digits", budget_ms=50.0, sent_at_ms=SENT_AT_MS,
            kid=FLEET.kid, size=272, reply="skyhop/v1/reply/client-1")),
        ("request header, most urgent, longest budget", RequestHeader(
            id="ffffffffffffffffffffffffffffffff", model="resnet-50.v2_int8",
            budget_ms=3_600_000.0, sent_at_ms=0, kid=FLEET.kid, size=16,
            reply="skyhop/v1/reply/cam-7.front", priority=7)),
        ("request header, fractional budget", RequestHeader(
            id="00000000000000000000000000000001", model="a", budget_ms=0.25,
            sent_at_ms=2**40, kid=OTHER.kid, size=65_536, reply="r", priority=3)),
        ("reply header, result", ReplyHeader(
            id=REQUEST_ID, status="OK", node="jetson-1", where="edge", queue_ms=0.5,
            service_ms=3.25)),
        ("reply header, error from the broker", ReplyHeader(
            id=REQUEST_ID, status="INFEASIBLE",
            message="best predicted 80.0 ms > 45.0 ms (90% of 50.0 ms left)")),
        ("reply header, refusal of an unreadable request (empty id)", ReplyHeader(
            id="", status="BAD_REQUEST", message="not a skyhop envelope (bad magic)")),
        ("reply header, error from a cloud node, non-ASCII message", ReplyHeader(
            id=REQUEST_ID, status="INTERNAL", message="température élevée ✓", node="gpu-a",
            where="cloud")),
        ("node status, birth", NodeStatus(
            node="jetson-1", online=True, session=1_700_000_000_123, role="edge",
            models=("digits", "yolo-n"), gpu="jetson-orin-nx", concurrency=2)),
        ("node status, death of a cloud node", NodeStatus(
            node="gpu-a", online=False, session=1_700_000_000_456, role="cloud",
            models=("digits",), gpu="nvidia-h100", concurrency=16)),
        ("node status, no models", NodeStatus(node="n", online=True, session=0)),
        ("load report", LoadReport(
            node="jetson-1", session=1_700_000_000_123, seq=42, queue=3, in_flight=2,
            capacity=66, rtt_ms=1.5, gpu_util=0.75, mem_used_mb=1024.0, mem_total_mb=8192.0,
            probe="jetson",
            models={"digits": ModelLoad(mean_ms=2.5, p95_ms=4.0, count=1000),
                    "yolo-n": ModelLoad(mean_ms=0.0, p95_ms=0.0, count=0)})),
        ("load report, defaults", LoadReport(
            node="n", session=1, seq=1, queue=0, in_flight=0, capacity=1, rtt_ms=0.0)),
        ("SLA config", SlaConfig(model="digits", budget_ms=50.0, priority=2)),
        ("SLA config, smallest budget", SlaConfig(model="digits", budget_ms=0.001)),
    ]
    base = {
        "id": REQUEST_ID, "model": "digits", "budget_ms": 50.0, "sent_at_ms": SENT_AT_MS,
        "kid": FLEET.kid, "size": 272, "reply": "skyhop/v1/reply/client-1", "priority": 0,
        "v": 1,
    }

    def req(**changes: Any) -> dict[str, Any]:
        d = dict(base)
        d.update(changes)
        return {k: v for k, v in d.items() if v is not _DROP}

    lenient = [
        ("unknown keys are ignored", "RequestHeader",
         packb(req(trace="abc", hops=[1, 2])), req()),
        ("v omitted means 1, defaulted fields omitted", "RequestHeader",
         packb(req(v=_DROP, priority=_DROP)), req()),
        ("integer where a number is expected", "RequestHeader",
         packb(req(budget_ms=50)), req(budget_ms=50)),
        ("float32 where a number is expected", "RequestHeader",
         packb(req(budget_ms=0.5), use_single_float=True), req(budget_ms=0.5)),
        ("keys in any order", "RequestHeader",
         packb(dict(reversed(list(req().items())))), req()),
        ("reply header with only the required keys", "ReplyHeader",
         packb({"id": REQUEST_ID, "status": "OK"}), message_fields(
             ReplyHeader(id=REQUEST_ID, status="OK"))),
    ]
    invalid = [
        ("id in upper case", "RequestHeader", packb(req(id=REQUEST_ID.upper()))),
        ("id of 31 characters", "RequestHeader", packb(req(id=REQUEST_ID[:31]))),
        ("id as bin instead of str", "RequestHeader", packb(req(id=REQUEST_ID.encode()))),
        ("budget_ms zero", "RequestHeader", packb(req(budget_ms=0.0))),
        ("budget_ms over one hour", "RequestHeader", packb(req(budget_ms=3_600_000.5))),
        ("budget_ms NaN", "RequestHeader", packb(req(budget_ms=float("nan")))),
        ("budget_ms as a string", "RequestHeader", packb(req(budget_ms="50"))),
        ("sent_at_ms negative", "RequestHeader", packb(req(sent_at_ms=-1))),
        ("sent_at_ms as a float", "RequestHeader", packb(req(sent_at_ms=1.0))),
        ("priority 8", "RequestHeader", packb(req(priority=8))),
        ("priority as a boolean", "RequestHeader", packb(req(priority=True))),
        ("size negative", "RequestHeader", packb(req(size=-1))),
        ("kid longer than 64", "RequestHeader", packb(req(kid="k" * 65))),
        ("reply with a wildcard", "RequestHeader", packb(req(reply="skyhop/v1/reply/+"))),
        ("reply empty", "RequestHeader", packb(req(reply=""))),
        ("reply longer than 256", "RequestHeader", packb(req(reply="r" * 257))),
        ("model with a slash", "RequestHeader", packb(req(model="a/b"))),
        ("model starting with a dot", "RequestHeader", packb(req(model=".hidden"))),
        ("model longer than 64", "RequestHeader", packb(req(model="m" * 65))),
        ("required key missing (kid)", "RequestHeader", packb(req(kid=_DROP))),
        ("schema version 2", "RequestHeader", packb(req(v=2))),
        ("integer map key", "RequestHeader", packb({**req(), 1: "x"})),
        ("not a map", "RequestHeader", packb([REQUEST_ID, "digits"])),
        ("trailing byte after the map", "RequestHeader", packb(req()) + b"\xc0"),
        ("not msgpack (truncated)", "RequestHeader", packb(req())[:-3]),
        ("status not an error code", "ReplyHeader", packb({"id": REQUEST_ID, "status": "NOPE"})),
        ("where neither edge nor cloud", "ReplyHeader",
         packb({"id": REQUEST_ID, "status": "OK", "where": "fog"})),
        ("message longer than 4096", "ReplyHeader",
         packb({"id": REQUEST_ID, "status": "INTERNAL", "message": "x" * 4097})),
        ("queue_ms negative", "ReplyHeader",
         packb({"id": REQUEST_ID, "status": "OK", "queue_ms": -1.0})),
        ("online as an integer", "NodeStatus", packb({"node": "n", "online": 1, "session": 1})),
        ("role neither edge nor cloud", "NodeStatus",
         packb({"node": "n", "online": True, "session": 1, "role": "fog"})),
        ("concurrency 0", "NodeStatus",
         packb({"node": "n", "online": True, "session": 1, "concurrency": 0})),
        ("bad model name in models", "NodeStatus",
         packb({"node": "n", "online": True, "session": 1, "models": ["a b"]})),
        ("gpu_util above 1", "LoadReport",
         packb({"node": "n", "session": 1, "seq": 1, "queue": 0, "in_flight": 0,
                "capacity": 1, "rtt_ms": 0.0, "gpu_util": 1.5})),
        ("model load without count", "LoadReport",
         packb({"node": "n", "session": 1, "seq": 1, "queue": 0, "in_flight": 0,
                "capacity": 1, "rtt_ms": 0.0, "models": {"m": {"mean_ms": 1.0, "p95_ms": 2.0}}})),
        ("budget_ms below 0.001", "SlaConfig", packb({"model": "m", "budget_ms": 0.0005})),
    ]
    return {
        "description": "Messages and their exact msgpack encoding (Message.encode()). 'valid': "
                       "encoding 'fields' MUST give 'msgpack' and decoding 'msgpack' MUST give "
                       "'fields' (a JSON number with a fraction or exponent is a float, encoded "
                       "as msgpack float64). 'lenient': other encodings a receiver MUST accept "
                       "as 'fields'. 'invalid': encodings a receiver MUST reject (BAD_REQUEST).",
        "valid": [{"name": name, "type": type(msg).__name__, "fields": message_fields(msg),
                   "msgpack": msg.encode().hex()} for name, msg in valid],
        "lenient": [{"name": name, "type": kind, "msgpack": raw.hex(), "fields": fields}
                    for name, kind, raw, fields in lenient],
        "invalid": [{"name": name, "type": kind, "msgpack": raw.hex(),
                     "error": ErrorCode.BAD_REQUEST.value} for name, kind, raw in invalid],
    }


class _Drop:
    pass


_DROP = _Drop()


# -- tensor_encoding.json ---------------------------------------------------------------


def tensor_encoding() -> dict[str, Any]:
    cases: list[tuple[str, str, dict[str, np.ndarray], str]] = [
        ("float32 matrix", "inputs",
         {"x": np.array([[0.0, 0.5, -1.25], [3.0, 1e-3, -0.0]], dtype=np.float32)}, "<"),
        ("float32 matrix given in big-endian order (travels little-endian)", "inputs",
         {"x": np.array([[0.0, 0.5, -1.25], [3.0, 1e-3, -0.0]], dtype=">f4")}, ">"),
        ("int64 vector with extremes", "outputs",
         {"label": np.array([7, -1, 2**63 - 1, -(2**63)], dtype=np.int64)}, "<"),
        ("uint8 image 2x2x3", "inputs",
         {"image": np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 21}, "<"),
        ("bool vector", "outputs", {"mask": np.array([True, False, True], dtype=np.bool_)}, "<"),
        ("0-d float64 scalar", "outputs", {"score": np.array(0.1, dtype=np.float64)}, "<"),
        ("empty 0x3 float32", "inputs", {"boxes": np.zeros((0, 3), dtype=np.float32)}, "<"),
        ("float16 and int32, two tensors in one body", "outputs",
         {"probs": np.array([0.25, 0.75], dtype=np.float16),
          "index": np.array([[1], [0]], dtype=np.int32)}, "<"),
        ("no tensors at all", "outputs", {}, "<"),
    ]
    vectors = []
    for name, field, tensors, order in cases:
        body = encode_body(field, tensors)
        vectors.append({
            "name": name,
            "field": field,
            "byte_order_given": order,
            "tensors": {k: {**tensor_json(a), "data": np.ascontiguousarray(
                a.astype(a.dtype.newbyteorder("<"))).tobytes().hex()} for k, a in tensors.items()},
            "body": body.hex(),
        })
    return {
        "description": "Bodies from skyhop.protocol.tensors.encode_body(field, tensors): msgpack "
                       "{field: {name: {dtype: str, shape: [int], data: bin}}}, data = C-order "
                       "little-endian element bytes. 'values' are the elements as nested lists "
                       "(a bare number for a 0-d tensor); 'byte_order_given' is the order of the "
                       "array handed to the encoder.",
        "vectors": vectors,
    }


# -- key_derivation.json ----------------------------------------------------------------


def key_derivation() -> dict[str, Any]:
    reply_cases = [
        (bytes(range(32)), REQUEST_ID),
        (b"\xff" * 32, "ffffffffffffffffffffffffffffffff"),
        (fixed_bytes("request key 1"), "5e1f0c3a9b7d4e2f8a6c1b0d9e8f7a6b"),
        (fixed_bytes("request key 2"), "00000000000000000000000000000000"),
    ]
    private_keys = [
        ("RFC 7748 section 6.1, Alice",
         bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")),
        ("RFC 7748 section 6.1, Bob",
         bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")),
        ("skyhop test fleet key", fixed_bytes("fleet private key")),
        ("skyhop other test key", fixed_bytes("other fleet private key")),
    ]
    return {
        "description": "reply_key = HKDF-SHA256(IKM=request_key, salt=empty, "
                       "info='skyhop/v1 reply ' + request id, L=32). key_id = lowercase hex of "
                       "the first 8 bytes of SHA-256(raw 32-byte X25519 public key).",
        "reply_keys": [{
            "request_key": key.hex(),
            "request_id": rid,
            "info": (REPLY_INFO + rid.encode()).hex(),
            "reply_key": reply_key(key, rid).hex(),
        } for key, rid in reply_cases],
        "key_ids": [{
            "name": name,
            "private_key": sk.hex(),
            "public_key": FleetKeyPair.from_raw(sk).public.raw.hex(),
            "key_id": key_id(FleetKeyPair.from_raw(sk).public.public),
        } for name, sk in private_keys],
    }


# -- aead.json --------------------------------------------------------------------------


def aead() -> dict[str, Any]:
    chacha = [
        ("RFC 8439 section 2.8.2", bytes(range(0x80, 0xA0)),
         bytes.fromhex("070000004041424344454647"),
         b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
         b"the future, sunscreen would be it.", bytes.fromhex("50515253c0c1c2c3c4c5c6c7")),
        ("empty plaintext, envelope-like AAD", bytes(range(32)), bytes(12), b"",
         b"SKH1\x02\x00\x00" + bytes(12)),
        ("empty AAD", fixed_bytes("aead key"), fixed_bytes("aead nonce", 12),
         b"skyhop/v1", b""),
    ]
    request_key = bytes(range(32))
    nonce = bytes.fromhex("000102030405060708090a0b")
    result = encode_body("outputs", {"label": np.array([7], dtype=np.int64),
                                     "probs": np.array([[0.25, 0.75]], dtype=np.float32)})
    replies = [
        ("result from an edge node", ReplyHeader(
            id=REQUEST_ID, status="OK", node="jetson-1", where="edge", queue_ms=0.5,
            service_ms=3.25), result, request_key, nonce),
        ("result with no tensors, other key and nonce", ReplyHeader(
            id="ffffffffffffffffffffffffffffffff", status="OK", node="gpu-a", where="cloud"),
         encode_body("outputs", {}), b"\xff" * 32, fixed_bytes("reply nonce", 12)),
    ]
    reply_vectors = []
    for name, header, body, key, n in replies:
        env = seal_reply(header, body, key, nonce=n)
        raw = header.encode()
        ct_start = 7 + len(raw) + 12
        reply_vectors.append({
            "name": name,
            "request_key": key.hex(),
            "reply_key": reply_key(key, header.id).hex(),
            "header": message_fields(header),
            "header_msgpack": raw.hex(),
            "nonce": n.hex(),
            "body": body.hex(),
            "aad": env[:ct_start].hex(),
            "ciphertext": env[ct_start:].hex(),
            "envelope": env.hex(),
        })
    first = bytes.fromhex(reply_vectors[0]["envelope"])
    hlen = struct.unpack_from(">H", first, 5)[0]
    negatives = [
        ("header byte altered (node name)", _flip(first, first.index(b"jetson-1")), request_key,
         ErrorCode.BAD_ENVELOPE),
        ("nonce byte altered", _flip(first, 7 + hlen), request_key, ErrorCode.BAD_ENVELOPE),
        ("ciphertext byte altered", _flip(first, 7 + hlen + 12), request_key,
         ErrorCode.BAD_ENVELOPE),
        ("tag byte altered", _flip(first, len(first) - 1), request_key, ErrorCode.BAD_ENVELOPE),
        ("opened with another request key", first, b"\xff" * 32, ErrorCode.BAD_ENVELOPE),
        ("truncated inside the tag (shorter than nonce + 16)",
         first[: 7 + hlen + 12 + 15], request_key, ErrorCode.BAD_REQUEST),
        ("truncated inside the header", first[: 7 + hlen - 1], request_key,
         ErrorCode.BAD_REQUEST),
        ("kind 0x01 (a request) where a reply is expected",
         first[:4] + bytes([Kind.REQUEST]) + first[5:], request_key, ErrorCode.BAD_REQUEST),
    ]
    errors = [
        ("broker: no node can meet the budget", ReplyHeader(
            id=REQUEST_ID, status="INFEASIBLE",
            message="best predicted 80.0 ms > 45.0 ms (90% of 50.0 ms left)")),
        ("node: queue full", ReplyHeader(
            id=REQUEST_ID, status="OVERLOADED", message="queue full (64 waiting)",
            node="jetson-1", where="edge")),
        ("broker: unreadable request, id unknown", ReplyHeader(
            id="", status="BAD_REQUEST", message="not a skyhop envelope (bad magic)")),
    ]
    return {
        "description": "ChaCha20-Poly1305 (RFC 8439): ciphertext = encrypted bytes || 16-byte "
                       "tag. reply_envelopes: kind 0x02 from seal_reply(header, body, "
                       "request_key, nonce=nonce), AEAD key = reply_key, AAD = every byte "
                       "before the ciphertext. reply_negatives: open_reply(envelope, "
                       "request_key) MUST fail with 'error'. error_envelopes: kind 0x03, clear "
                       "and unauthenticated.",
        "chacha20poly1305": [{
            "name": name, "key": key.hex(), "nonce": n.hex(), "plaintext": pt.hex(),
            "aad": ad.hex(), "ciphertext": ChaCha20Poly1305(key).encrypt(n, pt, ad).hex(),
        } for name, key, n, pt, ad in chacha],
        "reply_envelopes": reply_vectors,
        "reply_negatives": [{"name": name, "envelope": env.hex(), "request_key": key.hex(),
                             "error": code.value} for name, env, key, code in negatives],
        "error_envelopes": [{"name": name, "header": message_fields(h),
                             "header_msgpack": h.encode().hex(),
                             "envelope": error_reply(h).hex()} for name, h in errors],
    }


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


# -- hpke_wrap.json ---------------------------------------------------------------------


def hpke_wrap() -> dict[str, Any]:
    pk_r = FLEET.public.raw
    info = WRAP_INFO + FLEET.kid.encode()
    vectors = []
    for label, request_key in (("ephemeral key 1", bytes(range(32))),
                               ("ephemeral key 2", fixed_bytes("request key 1"))):
        sk_e = fixed_bytes(label)
        steps = hpke_seal(pk_r, info, request_key, sk_e)
        # The library must agree with the RFC 9180 code above, or the spec is wrong.
        assert SUITE.decrypt(steps["wrapped"], FLEET.private, info=info) == request_key
        vectors.append({
            "ephemeral_private_key": sk_e.hex(),
            "request_key": request_key.hex(),
            "info": info.hex(),
            "enc": steps["enc"].hex(),
            "dh": steps["dh"].hex(),
            "shared_secret": steps["shared_secret"].hex(),
            "key": steps["key"].hex(),
            "base_nonce": steps["base_nonce"].hex(),
            "ct": steps["ct"].hex(),
            "wrapped_key": steps["wrapped"].hex(),
        })
    body = encode_body("inputs", digits_inputs())
    header = request_header(body)
    request_key, nonce = bytes(range(32)), bytes.fromhex("0a0b0c0d0e0f101112131415")
    envelope, _ = spec_request_envelope(header, body, pk_r, fixed_bytes("ephemeral key 1"),
                                        request_key, nonce)
    return {
        "description": "HPKE (RFC 9180) base mode, single shot, suite KEM 0x0020 "
                       "DHKEM(X25519, HKDF-SHA256), KDF 0x0001 HKDF-SHA256, AEAD 0x0003 "
                       "ChaCha20-Poly1305, aad empty, with a FIXED ephemeral key so that "
                       "senders can check their wrap byte for byte. Computed by the RFC 9180 "
                       "code in tools/make_vectors.py; skyhop.protocol.envelope must open it. "
                       "wrapped_key = enc || ct (80 bytes).",
        "recipient_private_key": FLEET.private.private_bytes_raw().hex(),
        "recipient_public_key": pk_r.hex(),
        "kid": FLEET.kid,
        "suite": {"kem_id": KEM_ID, "kdf_id": KDF_ID, "aead_id": AEAD_ID},
        "wraps": vectors,
        "request_envelope": {
            "ephemeral_private_key": fixed_bytes("ephemeral key 1").hex(),
            "request_key": request_key.hex(),
            "nonce": nonce.hex(),
            "header": message_fields(header),
            "body": body.hex(),
            "envelope": envelope.hex(),
        },
    }


# -- request_envelopes.json (random HPKE ephemeral: generated once) ----------------------


def request_envelopes() -> dict[str, Any]:
    body = encode_body("inputs", digits_inputs())
    cases = [
        ("digits request, fixed request key and nonce", request_header(body), body,
         bytes(range(32)), bytes.fromhex("0a0b0c0d0e0f101112131415")),
        ("empty inputs, most urgent", request_header(
            encode_body("inputs", {}), id="ffffffffffffffffffffffffffffffff", priority=7,
            budget_ms=1000.0), encode_body("inputs", {}), fixed_bytes("request key 2"),
         fixed_bytes("request nonce 2", 12)),
        ("256-character reply topic: header longer than 255 bytes (hlen high byte 0x01)",
         request_header(body, id="00000000000000000000000000000001",
                        reply="skyhop/v1/reply/" + "r" * 240), body,
         fixed_bytes("request key 3"), fixed_bytes("request nonce 3", 12)),
    ]
    vectors = []
    for name, header, plaintext, key, nonce in cases:
        envelope, returned = seal_request(header, plaintext, FLEET.public,
                                          request_key=key, nonce=nonce)
        assert returned == key
        opened = open_request(envelope, {FLEET.kid: FLEET.private})
        assert opened.body == plaintext and opened.request_key == key
        raw = header.encode()
        off = 7 + len(raw)
        (wlen,) = struct.unpack_from(">H", envelope, off)
        vectors.append({
            "name": name,
            "envelope": envelope.hex(),
            "header": message_fields(header),
            "header_msgpack": raw.hex(),
            "wrapped_key": envelope[off + 2 : off + 2 + wlen].hex(),
            "nonce": nonce.hex(),
            "ciphertext": envelope[off + 2 + wlen + 12 :].hex(),
            "body": plaintext.hex(),
            "request_key": key.hex(),
        })

    env = bytes.fromhex(vectors[0]["envelope"])
    header = RequestHeader(**vectors[0]["header"])
    raw = header.encode()
    hlen = len(raw)
    off = 7 + hlen
    ct_start = off + 2 + 80 + 12
    urgent = dataclasses.replace(header, priority=1).encode()
    assert len(urgent) == hlen
    other_env, _ = seal_request(dataclasses.replace(header, kid=OTHER.kid), bytes.fromhex(
        vectors[0]["body"]), OTHER.public, request_key=bytes(range(32)),
        nonce=bytes.fromhex("0a0b0c0d0e0f101112131415"))
    relabelled = other_env.replace(OTHER.kid.encode(), FLEET.kid.encode(), 1)
    assert len(relabelled) == len(other_env)
    negatives = [
        ("header altered: priority 0 -> 1 (still valid msgpack)",
         env[:7] + urgent + env[off:], ErrorCode.BAD_ENVELOPE),
        ("header byte altered inside the reply topic", _flip(env, env.index(b"client-1"), 0x02),
         ErrorCode.BAD_ENVELOPE),
        ("wrapped key byte altered (enc)", _flip(env, off + 2), ErrorCode.BAD_ENVELOPE),
        ("wrapped key byte altered (HPKE tag)", _flip(env, off + 2 + 79), ErrorCode.BAD_ENVELOPE),
        ("nonce byte altered", _flip(env, ct_start - 1), ErrorCode.BAD_ENVELOPE),
        ("ciphertext byte altered", _flip(env, ct_start), ErrorCode.BAD_ENVELOPE),
        ("tag byte altered", _flip(env, len(env) - 1), ErrorCode.BAD_ENVELOPE),
        ("trailing byte appended", env + b"\x00", ErrorCode.BAD_REQUEST),  # size mismatch
        ("sealed to a key the workers do not hold (kid unknown)", other_env,
         ErrorCode.UNKNOWN_KEY),
        ("sealed to another key, header kid rewritten to the worker's", relabelled,
         ErrorCode.BAD_ENVELOPE),
        ("truncated inside the ciphertext", env[:-20], ErrorCode.BAD_REQUEST),  # size mismatch
        ("truncated inside the tag: fewer than 16 ciphertext bytes", env[: ct_start + 15],
         ErrorCode.BAD_REQUEST),
        ("truncated inside the wrapped key", env[: off + 40], ErrorCode.BAD_REQUEST),
        ("truncated before the wrapped-key length", env[:off], ErrorCode.BAD_REQUEST),
        ("truncated inside the header", env[: off - 1], ErrorCode.BAD_REQUEST),
        ("shorter than the 7-byte prefix", env[:6], ErrorCode.BAD_REQUEST),
        ("bad magic", b"SKH2" + env[4:], ErrorCode.BAD_REQUEST),
        ("unknown kind 0x04", env[:4] + b"\x04" + env[5:], ErrorCode.BAD_REQUEST),
        ("kind 0x02 (a reply) where a request is expected", env[:4] + b"\x02" + env[5:],
         ErrorCode.BAD_REQUEST),
    ]
    return {
        "description": "Request envelopes sealed by skyhop.protocol.envelope.seal_request to "
                       "the fleet "
                       "key below. HPKE uses a random ephemeral key, so these bytes are not "
                       "reproducible: generated once and committed (tools/make_vectors.py "
                       "--regenerate-envelopes re-seals them). open_request(envelope, "
                       "{kid: private key}) MUST give 'header', 'body' and 'request_key'; "
                       "each negative MUST fail with 'error'. TEST KEY ONLY.",
        "private_key": FLEET.private.private_bytes_raw().hex(),
        "public_key": FLEET.public.raw.hex(),
        "kid": FLEET.kid,
        "envelopes": vectors,
        "negatives": [{"name": name, "envelope": e.hex(), "error": code.value}
                      for name, e, code in negatives],
    }


# -- main -------------------------------------------------------------------------------


def dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=True) + "\n"


BUILDERS = {
    "header_encoding.json": header_encoding,
    "tensor_encoding.json": tensor_encoding,
    "key_derivation.json": key_derivation,
    "aead.json": aead,
    "hpke_wrap.json": hpke_wrap,
}
DETERMINISTIC = tuple(BUILDERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=VECTORS, help="directory to write into")
    parser.add_argument("--regenerate-envelopes", action="store_true",
                        help=f"re-seal {ENVELOPES} even if it exists (new random bytes)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        (args.out / name).write_text(dump(build()))
        print(f"wrote {args.out / name}")
    path = args.out / ENVELOPES
    if path.exists() and not args.regenerate_envelopes:
        print(f"kept {path} (pass --regenerate-envelopes to re-seal it)")
    else:
        path.write_text(dump(request_envelopes()))
        print(f"wrote {path} (new random HPKE ephemerals: commit it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

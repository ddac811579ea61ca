"""The committed wire-format vectors (tests/vectors/*.json) against the code.

Deterministic parts must match byte for byte; the committed request envelopes (random
HPKE ephemerals, sealed once) must open to exactly the recorded header, body and key,
both with skyhop.protocol.envelope and with the RFC 9180 code in tools/make_vectors.py that
follows docs/protocol.md alone; every negative must fail with its recorded error code.
Finally tools/make_vectors.py must rewrite the deterministic files byte-identically and
must leave the committed envelopes alone unless told to re-seal them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.envelope import (
    SUITE,
    FleetKeyPair,
    Kind,
    error_reply,
    open_reply,
    open_request,
    peek_reply,
    peek_request,
    reply_key,
    seal_reply,
)
from skyhop.protocol.messages import ReplyHeader, RequestHeader
from skyhop.protocol.tensors import decode_body, encode_body, encode_tensor

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
TOOL = ROOT / "tools" / "make_vectors.py"


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mv = _load_tool()


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


def h(s: str) -> bytes:
    return bytes.fromhex(s)


def ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


HEADERS = load("header_encoding.json")
TENSORS = load("tensor_encoding.json")
KEYS = load("key_derivation.json")
AEAD = load("aead.json")
HPKE = load("hpke_wrap.json")
REQUESTS = load("request_envelopes.json")


# -- messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", HEADERS["valid"], ids=ids(HEADERS["valid"]))
def test_message_encoding_is_exact(vector: dict[str, Any]) -> None:
    cls = mv.MESSAGE_TYPES[vector["type"]]
    value = cls(**mv.from_fields(vector["fields"]))
    assert value.encode() == h(vector["msgpack"])
    decoded = cls.decode(h(vector["msgpack"]))
    assert decoded == value
    assert mv.message_fields(decoded) == vector["fields"]


@pytest.mark.parametrize("vector", HEADERS["lenient"], ids=ids(HEADERS["lenient"]))
def test_lenient_encodings_are_accepted(vector: dict[str, Any]) -> None:
    cls = mv.MESSAGE_TYPES[vector["type"]]
    assert cls.decode(h(vector["msgpack"])) == cls(**mv.from_fields(vector["fields"]))


@pytest.mark.parametrize("vector", HEADERS["invalid"], ids=ids(HEADERS["invalid"]))
def test_invalid_encodings_are_refused(vector: dict[str, Any]) -> None:
    cls = mv.MESSAGE_TYPES[vector["type"]]
    with pytest.raises(ProtocolError) as info:
        cls.decode(h(vector["msgpack"]))
    assert info.value.code == ErrorCode(vector["error"])


# -- tensors ------------------------------------------------------------------------------


def _array(t: dict[str, Any], order: str = "<") -> np.ndarray:
    dtype = np.dtype(t["dtype"]).newbyteorder(order) if order == ">" else np.dtype(t["dtype"])
    return np.array(t["values"], dtype=dtype).reshape(t["shape"])


@pytest.mark.parametrize("vector", TENSORS["vectors"], ids=ids(TENSORS["vectors"]))
def test_tensor_bodies_are_exact(vector: dict[str, Any]) -> None:
    arrays = {k: _array(t, vector["byte_order_given"]) for k, t in vector["tensors"].items()}
    for name, t in vector["tensors"].items():
        assert encode_tensor(arrays[name])["data"] == h(t["data"])
    assert encode_body(vector["field"], arrays) == h(vector["body"])
    decoded = decode_body(vector["field"], h(vector["body"]))
    assert list(decoded) == list(vector["tensors"])
    for name, t in vector["tensors"].items():
        got = decoded[name]
        assert got.dtype.name == t["dtype"] and list(got.shape) == t["shape"]
        assert got.astype(got.dtype.newbyteorder("<")).tobytes() == h(t["data"])
        assert got.tolist() == t["values"]


# -- key derivation -----------------------------------------------------------------------


@pytest.mark.parametrize("vector", KEYS["reply_keys"])
def test_reply_key_derivation(vector: dict[str, Any]) -> None:
    assert h(vector["info"]) == b"skyhop/v1 reply " + vector["request_id"].encode("ascii")
    assert reply_key(h(vector["request_key"]), vector["request_id"]) == h(vector["reply_key"])
    # Independently: RFC 5869 with an empty salt.
    prk = mv.hkdf_extract(b"", h(vector["request_key"]))
    assert mv.hkdf_expand(prk, h(vector["info"]), 32) == h(vector["reply_key"])


@pytest.mark.parametrize("vector", KEYS["key_ids"], ids=ids(KEYS["key_ids"]))
def test_key_ids(vector: dict[str, Any]) -> None:
    pair = FleetKeyPair.from_raw(h(vector["private_key"]))
    assert pair.public.raw == h(vector["public_key"])
    assert pair.kid == vector["key_id"]
    assert mv.hashlib.sha256(h(vector["public_key"])).digest()[:8].hex() == vector["key_id"]


# -- AEAD and replies ---------------------------------------------------------------------


@pytest.mark.parametrize("vector", AEAD["chacha20poly1305"], ids=ids(AEAD["chacha20poly1305"]))
def test_chacha20poly1305(vector: dict[str, Any]) -> None:
    aead = ChaCha20Poly1305(h(vector["key"]))
    ct = aead.encrypt(h(vector["nonce"]), h(vector["plaintext"]), h(vector["aad"]))
    assert ct == h(vector["ciphertext"])
    assert aead.decrypt(h(vector["nonce"]), ct, h(vector["aad"])) == h(vector["plaintext"])


@pytest.mark.parametrize("vector", AEAD["reply_envelopes"], ids=ids(AEAD["reply_envelopes"]))
def test_sealed_replies_are_exact(vector: dict[str, Any]) -> None:
    header = ReplyHeader(**vector["header"])
    key, nonce, body = h(vector["request_key"]), h(vector["nonce"]), h(vector["body"])
    envelope = h(vector["envelope"])
    assert seal_reply(header, body, key, nonce=nonce) == envelope
    # Layout: "SKH1" | 0x02 | u16 hlen | header | nonce(12) | ciphertext.
    raw = h(vector["header_msgpack"])
    assert envelope[:5] == b"SKH1\x02"
    assert struct.unpack(">H", envelope[5:7])[0] == len(raw) == len(header.encode())
    assert envelope[7 : 7 + len(raw)] == raw
    assert envelope == h(vector["aad"]) + h(vector["ciphertext"])
    assert h(vector["aad"]) == envelope[: 7 + len(raw)] + nonce
    assert reply_key(key, header.id) == h(vector["reply_key"])
    plain = ChaCha20Poly1305(h(vector["reply_key"])).decrypt(
        nonce, h(vector["ciphertext"]), h(vector["aad"]))
    assert plain == body
    assert open_reply(envelope, key) == (header, body)
    assert peek_reply(envelope) == header


@pytest.mark.parametrize("vector", AEAD["reply_negatives"], ids=ids(AEAD["reply_negatives"]))
def test_bad_replies_are_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        open_reply(h(vector["envelope"]), h(vector["request_key"]))
    assert info.value.code == ErrorCode(vector["error"])


@pytest.mark.parametrize("vector", AEAD["error_envelopes"], ids=ids(AEAD["error_envelopes"]))
def test_error_replies_are_exact(vector: dict[str, Any]) -> None:
    header = ReplyHeader(**vector["header"])
    raw = h(vector["header_msgpack"])
    envelope = h(vector["envelope"])
    assert header.encode() == raw
    assert error_reply(header) == envelope == b"SKH1\x03" + struct.pack(">H", len(raw)) + raw
    # Clear and unauthenticated: any request key "opens" it.
    assert open_reply(envelope, bytes(32)) == (header, None)
    assert open_reply(envelope, b"\xff" * 32) == (header, None)


# -- HPKE wrap with a fixed ephemeral key ---------------------------------------------------


def test_hpke_recipient_key() -> None:
    pair = FleetKeyPair.from_raw(h(HPKE["recipient_private_key"]))
    assert pair.public.raw == h(HPKE["recipient_public_key"])
    assert pair.kid == HPKE["kid"]
    assert HPKE["suite"] == {"kem_id": 0x0020, "kdf_id": 0x0001, "aead_id": 0x0003}


@pytest.mark.parametrize("vector", HPKE["wraps"])
def test_hpke_wrap_opens_with_the_library(vector: dict[str, Any]) -> None:
    """The RFC 9180 computation in the spec and cryptography's HPKE agree."""
    private = FleetKeyPair.from_raw(h(HPKE["recipient_private_key"])).private
    info = h(vector["info"])
    assert info == b"skyhop/v1 wrap " + HPKE["kid"].encode("ascii")
    wrapped = h(vector["wrapped_key"])
    assert wrapped == h(vector["enc"]) + h(vector["ct"]) and len(wrapped) == 80
    assert SUITE.decrypt(wrapped, private, info=info) == h(vector["request_key"])
    assert mv.hpke_open(h(HPKE["recipient_private_key"]), info, wrapped) == h(
        vector["request_key"])
    steps = mv.hpke_seal(h(HPKE["recipient_public_key"]), info, h(vector["request_key"]),
                         h(vector["ephemeral_private_key"]))
    for name in ("enc", "dh", "shared_secret", "key", "base_nonce", "ct"):
        assert steps[name] == h(vector[name]), name


def test_spec_built_request_envelope_opens() -> None:
    vector = HPKE["request_envelope"]
    private = FleetKeyPair.from_raw(h(HPKE["recipient_private_key"])).private
    opened = open_request(h(vector["envelope"]), {HPKE["kid"]: private})
    assert opened.header == RequestHeader(**vector["header"])
    assert opened.body == h(vector["body"])
    assert opened.request_key == h(vector["request_key"])


# -- request envelopes (committed, random ephemerals) -----------------------------------------


def _check_request_envelope(doc: dict[str, Any], vector: dict[str, Any]) -> None:
    private_raw = h(doc["private_key"])
    pair = FleetKeyPair.from_raw(private_raw)
    assert pair.public.raw == h(doc["public_key"]) and pair.kid == doc["kid"]
    envelope = h(vector["envelope"])
    header = RequestHeader(**vector["header"])
    body, key = h(vector["body"]), h(vector["request_key"])

    opened = open_request(envelope, {doc["kid"]: pair.private})
    assert opened.header == header
    assert opened.body == body
    assert opened.request_key == key
    assert peek_request(envelope) == header

    # Walk the layout exactly as docs/protocol.md describes it.
    assert envelope[:4] == b"SKH1" and envelope[4] == Kind.REQUEST
    (hlen,) = struct.unpack_from(">H", envelope, 5)
    raw = envelope[7 : 7 + hlen]
    assert raw == h(vector["header_msgpack"]) == header.encode()
    (wlen,) = struct.unpack_from(">H", envelope, 7 + hlen)
    assert wlen == 80
    wrapped = envelope[9 + hlen : 9 + hlen + wlen]
    nonce = envelope[9 + hlen + wlen : 21 + hlen + wlen]
    ciphertext = envelope[21 + hlen + wlen :]
    assert wrapped == h(vector["wrapped_key"])
    assert nonce == h(vector["nonce"])
    assert ciphertext == h(vector["ciphertext"])
    assert header.size == len(ciphertext) == len(body) + 16
    info = b"skyhop/v1 wrap " + doc["kid"].encode("ascii")
    assert mv.hpke_open(private_raw, info, wrapped) == key
    aad = envelope[: 21 + hlen + wlen]
    assert ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad) == body


def _check_request_negative(doc: dict[str, Any], vector: dict[str, Any]) -> None:
    private = FleetKeyPair.from_raw(h(doc["private_key"])).private
    with pytest.raises(ProtocolError) as info:
        open_request(h(vector["envelope"]), {doc["kid"]: private})
    assert info.value.code == ErrorCode(vector["error"]), info.value.message


@pytest.mark.parametrize("vector", REQUESTS["envelopes"], ids=ids(REQUESTS["envelopes"]))
def test_committed_request_envelopes_open(vector: dict[str, Any]) -> None:
    _check_request_envelope(REQUESTS, vector)


@pytest.mark.parametrize("vector", REQUESTS["negatives"], ids=ids(REQUESTS["negatives"]))
def test_committed_bad_requests_are_refused(vector: dict[str, Any]) -> None:
    _check_request_negative(REQUESTS, vector)


def test_every_error_path_of_open_request_is_covered() -> None:
    codes = {v["error"] for v in REQUESTS["negatives"]}
    assert codes == {"BAD_REQUEST", "UNKNOWN_KEY", "BAD_ENVELOPE"}


# -- the generator ------------------------------------------------------------------------


def test_generator_is_deterministic_and_keeps_envelopes(tmp_path: Path) -> None:
    shutil.copy(VECTORS / mv.ENVELOPES, tmp_path / mv.ENVELOPES)
    before = (tmp_path / mv.ENVELOPES).read_bytes()
    subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=tmp_path)
    for name in mv.DETERMINISTIC:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
    assert (tmp_path / mv.ENVELOPES).read_bytes() == before


def test_regenerated_envelopes_are_valid(tmp_path: Path) -> None:
    assert mv.main(["--out", str(tmp_path), "--regenerate-envelopes"]) == 0
    doc = json.loads((tmp_path / mv.ENVELOPES).read_text())
    assert doc["envelopes"][0]["envelope"] != REQUESTS["envelopes"][0]["envelope"]  # random
    assert ids(doc["envelopes"]) == ids(REQUESTS["envelopes"])
    assert ids(doc["negatives"]) == ids(REQUESTS["negatives"])
    for vector in doc["envelopes"]:
        _check_request_envelope(doc, vector)
    for vector in doc["negatives"]:
        _check_request_negative(doc, vector)

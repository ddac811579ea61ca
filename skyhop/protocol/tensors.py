"""Tensors on the wire (docs/protocol.md §Tensors).

A tensor is the msgpack map ``{"dtype": str, "shape": [int, ...], "data": bin}`` with
``data`` the C-order, little-endian bytes. Only plain numeric dtypes travel: no
object arrays, so decoding never runs arbitrary code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skyhop.errors import ErrorCode, ProtocolError

DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_DIMS = 8
MAX_BYTES = 256 * 1024 * 1024  # a sealed MQTT message cannot exceed 256 MiB anyway


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise _bad(f"dtype {array.dtype.name} cannot travel; use one of {sorted(DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": np.ascontiguousarray(little).tobytes(),
    }


def decode_tensor(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, dict):
        raise _bad(f"tensor {name!r} must be a map with dtype, shape, data")
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype not in DTYPES:
        raise _bad(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative ints")
    if not isinstance(data, bytes):
        raise _bad(f"tensor {name!r}: data must be bytes")
    dt = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow on absurd shapes
    if expected != len(data) or expected > MAX_BYTES:
        raise _bad(
            f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)


def encode_tensors(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: encode_tensor(a) for name, a in tensors.items()}


def decode_tensors(value: Any) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad("tensors must be a map from names to tensors")
    return {name: decode_tensor(name, v) for name, v in value.items()}


def encode_body(field: str, tensors: dict[str, np.ndarray]) -> bytes:
    """A request body is ``{"inputs": tensors}``; a result body ``{"outputs": tensors}``."""
    import msgpack

    out: bytes = msgpack.packb({field: encode_tensors(tensors)}, use_bin_type=True)
    return out


def decode_body(field: str, data: bytes) -> dict[str, np.ndarray]:
    from skyhop.protocol.messages import unpackb

    body = unpackb(data)
    if not isinstance(body, dict) or field not in body:
        raise _bad(f"body must be a map with {field!r}")
    return decode_tensors(body[field])

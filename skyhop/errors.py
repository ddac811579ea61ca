"""Errors raised by skyhop, and the error codes that travel on the wire.

The tree::

    SkyhopError                 base of everything skyhop raises
     ├── ConfigError            bad config, home, keys or CLI input: fix the setup, then restart
     ├── TransportError         the MQTT connection failed (paho's errors are translated here)
     ├── ProtocolError          a message breaks docs/protocol.md; ``.code`` says what to reply
     └── RemoteError            the fleet answered a request with a named error (client side)

``ErrorCode`` values are the normative names of docs/protocol.md §Errors: every accepted
request ends with exactly one reply, either a result or one of these.
"""

from __future__ import annotations

from skyhop.compat import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "BAD_REQUEST"  # malformed message, wrong schema, dtype or shape, bad budget
    UNKNOWN_MODEL = "UNKNOWN_MODEL"  # no such model anywhere in the fleet
    UNKNOWN_KEY = "UNKNOWN_KEY"  # sealed to a key id the workers do not hold
    KEY_RETIRED = "KEY_RETIRED"  # sealed to a rotated-out key whose grace period ended
    BAD_ENVELOPE = "BAD_ENVELOPE"  # tampered header or ciphertext: authentication failed
    REPLAYED = "REPLAYED"  # request id already seen, or sent too long ago to tell
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the budget ran out before a result
    INFEASIBLE = "INFEASIBLE"  # no node can meet the budget, answered before trying
    OVERLOADED = "OVERLOADED"  # every candidate is full; retry later
    UNAVAILABLE = "UNAVAILABLE"  # no live node serves the model
    INTERNAL = "INTERNAL"  # a bug: the model or the worker failed unexpectedly


class SkyhopError(Exception):
    """Base of every error skyhop raises."""


class ConfigError(SkyhopError):
    """The setup is wrong (config, home, keys, arguments). Not retryable."""


class TransportError(SkyhopError):
    """The MQTT connection failed or was refused."""


class ProtocolError(SkyhopError):
    """A message breaks the protocol; ``code`` is the error to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(SkyhopError):
    """The fleet answered with a named error."""

    def __init__(self, code: ErrorCode | str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else str(code))
        self.code = code
        self.message = message

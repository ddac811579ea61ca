"""MQTT 5 messages and topic filters as values: no paho, no sockets.

``matches(filter, topic)`` is MQTT's own matching (§4.7), with ``$share/group/`` read
as the filter behind it; ``Bus`` and ``MemoryBus`` deliver by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One received (or to be sent) MQTT 5 message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    expiry_s: int | None = None  # remaining lifetime as forwarded by the broker


@dataclass(frozen=True)
class Will:
    """Last will: the broker publishes it if the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


Handler = Callable[[Message], None]


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"bad topic {topic!r}: must be a non-empty string")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"bad topic {topic!r}: wildcards are for subscriptions only")
    return topic


def match_filter(filt: str) -> str:
    """The filter that topics must match: ``$share/group/f`` matches like ``f``.

    Raises ValueError if ``filt`` is not a valid MQTT filter.
    """
    if not isinstance(filt, str) or not filt:
        raise ValueError(f"bad topic filter {filt!r}: must be a non-empty string")
    real = filt
    if filt.startswith("$share/"):
        parts = filt.split("/", 2)
        if len(parts) != 3 or not parts[1] or any(c in parts[1] for c in "+#") or not parts[2]:
            raise ValueError(f"bad shared subscription {filt!r}: use $share/<group>/<filter>")
        real = parts[2]
    levels = real.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise ValueError(f"bad topic filter {filt!r}: a wildcard must fill a whole level")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"bad topic filter {filt!r}: '#' must be the last level")
    return real


def matches(filt: str, topic: str) -> bool:
    """Whether ``topic`` matches the filter ``filt`` (a ``match_filter`` result).

    A filter that begins with a wildcard does not match a ``$`` topic (MQTT 5 §4.7.2)."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    want, have = filt.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)

"""paho's MQTT 5 ``Properties``, with its lookups made tables.

paho-mqtt 2.2 builds two dictionaries in every ``Properties()`` and finds a property's
identifier by scanning its 27 names, removing their spaces each time: a published
message with a response topic, correlation data and user properties cost about 700
``str.replace`` calls, and half the broker's time per request went to properties
(bench/path_profile.py, docs/performance.md §Where the time goes). ``FastProperties``
keeps paho's behaviour, checks and wire format, and computes the tables once.
``install()`` makes paho build it for every packet it reads; tests/unit/
test_mqtt_properties.py checks it against paho's own class, byte for byte.

If paho's table of properties ever differs from the one this was written against,
``install()`` leaves paho alone: slower, never wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as paho_client
import paho.mqtt.properties as paho_properties
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("skyhop.mqtt")
P: Any = paho_properties  # paho's encoders, untyped

_PAHO: Any = P.Properties(PacketTypes.PUBLISH)
# paho's names in paho's order (pack writes in it), without their spaces.
_ORDER: tuple[tuple[str, int], ...] = tuple(
    (name.replace(" ", ""), ident) for name, ident in _PAHO.names.items()
)
_IDENT: dict[str, int] = dict(_ORDER)
_SPACED: dict[int, str] = {ident: name for name, ident in _PAHO.names.items()}
_MULTIPLE = frozenset({11, 38})  # Subscription Identifier, User Property
_SHARED = ("types", "names", "properties")  # paho's tables, the same for every instance
_PRIVATE = frozenset({"packetType", *_SHARED})
_RANGES = {  # paho's checks on a single value
    "ReceiveMaximum": (1, 65535), "TopicAlias": (1, 65535), "TopicAliasMaximum": (0, 65535),
    "MaximumPacketSize": (1, 268435455), "SubscriptionIdentifier": (1, 268435455),
    "RequestResponseInformation": (0, 1), "RequestProblemInformation": (0, 1),
    "PayloadFormatIndicator": (0, 1),
}
# paho's type indices: Byte, Two Byte Integer, Four Byte Integer, Variable Byte Integer,
# Binary Data, UTF-8 Encoded String, UTF-8 String Pair.
BYTE, INT16, INT32, VBI, BINARY, UTF8, PAIR = range(7)
# The table this module was checked against (paho-mqtt 2.2); install() compares.
_KNOWN = {1: BYTE, 2: INT32, 3: UTF8, 8: UTF8, 9: BINARY, 11: VBI, 17: INT32, 18: UTF8,
          19: INT16, 21: UTF8, 22: BINARY, 23: BYTE, 24: INT32, 25: BYTE, 26: UTF8, 28: UTF8,
          31: UTF8, 33: INT16, 34: INT16, 35: INT16, 36: BYTE, 37: BYTE, 38: PAIR, 39: INT32,
          40: BYTE, 41: BYTE, 42: BYTE}


def _range_error(name: str, value: Any) -> MQTTException | None:
    bounds = _RANGES.get(name)
    if bounds is None or bounds[0] <= value <= bounds[1]:
        return None
    low, high = bounds
    if (low, high) == (0, 1):
        return MQTTException(f"{name} property value must be 0 or 1")
    return MQTTException(f"{name} property value must be in the range {low}-{high}")


def _write(ident: int, kind: int, value: Any) -> bytes:
    return b"".join((P.VariableByteIntegers.encode(ident), *_encode(kind, value)))


def _encode(kind: int, value: Any) -> tuple[Any, ...]:
    if kind == BYTE:
        return (bytes([value]),)
    if kind == INT16:
        return (P.writeInt16(value),)
    if kind == INT32:
        return (P.writeInt32(value),)
    if kind == VBI:
        return (P.VariableByteIntegers.encode(value),)
    if kind == BINARY:
        return (P.writeBytes(value),)
    if kind == UTF8:
        return (P.writeUTF(value),)
    return P.writeUTF(value[0]), P.writeUTF(value[1])


def _read(buffer: bytes, kind: int, left: int) -> tuple[Any, int]:
    if kind == BYTE:
        return buffer[0], 1
    if kind == INT16:
        return P.readInt16(buffer), 2
    if kind == INT32:
        return P.readInt32(buffer), 4
    if kind == VBI:
        value, n = P.VariableByteIntegers.decode(buffer)
    elif kind == BINARY:
        value, n = P.readBytes(buffer, left)
    elif kind == UTF8:
        value, n = P.readUTF(buffer, left)
    else:
        return _read_pair(buffer, left)
    return value, n


def _read_pair(buffer: bytes, left: int) -> tuple[Any, int]:
    first, n1 = P.readUTF(buffer, left)
    second, n2 = P.readUTF(buffer[n1:], left - n1)
    return (first, second), n1 + n2


class FastProperties(Properties):  # paho's class is untyped
    """paho's Properties; the same attributes, checks, errors and bytes."""

    def __init__(self, packetType: int) -> None:  # paho's names
        for name in _SHARED:  # read-only: paho never writes to them
            object.__setattr__(self, name, getattr(_PAHO, name))
        object.__setattr__(self, "packetType", packetType)

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENT.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        return _SPACED.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:
        return _IDENT.get(compressedName) in _MULTIPLE

    def __setattr__(self, name: str, value: Any) -> None:
        name = name.replace(" ", "")
        if name in _PRIVATE:
            object.__setattr__(self, name, value)
            return
        ident = _IDENT.get(name)
        if ident is None:
            raise MQTTException(f"Property name must be one of {self.names.keys()}")
        if self.packetType not in self.properties[ident][1]:
            raise MQTTException(f"Property {name} does not apply to packet type "
                                f"{PacketTypes.Names[self.packetType]}")
        if not isinstance(value, list) and (error := _range_error(name, value)) is not None:
            raise error
        if ident in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in self.__dict__:
                value = self.__dict__[name] + value
        object.__setattr__(self, name, value)

    def _present(self) -> list[tuple[str, int]]:
        return [(name, ident) for name, ident in _ORDER if name in self.__dict__]

    def isEmpty(self) -> bool:
        return not self._present()

    def clear(self) -> None:
        for name, _ in self._present():
            delattr(self, name)

    def json(self) -> dict[str, Any]:
        data = {}
        for name, _ in self._present():
            value = self.__dict__[name]
            correlation = name == "CorrelationData" and isinstance(value, bytes)
            data[name] = value.hex() if correlation else value
        return data

    def __str__(self) -> str:
        return "[" + ", ".join(f"{n} : {self.__dict__[n]}" for n, _ in self._present()) + "]"

    def pack(self) -> bytes:
        parts = []
        for name, ident in self._present():
            kind, value = _KNOWN[ident], self.__dict__[name]
            values = value if ident in _MULTIPLE else [value]
            parts += [_write(ident, kind, v) for v in values]
        body = b"".join(parts)
        return b"".join((P.VariableByteIntegers.encode(len(body)), body))

    def unpack(self, buffer: bytes) -> tuple[FastProperties, int]:
        self.clear()
        length, used = P.VariableByteIntegers.decode(buffer)
        buffer, left = buffer[used:], length
        while left > 0:
            ident, n = P.VariableByteIntegers.decode(buffer)
            buffer, left = buffer[n:], left - n
            kind = self.properties[ident][0]  # a KeyError on an unknown one, as paho
            value, n = _read(buffer, kind, left)
            buffer, left = buffer[n:], left - n
            name = _SPACED[ident].replace(" ", "")
            if ident not in _MULTIPLE and name in self.__dict__:
                raise MQTTException(f"Property '{name}' must not exist more than once")
            setattr(self, name, value)
        return self, length + used


def install() -> bool:
    """Make paho build FastProperties for the packets it reads; False if paho's table
    is not the one FastProperties was checked against (then paho is left as it is)."""
    table = {ident: kind for ident, (kind, _) in _PAHO.properties.items()}
    if table != _KNOWN or set(_IDENT.values()) != set(_KNOWN):
        log.debug("paho-mqtt's property table changed: its own Properties are used")
        return False
    setattr(paho_packet, "Properties", FastProperties)  # noqa: B010  # not exported
    setattr(paho_client, "Properties", FastProperties)  # noqa: B010
    return True

"""FastProperties against paho's own Properties: the same bytes, values and errors."""

from __future__ import annotations

import random
from typing import Any

import paho.mqtt._packet as paho_packet
import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from skyhop.mqtt.properties import FastProperties, install

# A value of each property's kind, and of the kinds that take several.
VALUES: dict[str, Any] = {
    "PayloadFormatIndicator": 1, "MessageExpiryInterval": 3600, "ContentType": "application/x",
    "ResponseTopic": "skyhop/replies/c1", "CorrelationData": bytes(range(32)),
    "SubscriptionIdentifier": 77, "SessionExpiryInterval": 0xFFFFFFFF,
    "AssignedClientIdentifier": "auto-1", "ServerKeepAlive": 30, "AuthenticationMethod": "x",
    "AuthenticationData": b"\x00\x01", "RequestProblemInformation": 1, "WillDelayInterval": 5,
    "RequestResponseInformation": 0, "ResponseInformation": "r", "ServerReference": "s",
    "ReasonString": "because", "ReceiveMaximum": 65535, "TopicAliasMaximum": 0,
    "TopicAlias": 9, "MaximumQoS": 1, "RetainAvailable": 1,
    "UserProperty": [("skyhop", "clock"), ("sent_ms", "1700000000000"), ("é", "ü")],
    "MaximumPacketSize": 268435455, "WildcardSubscriptionAvailable": 1,
    "SubscriptionIdentifierAvailable": 0, "SharedSubscriptionAvailable": 1,
}
PACKETS = [PacketTypes.PUBLISH, PacketTypes.CONNECT, PacketTypes.CONNACK, PacketTypes.PUBACK,
           PacketTypes.SUBSCRIBE, PacketTypes.DISCONNECT, PacketTypes.WILLMESSAGE]


def _set(cls: type, packet: int, names: list[str]) -> tuple[Any, Exception | None]:
    props = cls(packet)
    try:
        for name in names:
            setattr(props, name, VALUES[name])
    except (MQTTException, IndexError) as exc:  # paho's message for a Will: IndexError
        return props, exc
    return props, None


@pytest.mark.parametrize("packet", PACKETS)
def test_every_property_packs_to_pahos_bytes_or_fails_the_same(packet: int) -> None:
    rng = random.Random(packet)
    for _ in range(200):
        names = rng.sample(sorted(VALUES), rng.randint(0, 6))
        theirs, their_error = _set(Properties, packet, names)
        ours, our_error = _set(FastProperties, packet, names)
        assert repr(our_error) == repr(their_error)
        assert ours.pack() == theirs.pack()
        assert ours.json() == theirs.json() and str(ours) == str(theirs)
        assert ours.isEmpty() == theirs.isEmpty()


@pytest.mark.parametrize("packet", PACKETS)
def test_unpack_reads_what_paho_reads(packet: int) -> None:
    rng = random.Random(packet + 100)
    for _ in range(200):
        names = rng.sample(sorted(VALUES), rng.randint(0, 6))
        wire = _set(Properties, packet, names)[0].pack()
        theirs, their_len = Properties(packet).unpack(wire)
        ours, our_len = FastProperties(packet).unpack(wire)
        assert our_len == their_len and ours.json() == theirs.json()


def test_user_properties_accumulate_and_clear() -> None:
    ours, theirs = FastProperties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
    for props in (ours, theirs):
        props.UserProperty = ("a", "1")
        props.UserProperty = [("b", "2")]
    assert ours.UserProperty == theirs.UserProperty == [("a", "1"), ("b", "2")]
    ours.clear()
    assert ours.isEmpty() and not hasattr(ours, "UserProperty")


@pytest.mark.parametrize(("name", "value"), [("ReceiveMaximum", 0), ("TopicAlias", 65536),
                                             ("PayloadFormatIndicator", 2), ("Nonsense", 1)])
def test_bad_values_fail_as_in_paho(name: str, value: Any) -> None:
    errors = []
    for cls in (Properties, FastProperties):
        with pytest.raises(MQTTException) as caught:
            setattr(cls(PacketTypes.CONNECT if name == "ReceiveMaximum" else
                        PacketTypes.PUBLISH), name, value)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def test_a_duplicate_single_property_on_the_wire_is_refused() -> None:
    one = Properties(PacketTypes.PUBLISH)
    one.ResponseTopic = "a/b"
    body = one.pack()[1:]
    wire = bytes([2 * len(body)]) + body + body
    with pytest.raises(MQTTException):
        FastProperties(PacketTypes.PUBLISH).unpack(wire)


def test_install_makes_paho_read_packets_with_it() -> None:
    assert install()
    assert paho_packet.Properties is FastProperties

from __future__ import annotations

import dataclasses

import pytest

from skyhop.errors import ConfigError
from skyhop.mqtt.url import MqttUrl, TlsFiles


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port"),
    [
        ("mqtt://127.0.0.1:1883", "mqtt", "127.0.0.1", 1883),
        ("mqtt://broker.example", "mqtt", "broker.example", 1883),
        ("mqtts://broker.example", "mqtts", "broker.example", 8883),
        ("mqtts://broker.example:443", "mqtts", "broker.example", 443),
        ("MQTT://Broker:1884/", "mqtt", "broker", 1884),
        ("mqtt://[::1]:1883", "mqtt", "::1", 1883),
        ("  mqtt://localhost:2000  ", "mqtt", "localhost", 2000),
    ],
)
def test_parse(text: str, scheme: str, host: str, port: int) -> None:
    url = MqttUrl.parse(text)
    assert (url.scheme, url.host, url.port) == (scheme, host, port)
    assert url.tls is (scheme == "mqtts")


def test_str_round_trips() -> None:
    for text in ("mqtt://127.0.0.1:1883", "mqtts://h:8883", "mqtt://[::1]:1883"):
        assert str(MqttUrl.parse(text)) == text
        assert MqttUrl.parse(str(MqttUrl.parse(text))) == MqttUrl.parse(text)


def test_parse_accepts_a_parsed_url() -> None:
    url = MqttUrl.parse("mqtt://h:1")
    assert MqttUrl.parse(url) is url


def test_frozen() -> None:
    url = MqttUrl.parse("mqtt://h:1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        url.port = 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("localhost:1883", "no scheme"),
        ("127.0.0.1", "no scheme"),
        ("", "no scheme"),
        ("tcp://h:1883", "unsupported scheme 'tcp'"),
        ("ws://h:9001", "unsupported scheme 'ws'"),
        ("http://h", "unsupported scheme 'http'"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:99999", "out of range"),
        ("mqtt://h:abc", "bad broker URL"),
        ("mqtt://h:0", "port 0"),
        ("mqtt://h:1883/topic", "unexpected path"),
        ("mqtt://h:1883?x=1", "unexpected path"),
        ("mqtt://user:pw@h:1883", "credentials"),
    ],
)
def test_parse_rejects_with_a_hint(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        MqttUrl.parse(text)
    message = str(info.value)
    assert words in message
    assert "pw" not in message  # a password never reaches logs
    if "credentials" not in message:
        assert "mqtt://host:port" in message


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ConfigError):
        MqttUrl.parse(1883)


def test_tls_files_paths_and_validation(tmp_path) -> None:
    files = TlsFiles(str(tmp_path / "ca.pem"), tmp_path / "c.pem")
    assert files.ca == tmp_path / "ca.pem"
    assert files.key is None
    with pytest.raises(ConfigError, match="without a certificate"):
        TlsFiles(tmp_path / "ca.pem", key=tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="cannot load TLS CA file"):
        files.context()


def test_a_bus_whose_session_is_taken_over_stays_down_and_says_so(caplog) -> None:
    """An MQTT 5 server that disconnects us with 0x8E (session taken over: another client
    connected with our id) gets no reconnect from us, or the two would evict each other
    forever. Mosquitto 2.0.11 just closes the socket; EMQX and HiveMQ say 0x8E."""
    import threading
    from types import SimpleNamespace

    from skyhop.mqtt.bus import SESSION_TAKEN_OVER, Bus

    taken = threading.Event()
    bus = Bus("mqtt://127.0.0.1:1", "twin", on_taken_over=taken.set)
    from_server = SimpleNamespace(is_disconnect_packet_from_server=True)
    with caplog.at_level("ERROR", logger="skyhop.mqtt"):
        bus._on_disconnect(bus._client, None, from_server,
                           SimpleNamespace(value=SESSION_TAKEN_OVER), None)
    assert taken.wait(5) and bus.taken_over
    assert "session taken over" in caplog.text
    assert bus._client._reconnect_min_delay == 3600  # paho's own reconnect is parked
    attempts = bus._attempt
    bus._schedule_reconnect()
    assert bus._attempt == attempts  # and ours does nothing

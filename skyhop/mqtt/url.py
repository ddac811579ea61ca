"""Where the MQTT server is and how to trust it: values with no paho in them.

    url = MqttUrl.parse("mqtts://broker.example:8883")
    files = TlsFiles(ca="pki/ca.crt", cert="pki/cam-7.crt", key="pki/cam-7.key")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from skyhop.errors import ConfigError

if TYPE_CHECKING:
    import ssl  # imported where a context is made: ssl brings the socket module

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttUrl:
    """Where the broker is: ``MqttUrl.parse("mqtt://host:1883")`` or ``"mqtts://host"``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str | MqttUrl) -> MqttUrl:
        """Parse ``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883, TLS).

        Raises ConfigError with a hint for anything else.
        """
        if isinstance(url, MqttUrl):
            return url
        hint = "expected mqtt://host:port or mqtts://host:port (e.g. mqtt://127.0.0.1:1883)"
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"bad broker URL {url!r}: no scheme; {hint}")
        # Never echo a password into an error message (it ends up in logs).
        shown = re.sub(r"://[^/@]*@", "://***@", url.strip())
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:  # urllib's words, e.g. "Port out of range 0-65535"
            raise ConfigError(f"bad broker URL {shown!r}: {exc}; {hint}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"bad broker URL {shown!r}: unsupported scheme {scheme!r}; {hint}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"bad broker URL {shown!r}: credentials do not belong in the URL "
                "(it ends up in logs); configure them separately"
            )
        if not parts.hostname:
            raise ConfigError(f"bad broker URL {shown!r}: no host; {hint}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"bad broker URL {shown!r}: unexpected path or query; {hint}")
        if port == 0:
            raise ConfigError(f"bad broker URL {shown!r}: port 0; {hint}")
        return cls(scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme])

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for ``mqtts``: ``ca`` verifies the server; ``cert``/``key`` are this
    client's own certificate for mutual TLS (``key`` may be omitted if ``cert`` holds it).

    Connections require TLS 1.3 and verify the server's name against its certificate.
    """

    ca: Path | str
    cert: Path | str | None = None
    key: Path | str | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.key is not None and self.cert is None:
            raise ConfigError(f"TLS key {self.key} given without a certificate (cert=)")

    def context(self) -> ssl.SSLContext:
        """A client SSLContext (TLS 1.3 minimum). Raises ConfigError on unreadable files."""
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA file {self.ca}: {exc}") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load TLS client certificate {self.cert} / key {self.key}: {exc}"
                ) from None
        return ctx

"""The fleet's X.509 PKI: one CA, one certificate per identity, a CRL and a registry.

Pure builders (``make_ca``, ``make_leaf``, ``make_crl``) take the time as an argument and
touch no files; ``Pki`` is the thin layer that keeps them under ``HOME/pki/``::

    HOME/pki/ca.crt       the fleet CA (EC P-256, self-signed, pathlen 0); everyone needs it
    HOME/pki/ca.key       its private key (0600): keep this home offline if you can
    HOME/pki/NAME.crt     NAME's certificate: CN=NAME, OU=role
    HOME/pki/NAME.key     NAME's private key (0600): copy it only to NAME's machine
    HOME/pki/crl.pem      revoked serials, signed by the CA (Mosquitto's ``crlfile``)
    HOME/pki/index.json   every certificate issued: name, role, serial, not_after, revoked

Usage::

    pki = Pki(home_path)
    pki.init()                                      # the CA, an empty CRL and registry
    pki.issue("cam-7", "edge")                      # -> Issued(name, role, serial, ...)
    pki.issue("mqtt-server", "server", sans=["mqtt.example.org"])
    pki.revoke("cam-7")                             # re-signs crl.pem
    TlsFiles(*pki.credentials("cam-7"))             # what a component connects with

Mosquitto takes the username from the CN (``use_identity_as_username``), so a name is
an MQTT identity: the ACL (skyhop.security.acl) grants rights by name, from the role in the
registry. The role is also written into the certificate (OU) for humans and audits;
the registry is what the ACL trusts, so a role can never be forged by a certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyhop.errors import ConfigError
from skyhop.protocol.topics import check_name

# A ``site`` is an edge site's Mosquitto bridged to the cloud one: it logs in as the
# site and may do, for each agent issued to that site (``issue(..., site=)``), what
# that agent may (skyhop.security.acl, skyhop.security.bridge).
ROLES = ("edge", "cloud", "broker", "client", "operator", "site", "server")
AGENT_ROLES = frozenset({"edge", "cloud"})
CA_DAYS = 3650
LEAF_DAYS = 397  # the CA/Browser Forum ceiling: short enough that forgotten certs die
# Mosquitto (OpenSSL with X509_V_FLAG_CRL_CHECK) refuses EVERY client once the CRL is
# past its nextUpdate, so it is re-signed by each write and by `skyhop certs crl`.
CRL_DAYS = 90
# Devices without a battery-backed clock (many Jetson boards) boot slightly behind;
# backdating notBefore keeps a fresh certificate usable through small skews.
NOT_BEFORE_SLACK = dt.timedelta(minutes=10)
ORGANIZATION = "skyhop"
CA_NAME = "skyhop fleet CA"
# File names in HOME/pki/ that a certificate NAME.crt/NAME.key must not shadow.
_RESERVED = frozenset({"ca"})
_DNS_RE = re.compile(
    r"\A(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z"
)


class Credentials(NamedTuple):
    """The PEM files one component connects with: ``TlsFiles(*creds)``."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Issued:
    """One certificate in the registry. ``serial`` is the X.509 serial number."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime
    revoked: bool = False
    revoked_at: dt.datetime | None = None
    site: str | None = None  # an agent behind that site's bridge, if any

    def active(self, now: dt.datetime) -> bool:
        """Neither revoked nor expired at ``now``."""
        return not self.revoked and now < self.not_after

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["serial"] = f"{self.serial:x}"  # 159-bit serials: hex, as openssl prints them
        doc["not_after"] = self.not_after.isoformat()
        doc["revoked_at"] = self.revoked_at.isoformat() if self.revoked_at else None
        if self.site is None:
            del doc["site"]  # most identities: their index.json lines stay as they were
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Issued:
        revoked_at = doc.get("revoked_at")
        return cls(
            name=str(doc["name"]),
            role=str(doc["role"]),
            serial=int(str(doc["serial"]), 16),
            not_after=dt.datetime.fromisoformat(str(doc["not_after"])),
            revoked=bool(doc.get("revoked", False)),
            revoked_at=dt.datetime.fromisoformat(str(revoked_at)) if revoked_at else None,
            site=str(doc["site"]) if doc.get("site") else None,
        )


# --------------------------------------------------------------------------- pure builders


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def check_cert_name(name: str) -> str:
    """A certificate name is a skyhop name (it becomes topic levels via the ACL)."""
    check_name("certificate", name)
    if name.lower() in _RESERVED:
        raise ConfigError(f"certificate name {name!r} is reserved (it would overwrite ca.crt)")
    return name


def parse_san(text: str) -> x509.GeneralName:
    """``"10.0.0.5"``, ``"IP:10.0.0.5"``, ``"mqtt.example.org"`` or ``"DNS:..."``."""
    head, sep, rest = text.partition(":")
    kind = head.upper() if sep and head.upper() in ("DNS", "IP") else ""
    value = (rest if kind else text).strip()
    if kind != "DNS":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            if kind == "IP":
                raise ConfigError(f"bad --san {text!r}: not an IP address") from None
    if not _DNS_RE.match(value) or len(value) > 253:
        raise ConfigError(f"bad --san {text!r}: not a DNS name or an IP address")
    return x509.DNSName(value.lower())


def _name(common: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common))
    return x509.Name(attrs)


def _key_usage(*, sign: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    *, now: dt.datetime, days: int = CA_DAYS, name: str = CA_NAME
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed fleet CA: EC P-256, CA:true with pathlen 0 (it signs leaves only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_SLACK)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str,
    *,
    now: dt.datetime,
    days: int = LEAF_DAYS,
    sans: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``name`` (CN) in ``role`` (OU), signed by the CA.

    Every role but ``server`` gets clientAuth only; ``server`` gets serverAuth only and
    SANs ``localhost``, ``127.0.0.1`` and ``sans``. One purpose per certificate, so a
    stolen device key cannot impersonate the MQTT server and a server key cannot log in.
    """
    check_cert_name(name)
    check_role(role)
    if days < 1:
        raise ConfigError(f"bad validity {days} days: must be at least 1")
    if sans and role != "server":
        raise ConfigError("--san is for server certificates only (clients are named by CN)")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_SLACK)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if role == "server":
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        for extra in (parse_san(s) for s in sans):
            if extra not in names:
                names.append(extra)
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[Issued],
    *,
    now: dt.datetime,
    number: int,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """A CRL (v2, with CRL number and AKI) listing the serials of ``revoked``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - NOT_BEFORE_SLACK)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for item in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(item.serial)
            .revocation_date(item.revoked_at or now)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def role_of(cert: x509.Certificate) -> str | None:
    """The role recorded in ``cert`` (its OU), or None."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(values[0].value) if values else None


def name_of(cert: x509.Certificate) -> str:
    """The CN: the MQTT username and client id Mosquitto gives this certificate."""
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def read_identity(cert_path: Path | str) -> tuple[str, str | None]:
    """(name, role) of a certificate file: a component checks its node, broker or
    client id against the name before connecting, since the ACL grants by name."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {cert_path}: {exc}") from None
    return name_of(cert), role_of(cert)


def pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte (no umask window)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Pki:
    """The PKI of the fleet home at ``home`` (files under ``home/pki/``).

    Every method that writes takes ``now`` (default: the current UTC time) and raises
    ConfigError, with the command that fixes it, for a missing CA or a bad request.
    """

    def __init__(self, home: Path | str) -> None:
        self.home = Path(home).expanduser()
        self.dir = self.home / "pki"

    # paths
    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def cert_path(self, name: str) -> Path:
        return self.dir / f"{check_cert_name(name)}.crt"

    def key_path(self, name: str) -> Path:
        return self.dir / f"{check_cert_name(name)}.key"

    def credentials(self, name: str) -> Credentials:
        """The CA, certificate and key files of ``name``; ConfigError if not issued."""
        creds = Credentials(self.ca_path, self.cert_path(name), self.key_path(name))
        missing = [str(p) for p in creds if not p.is_file()]
        if missing:
            raise ConfigError(
                f"no certificate for {name!r} ({', '.join(missing)} missing): run "
                f"`skyhop certs issue {name} --role ROLE --home {self.home}`"
            )
        return creds

    # writing
    def init(
        self, *, now: dt.datetime | None = None, days: int = CA_DAYS, force: bool = False
    ) -> x509.Certificate:
        """Create the CA, an empty CRL and registry. Refuses to replace a CA unless
        ``force`` (which orphans every certificate it signed)."""
        now = now or _utcnow()
        if self.ca_key_path.exists() and not force:
            raise ConfigError(
                f"{self.dir} already holds a fleet CA (use --force to replace "
                "it; every certificate it issued then stops working)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        cert, key = make_ca(now=now, days=days)
        write_private(self.ca_key_path, key_pem(key))
        write_public(self.ca_path, pem(cert))
        self._save([], crl_number=0)
        self.refresh_crl(now=now)
        return cert

    def issue(
        self,
        name: str,
        role: str,
        *,
        sans: Sequence[str] = (),
        days: int = LEAF_DAYS,
        now: dt.datetime | None = None,
        renew: bool = False,
        site: str | None = None,
    ) -> Issued:
        """Issue ``name``'s certificate and key (NAME.crt, NAME.key, 0600) and record it.

        ``site`` puts an agent behind that edge site's bridge: the site's Mosquitto may
        then carry this agent's topics to the cloud one (skyhop.security.bridge).

        A name holds one role: while it has an active certificate, issuing again needs
        ``renew`` (same role; the older certificate stays valid until it expires or is
        revoked, so devices can be switched over one by one).
        """
        now = now or _utcnow()
        check_cert_name(name)
        check_role(role)
        if site is not None:
            check_cert_name(site)
            if role not in AGENT_ROLES:
                raise ConfigError(f"--site is for agents (edge, cloud), not a {role}")
        ca_cert, ca_key = self._ca()
        entries = self.entries()
        live = [e for e in entries if e.name == name and e.active(now)]
        clash = [
            e
            for e in entries
            if e.name != name and e.name.lower() == name.lower() and e.active(now)
        ]
        if clash:
            raise ConfigError(
                f"{name!r} differs from the existing {clash[0].name!r} only by "
                "case; pick another name"
            )
        if live and live[-1].role != role:
            raise ConfigError(
                f"{name!r} is a {live[-1].role} (serial {live[-1].serial:x}); "
                f"revoke it before issuing it as a {role}"
            )
        if live and not renew:
            raise ConfigError(
                f"{name!r} already has a certificate valid until "
                f"{live[-1].not_after:%Y-%m-%d}: pass --renew for another, "
                "or revoke it first"
            )
        cert, key = make_leaf(ca_cert, ca_key, name, role, now=now, days=days, sans=sans)
        write_private(self.key_path(name), key_pem(key))
        write_public(self.cert_path(name), pem(cert))
        item = Issued(name, role, cert.serial_number, cert.not_valid_after_utc, site=site)
        self._save([*entries, item])
        return item

    def revoke(self, name: str, *, now: dt.datetime | None = None) -> list[Issued]:
        """Revoke every unrevoked certificate of ``name`` and re-sign the CRL."""
        now = now or _utcnow()
        check_cert_name(name)
        self._ca()
        entries = self.entries()
        hit = [e for e in entries if e.name == name and not e.revoked]
        if not hit:
            known = any(e.name == name for e in entries)
            raise ConfigError(
                f"{name!r} has no certificate to revoke"
                + (" (already revoked)" if known else f" in {self.index_path}")
            )
        done = [replace(e, revoked=True, revoked_at=now) if e in hit else e for e in entries]
        self._save(done)
        self.refresh_crl(now=now)
        return [replace(e, revoked=True, revoked_at=now) for e in hit]

    def refresh_crl(
        self, *, now: dt.datetime | None = None, days: int = CRL_DAYS
    ) -> x509.CertificateRevocationList:
        """Re-sign crl.pem (a new CRL number, nextUpdate ``days`` from now)."""
        now = now or _utcnow()
        ca_cert, ca_key = self._ca()
        number = self._crl_number() + 1
        crl = make_crl(
            ca_cert,
            ca_key,
            [e for e in self.entries() if e.revoked],
            now=now,
            number=number,
            days=days,
        )
        write_public(self.crl_path, pem(crl))
        self._save(self.entries(), crl_number=number)
        return crl

    # reading
    def entries(self) -> list[Issued]:
        """Every certificate issued, oldest first (empty before ``init``)."""
        try:
            return [Issued.from_json(d) for d in self._load().get("certs", [])]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{self.index_path} is damaged: {exc!r}") from None

    def active(self, now: dt.datetime | None = None) -> list[Issued]:
        """Certificates neither revoked nor expired: the identities the ACL grants."""
        now = now or _utcnow()
        return [e for e in self.entries() if e.active(now)]

    def ca_certificate(self) -> x509.Certificate:
        return self._ca()[0]

    def ca_private_key(self) -> ec.EllipticCurvePrivateKey:
        """The CA's private key, for signing what the fleet must trust (key
        announcements). Only the operator's home holds it."""
        return self._ca()[1]

    def crl(self) -> x509.CertificateRevocationList:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"no CRL at {self.crl_path}: run `skyhop certs crl --home {self.home}`"
            ) from None

    # internals
    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        except FileNotFoundError:
            raise ConfigError(
                f"no fleet CA in {self.dir}: run `skyhop certs init --home {self.home}` first"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{self.dir}: damaged CA files ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key_path} is not an EC key")
        return cert, key

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ConfigError(f"{self.index_path} is damaged: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ConfigError(f"{self.index_path}: not a version 1 skyhop certificate index")
        return doc

    def _crl_number(self) -> int:
        return int(self._load().get("crl_number", 0))

    def _save(self, entries: list[Issued], *, crl_number: int | None = None) -> None:
        number = self._crl_number() if crl_number is None else crl_number
        doc = {"version": 1, "crl_number": number, "certs": [e.to_json() for e in entries]}
        write_public(self.index_path, (json.dumps(doc, indent=2) + "\n").encode())

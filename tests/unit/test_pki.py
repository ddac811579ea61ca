"""The fleet PKI: certificates as Mosquitto and OpenSSL will judge them, the registry,
the CRL, file modes, and one-line errors. No network."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyhop.errors import ConfigError
from skyhop.security.pki import (
    CA_DAYS,
    LEAF_DAYS,
    NOT_BEFORE_SLACK,
    Issued,
    Pki,
    make_ca,
    make_crl,
    make_leaf,
    name_of,
    parse_san,
    read_identity,
    role_of,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
CLIENT_ROLES = ["edge", "cloud", "broker", "client", "operator"]


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_ca(now=NOW)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "home")
    p.init(now=NOW)
    return p


def ext(cert: x509.Certificate, kind: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


# -- pure builders -----------------------------------------------------------------------


def test_ca_is_a_p256_ca_that_signs_leaves_only(ca) -> None:
    cert, key = ca
    assert isinstance(key.curve, ec.SECP256R1)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=CA_DAYS)


@pytest.mark.parametrize("role", CLIENT_ROLES)
def test_client_roles_get_client_auth_only(ca, role: str) -> None:
    ca_cert, ca_key = ca
    cert, key = make_leaf(ca_cert, ca_key, "cam-7", role, now=NOW)
    cert.verify_directly_issued_by(ca_cert)
    assert name_of(cert) == "cam-7" and role_of(cert) == role
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(cert, x509.BasicConstraints).ca
    assert isinstance(key.curve, ec.SECP256R1)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    aki = ext(cert, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).digest


def test_server_gets_server_auth_and_sans(ca) -> None:
    ca_cert, ca_key = ca
    cert, _ = make_leaf(
        ca_cert,
        ca_key,
        "mqtt-server",
        "server",
        now=NOW,
        sans=["mqtt.example.org", "IP:10.0.0.5", "127.0.0.1", "DNS:LocalHost"],
    )
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = ext(cert, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    ]


def test_validity_defaults_backdating_and_the_ca_ceiling(ca) -> None:
    ca_cert, ca_key = ca
    cert, _ = make_leaf(ca_cert, ca_key, "n", "edge", now=NOW)
    assert cert.not_valid_before_utc == NOW - NOT_BEFORE_SLACK
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=LEAF_DAYS)
    short, _ = make_leaf(ca_cert, ca_key, "n", "edge", now=NOW, days=1)
    assert short.not_valid_after_utc == NOW + dt.timedelta(days=1)
    long, _ = make_leaf(ca_cert, ca_key, "n", "edge", now=NOW, days=CA_DAYS * 2)
    assert long.not_valid_after_utc == ca_cert.not_valid_after_utc  # never outlives the CA


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "a b", "-x", "x" * 65, "ca", "CA", "é"])
def test_bad_names_are_refused(ca, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        make_leaf(*ca, name, "edge", now=NOW)


def test_bad_role_days_and_client_sans_are_refused(ca) -> None:
    with pytest.raises(ConfigError, match="unknown role 'admin'"):
        make_leaf(*ca, "n", "admin", now=NOW)
    with pytest.raises(ConfigError, match="at least 1"):
        make_leaf(*ca, "n", "edge", now=NOW, days=0)
    with pytest.raises(ConfigError, match="server certificates only"):
        make_leaf(*ca, "n", "client", now=NOW, sans=["x.example"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", x509.IPAddress(ipaddress.ip_address("10.0.0.5"))),
        ("IP:::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("mqtt.Example.org", x509.DNSName("mqtt.example.org")),
        ("DNS:*.fleet.example", x509.DNSName("*.fleet.example")),
    ],
)
def test_parse_san(text: str, expected: x509.GeneralName) -> None:
    assert parse_san(text) == expected


@pytest.mark.parametrize("text", ["IP:mqtt.example", "a b", "DNS:x/y", "-bad.example", ""])
def test_parse_san_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="bad --san"):
        parse_san(text)


def test_crl_lists_serials_and_is_signed_by_the_ca(ca) -> None:
    ca_cert, ca_key = ca
    gone = Issued("old", "edge", 0x1234, NOW, revoked=True, revoked_at=NOW)
    crl = make_crl(ca_cert, ca_key, [gone], now=NOW, number=7, days=30)
    assert crl.is_signature_valid(ca_cert.public_key())
    assert [r.serial_number for r in crl] == [0x1234]
    assert crl.next_update_utc == NOW + dt.timedelta(days=30)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert crl.issuer == ca_cert.subject


# -- the home: files, registry, errors ---------------------------------------------------


def test_issue_before_init_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run `skyhop certs init --home .*` first"):
        Pki(tmp_path).issue("cam-1", "edge")


def test_init_writes_the_ca_a_crl_and_refuses_to_overwrite(tmp_path: Path) -> None:
    p = Pki(tmp_path)
    first = p.init(now=NOW)
    assert stat.S_IMODE(p.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(p.ca_key_path.stat().st_mode) == 0o600
    assert p.ca_certificate() == first
    assert list(p.crl()) == [] and p.entries() == []
    with pytest.raises(ConfigError, match="already holds a fleet CA"):
        p.init(now=NOW)
    assert p.init(now=NOW, force=True) != first


def test_issue_writes_key_0600_cert_and_registry(pki: Pki) -> None:
    item = pki.issue("cam-1", "edge", now=NOW)
    creds = pki.credentials("cam-1")
    assert creds == (pki.ca_path, pki.dir / "cam-1.crt", pki.dir / "cam-1.key")
    assert stat.S_IMODE(creds.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.cert.stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    assert cert.serial_number == item.serial and read_identity(creds.cert) == ("cam-1", "edge")
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "edge"
    doc = json.loads(pki.index_path.read_text())
    assert doc["certs"] == [
        {
            "name": "cam-1",
            "role": "edge",
            "serial": f"{item.serial:x}",
            "not_after": item.not_after.isoformat(),
            "revoked": False,
            "revoked_at": None,
        }
    ]
    assert pki.entries() == [item]


def test_a_name_holds_one_certificate_and_one_role(pki: Pki) -> None:
    first = pki.issue("cam-1", "edge", now=NOW)
    with pytest.raises(ConfigError, match="--renew"):
        pki.issue("cam-1", "edge", now=NOW)
    with pytest.raises(ConfigError, match=r"is a edge .* revoke it before issuing it as a client"):
        pki.issue("cam-1", "client", now=NOW, renew=True)
    with pytest.raises(ConfigError, match="only by case"):
        pki.issue("CAM-1", "edge", now=NOW)
    second = pki.issue("cam-1", "edge", now=NOW, renew=True)
    assert second.serial != first.serial
    assert [e.serial for e in pki.active(NOW)] == [first.serial, second.serial]


def test_revoke_updates_the_crl_and_the_registry(pki: Pki) -> None:
    keep = pki.issue("cam-2", "edge", now=NOW)
    a = pki.issue("cam-1", "edge", now=NOW)
    b = pki.issue("cam-1", "edge", now=NOW, renew=True)
    number = pki.crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    later = NOW + dt.timedelta(hours=1)
    done = pki.revoke("cam-1", now=later)
    assert {e.serial for e in done} == {a.serial, b.serial}
    crl = pki.crl()
    assert {r.serial_number for r in crl} == {a.serial, b.serial}
    assert crl.is_signature_valid(pki.ca_certificate().public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert [e.name for e in pki.active(later)] == ["cam-2"] and keep in pki.entries()
    assert all(e.revoked_at == later for e in pki.entries() if e.name == "cam-1")
    with pytest.raises(ConfigError, match="already revoked"):
        pki.revoke("cam-1", now=later)
    with pytest.raises(ConfigError, match="no certificate to revoke"):
        pki.revoke("nobody", now=later)
    again = pki.issue("cam-1", "client", now=later)  # a revoked name can be reused
    assert again.serial not in {r.serial_number for r in pki.crl()}


def test_active_excludes_expired_certificates(pki: Pki) -> None:
    pki.issue("brief", "client", now=NOW, days=1)
    assert [e.name for e in pki.active(NOW)] == ["brief"]
    assert pki.active(NOW + dt.timedelta(days=2)) == []
    pki.issue("brief", "client", now=NOW + dt.timedelta(days=2))  # expired: no --renew needed


def test_credentials_of_an_unknown_name_say_how_to_issue(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="skyhop certs issue ghost --role ROLE"):
        pki.credentials("ghost")


def test_a_damaged_registry_is_a_config_error(pki: Pki) -> None:
    pki.index_path.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        pki.entries()
    pki.index_path.write_text('{"version": 1, "certs": [{"name": "x"}]}')
    with pytest.raises(ConfigError, match="damaged"):
        pki.entries()
    pki.index_path.write_text('{"version": 9}')
    with pytest.raises(ConfigError, match="version 1"):
        pki.entries()


def test_issued_round_trips_through_json() -> None:
    item = Issued("n", "cloud", 2**158 + 5, NOW, revoked=True, revoked_at=NOW)
    assert Issued.from_json(json.loads(json.dumps(item.to_json()))) == item


# -- the CLI -----------------------------------------------------------------------------


def test_cli_issue_before_init_is_one_clear_error(tmp_path: Path, capsys) -> None:
    from skyhop.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["certs", "issue", "cam-1", "--role", "edge", "--home", str(tmp_path)])
    assert exit_.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "no fleet CA" in err and "skyhop certs init --home" in err


def test_cli_init_issue_revoke_list(tmp_path: Path, capsys) -> None:
    from skyhop.cli import main

    home = str(tmp_path)
    main(["certs", "init", "--home", home])
    main(["certs", "issue", "cam-1", "--role", "edge", "--home", home])
    main(["certs", "issue", "srv", "--role", "server", "--san", "10.1.2.3", "--home", home])
    main(["certs", "revoke", "cam-1", "--home", home])
    capsys.readouterr()
    main(["certs", "list", "--home", home])
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert set(rows) == {"cam-1", "srv"}
    assert "edge" in rows["cam-1"] and "no" not in rows["cam-1"].split("│")[5]
    assert rows["srv"].split("│")[5].strip() == "no"
    main(["acl", "render", "--home", home, "--prefix", "p/"])
    rights = json.loads(capsys.readouterr().out)
    assert rights["clients"] == []  # cam-1 is revoked; server certificates log in as nobody
    with pytest.raises(SystemExit):
        main(["certs", "issue", "x", "--role", "root", "--home", home])
    assert "unknown role 'root'" in capsys.readouterr().err

"""The fleet home: config and keys, read at the entry point (never at import).

Layout of a home directory (``skyhop init --home DIR``)::

    DIR/config.toml            validated by ``Config``; every field has a default
    DIR/keys/fleet.json        current fleet public key: {"kid": ..., "public": hex}
    DIR/keys/worker-KID.pem    the matching X25519 private key (mode 0600); only agents read it
    DIR/models/                cache of fetched model files
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import Field

from skyhop.compat import tomllib
from skyhop.errors import ConfigError
from skyhop.models import Catalog, load_catalog
from skyhop.mqtt.url import MqttUrl, TlsFiles
from skyhop.protocol.envelope import FleetKeyPair, FleetPublicKey
from skyhop.protocol.topics import DEFAULT_PREFIX
from skyhop.schema import Strict, validated

if TYPE_CHECKING:
    from skyhop.security.sla import SlaBook


class SlaEntry(Strict):
    budget_ms: float = Field(gt=0, le=3_600_000)
    priority: int = Field(0, ge=0, le=7)


class Config(Strict):
    mqtt: str = "mqtt://127.0.0.1:1883"
    prefix: str = DEFAULT_PREFIX
    catalog: Path | None = Field(None, description="model catalog; default: skyhop/catalog/")
    # The certificate name (CN) this home's commands connect as over mqtts when no
    # --identity is given: a bundle's node. None: each command's own (client, operator...).
    identity: str | None = None
    # Raw: each process validates its own section (cloud_broker/config.py, edge_agent/config.py).
    broker: dict[str, Any] = Field(default_factory=dict)
    agent: dict[str, Any] = Field(default_factory=dict)
    sla: dict[str, SlaEntry] = Field(default_factory=dict)


DEFAULT_CONFIG = """\
# skyhop fleet config. Every key is optional; shown here with its default.
mqtt = "mqtt://127.0.0.1:1883"   # overridden by --mqtt
prefix = "skyhop/v1/"
# catalog = "/etc/skyhop/catalog.toml"   # your own models; default: the bundled catalog

[broker]
policy = "deadline"        # deadline | round-robin | least-connection | weighted | power-of-two
margin = 0.9               # plan to finish within margin × budget
node_timeout_s = 5.0       # a node that has not reported for this long is dead
replay_window_s = 60.0
status_interval_s = 1.0
reply_grace_ms = 250.0
drain_s = 20.0             # on SIGTERM: wait this long for the replies to requests taken
client_rate = 0.0          # requests/s one client may send, beyond client_burst (0: any)
client_burst = 100.0
node_rate = 20.0           # status and load messages/s one node may send, beyond node_burst
node_burst = 40.0          # (0: any); an agent sends 1 / load_interval_s, 2/s by default

# The cloud GPU pool the broker scales (docs/architecture.md, The live cloud pool).
# Uncomment to change; `skyhop broker --pool local --pool-models digits` overrides.
# [broker.autoscale]
# backend = "none"             # none | local (cloud workers as `skyhop agent --role cloud` here)
# policy = "predictive"        # predictive | reactive | static-peak
# models = ["digits"]          # what a pool worker serves (backend = "local" needs it)
# min_size = 1
# max_size = 4
# interval_ms = 5000.0         # how often the pool is sized
# slots = 1                    # requests a worker runs at once (its agent --concurrency;
#                              # 2-4 on a GPU for small batches: docs/gpu.md)
# providers = []               # e.g. ["cuda"]; [] = the worker's TensorRT > CUDA > CPU
# gpus = []                    # e.g. [0, 1, 2, 3]: pool-1 on GPU 0, pool-2 on 1, … (agent --gpu)
# scale_to_zero = false
# downscale_delay_ms = 30000.0  # an idle worker goes after this hold, or after
# max_hold_leads = 2.0         # this many (cold start + interval) once bursts recur
# cold_start_prior_ms = 60000.0  # assumed until a cold start is measured
# early_warning = 1.0          # 1: buy ahead of any rise (holds the SLO through crowds);
#                              # 0: wait for the spill, when edges absorb daily swings
# cost_cap_per_hour = 4.0      # with price_per_gpu_hour = 1.0
# worker_prefix = "pool"       # workers are pool-1, pool-2, …

[agent]
queue_capacity = 64
# concurrency = 1   # requests run at once; default: 1 on a CPU, 4 on a GPU
# batching = true   # queued requests of one model share a run, up to its max_batch
# max_queue_delay_ms = 0.0  # wait this long for company (default: the catalog's, 0)
load_interval_s = 0.5
replay_window_s = 60.0
result_cache = 1024
# tensorrt_fp16 = false   # TensorRT engines in fp16 (cached in HOME/models/tensorrt)

# Per-model latency SLAs; a request without --budget-ms gets its model's budget.
# [sla.digits]
# budget_ms = 50
"""


def default_home() -> Path:
    return Path(os.environ.get("SKYHOP_HOME") or Path.home() / ".skyhop")


class Home:
    """A fleet home directory. Construct with the path; nothing is read until asked."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def init(self, *, force: bool = False) -> FleetPublicKey:
        """Create config and a fleet key pair; refuse to overwrite keys unless ``force``."""
        if (self.keys_dir / "fleet.json").exists() and not force:
            raise ConfigError(f"{self.path} is already a fleet home (use --force to re-key)")
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        config = self.path / "config.toml"
        if not config.exists():
            config.write_text(DEFAULT_CONFIG)
        pair = FleetKeyPair.generate()
        self._write_private(pair)
        self._write_public(pair.public)
        return pair.public

    def _write_private(self, pair: FleetKeyPair) -> None:
        pem = pair.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.keys_dir / f"worker-{pair.kid}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def _write_public(self, public: FleetPublicKey) -> None:
        doc = {
            "kid": public.kid,
            "public": public.raw.hex(),
            "suite": "X25519/HKDF-SHA256/ChaCha20-Poly1305",
        }
        (self.keys_dir / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n")

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    def config(self) -> Config:
        """The validated config; the ``broker`` and ``agent`` sections stay raw: their
        processes validate them (``cloud_broker.config.load``, ``edge_agent.config.load``)."""
        path = self.config_path
        if not path.exists():
            return Config()
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return validated(Config, raw, str(path))


    def catalog(self) -> Catalog:
        """The model catalog this fleet uses (relative paths are from the home)."""
        path = self.config().catalog
        return load_catalog(self.path / path if path is not None else None)

    def tls(self, mqtt_url: str, identity: str) -> TlsFiles | None:
        """TLS files for connecting as ``identity`` (its certificate's CN) to ``mqtt_url``.

        None for ``mqtt://``; for ``mqtts://`` the CA and ``pki/IDENTITY.crt``/``.key``,
        or a ConfigError that says which ``skyhop certs issue`` to run.
        """
        if not MqttUrl.parse(mqtt_url).tls:
            return None
        from skyhop.security.pki import Pki

        return TlsFiles(*Pki(self.path).credentials(identity))

    def trust(self) -> ec.EllipticCurvePublicKey | None:
        """The fleet CA's public key (verifies key announcements), if the home has a CA."""
        path = self.path / "pki" / "ca.crt"
        if not path.exists():
            return None
        key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{path}: the fleet CA must have an EC key")
        return key

    @property
    def audit_path(self) -> Path:
        """The audit trail (skyhop.audit)."""
        return self.path / "audit.jsonl"

    def revoked(self) -> frozenset[int]:
        """Serials that ``pki/crl.pem`` revokes (its CA signature checked); empty
        without a CA or CRL. Read at start: a broker re-reads it when restarted."""
        ca, path = self.trust(), self.path / "pki" / "crl.pem"
        if ca is None or not path.exists():
            return frozenset()
        crl = x509.load_pem_x509_crl(path.read_bytes())
        if not crl.is_signature_valid(ca):
            raise ConfigError(f"{path} is not signed by the fleet CA: copy it from the "
                              "operator's home again")
        return frozenset(r.serial_number for r in crl)

    def sla_book(self) -> SlaBook:
        """The SLAs this home's fleet CA lets a broker apply (skyhop.security.sla)."""
        from skyhop.security.sla import SlaBook

        return SlaBook(self.trust(), self.revoked())

    def fleet_public(self) -> FleetPublicKey:
        path = self.keys_dir / "fleet.json"
        try:
            doc = json.loads(path.read_text())
            key = FleetPublicKey.from_raw(bytes.fromhex(doc["public"]))
        except FileNotFoundError:
            raise ConfigError(
                f"no fleet key at {path}: run `skyhop init --home {self.path}`"
            ) from None
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"{path} is damaged ({exc}): restore it or re-run init --force"
            ) from None
        if key.kid != doc.get("kid"):
            raise ConfigError(f"{path}: kid {doc.get('kid')} does not match its key ({key.kid})")
        return key

    def rotate(self, *, grace_s: float, now_s: float) -> FleetPublicKey:
        """Make a new fleet key the current one; the old one stays valid ``grace_s`` more."""
        old = self.fleet_public()
        pair = FleetKeyPair.generate()
        self._write_private(pair)
        retired = self._retired()
        retired[old.kid] = now_s + grace_s
        (self.keys_dir / "retired.json").write_text(json.dumps(retired, indent=2) + "\n")
        self._write_public(pair.public)  # last: a crash before leaves the old key current
        return pair.public

    def _retired(self) -> dict[str, float]:
        """Rotated-out key ids -> the Unix time their grace ends."""
        path = self.keys_dir / "retired.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def worker_keys(self, now_s: float) -> WorkerKeys:
        """The worker private keys usable at ``now_s`` (agents only), by key id."""
        retired = self._retired()
        keys: dict[str, X25519PrivateKey] = {}
        for path in sorted(self.keys_dir.glob("worker-*.pem")):
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, X25519PrivateKey):
                raise ConfigError(f"{path} is not an X25519 key")
            kid = FleetKeyPair(private).kid
            if retired.get(kid, float("inf")) > now_s:
                keys[kid] = private
        if not keys:
            raise ConfigError(
                f"no worker keys in {self.keys_dir}: copy the fleet's keys/ from the "
                f"home made by `skyhop init`"
            )
        expired = frozenset(k for k, until in retired.items() if until <= now_s)
        return WorkerKeys(keys, expired)


@dataclass(frozen=True)
class WorkerKeys:
    """What an agent opens envelopes with, and which key ids it must call retired."""

    active: dict[str, X25519PrivateKey]
    retired: frozenset[str] = frozenset()

"""MQTT topic names, as one value object (docs/protocol.md §Topics).

Every topic skyhop uses is built here, so a prefix change or a new topic is one edit::

    >>> t = Topics()
    >>> t.req("digits")
    'skyhop/v1/req/digits'
    >>> t.node_of("skyhop/v1/nodes/cam-7/load")
    'cam-7'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from skyhop.errors import ConfigError

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DEFAULT_PREFIX = "skyhop/v1/"
# Broker replicas share the requests through this group; only brokers may join it.
BROKERS_GROUP = "skyhop-brokers"


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a legal model/node/client name, else raise ConfigError.

    Names become topic levels, so MQTT wildcards and separators are excluded.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"bad {kind} name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)"
        )
    return name


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.endswith("/") or any(c in self.prefix for c in "+#"):
            raise ConfigError(
                f"bad topic prefix {self.prefix!r}: must end with '/' and hold no wildcard"
            )

    # requests from clients, shared by broker replicas
    def req(self, model: str) -> str:
        return f"{self.prefix}req/{check_name('model', model)}"

    def req_shared(self, group: str) -> str:
        return f"$share/{check_name('group', group)}/{self.prefix}req/+"

    # per node
    def work(self, node: str) -> str:
        return f"{self.prefix}nodes/{check_name('node', node)}/work"

    def node_req(self, node: str, model: str) -> str:
        return f"{self.prefix}nodes/{check_name('node', node)}/req/{check_name('model', model)}"

    def status(self, node: str) -> str:
        return f"{self.prefix}nodes/{check_name('node', node)}/status"

    def load(self, node: str) -> str:
        return f"{self.prefix}nodes/{check_name('node', node)}/load"

    def ping(self, node: str) -> str:
        return f"{self.prefix}nodes/{check_name('node', node)}/ping"

    @property
    def status_all(self) -> str:
        return f"{self.prefix}nodes/+/status"

    @property
    def load_all(self) -> str:
        return f"{self.prefix}nodes/+/load"

    # operator and broker
    def sla(self, model: str) -> str:
        return f"{self.prefix}config/sla/{check_name('model', model)}"

    @property
    def sla_all(self) -> str:
        return f"{self.prefix}config/sla/+"

    @property
    def keys(self) -> str:
        """Retained, CA-signed announcement of the current fleet public key."""
        return f"{self.prefix}keys/fleet"

    @property
    def broker_status(self) -> str:
        return f"{self.prefix}broker/status"

    def broker_lost(self, broker_id: str) -> str:
        """A broker's Will: it died holding requests (clients send theirs again)."""
        return f"{self.prefix}broker/{check_name('broker', broker_id)}/lost"

    @property
    def broker_lost_all(self) -> str:
        return f"{self.prefix}broker/+/lost"

    def broker_replies(self, broker_id: str) -> str:
        return f"{self.prefix}broker/{check_name('broker', broker_id)}/replies"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}reply/{check_name('client', client_id)}"

    # parsing
    def level(self, topic: str, index: int) -> str | None:
        """The ``index``-th level after the prefix, or None if the topic is not ours."""
        if not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix) :].split("/")
        return parts[index] if len(parts) > index else None

    def model_of(self, topic: str) -> str | None:
        """Model name of a ``req/{model}`` or ``config/sla/{model}`` topic."""
        rest = topic[len(self.prefix) :] if topic.startswith(self.prefix) else ""
        for head in ("req/", "config/sla/"):
            if rest.startswith(head) and "/" not in rest[len(head) :]:
                return rest[len(head) :]
        return None

    def node_of(self, topic: str) -> str | None:
        """Node id of a ``nodes/{node}/...`` topic."""
        return self.level(topic, 1) if self.level(topic, 0) == "nodes" else None

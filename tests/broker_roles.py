"""The broker definitions (:mod:`npcbus.broker_setup`) applied to the local RabbitMQ under a vhost
and user names of a test's own, removed again afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from dataclasses import dataclass, field

from npcbus import broker_setup as bs


@dataclass
class BrokerRoles:
    vhost: str
    prefix: str
    passwords: dict[str, str]
    namespace: str = "npcbus"
    doc: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 5672
    more_ports: tuple[int, ...] = ()  # the other nodes of a cluster (same host)

    def user(self, role: str) -> str:
        return bs.user_name(self.prefix, role)

    def url(self, role: str, rotate: int = 0) -> str:
        """The role's AMQP_URL: one URL, or on a cluster every node's, starting at node ``rotate``."""
        ports = [self.port, *self.more_ports]
        k = rotate % len(ports)
        return ",".join(f"amqp://{self.user(role)}:{self.passwords[role]}@{self.host}:{p}/{self.vhost}"
                        for p in ports[k:] + ports[:k])

    def env(self) -> dict[str, str]:
        """The variables compose.yaml interpolates for the broker: the same names, test values."""
        out = {"AMQP_HOST": self.host, "AMQP_PORT": str(self.port), "AMQP_VHOST": self.vhost,
               "AMQP_USER_PREFIX": self.prefix, "NPCBUS_NAMESPACE": self.namespace}
        out.update({f"AMQP_PASSWORD_{r.upper()}": p for r, p in self.passwords.items()})
        return out

    def remove(self) -> None:
        users = [self.user(r) for r in (*bs.ROLES, bs.ADMIN)]
        for _ in range(3):  # an import still running on the broker may add them back once
            bs.remove(self.vhost, users)
            time.sleep(0.5)
            left = subprocess.run(["rabbitmqctl", "-q", "list_users", "--no-table-headers"], capture_output=True,
                                  text=True, timeout=60).stdout
            if not any(line.split("\t")[0] in users for line in left.splitlines()):
                return


def new_roles(namespace: str = "npcbus", *, port: int = 5672, more_ports: tuple[int, ...] = ()) -> BrokerRoles:
    tag = uuid.uuid4().hex[:10]
    return BrokerRoles(vhost=f"npcbus-test-{tag}", prefix=f"t{tag}-", namespace=namespace,
                       passwords={r: uuid.uuid4().hex for r in (*bs.ROLES, bs.ADMIN)}, port=port,
                       more_ports=more_ports)


@contextlib.contextmanager
def applied_roles(namespace: str = "npcbus", *, apply: bool = True):
    """New roles; with ``apply``, their definitions imported into the local broker. Removed after."""
    roles = new_roles(namespace)
    try:
        if apply:
            roles.doc = bs.definitions(namespace, roles.vhost, roles.passwords, user_prefix=roles.prefix, base_model="")
            bs.apply(roles.doc)
        yield roles
    finally:
        roles.remove()

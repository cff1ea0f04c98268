"""Broker definitions: one RabbitMQ user per role, each allowed only the names its role uses.

The roles and what each may do are derived from :mod:`npcbus.topology`, so the permissions follow
the names the code actually uses. RabbitMQ checks three permissions, each a regular expression over
exchange and queue names in a vhost:

* **configure**: declare or delete an exchange or queue. A role may configure only what it owns:
  the queues it consumes and its per-process (exclusive) queues. The exchanges, the shared queues
  and their bindings belong to the broker setup: they are in the definitions, loaded by the
  administrator (``npcbus broker apply``, or the broker at boot), and no role may declare or
  delete them. A service still calls :meth:`npcbus.bus.Bus.declare_topology`: where its user may
  not declare a name, it checks that the name exists (a passive declare needs no permission), so
  the single-user setup (guest, allowed everything) declares everything as before.
* **write**: publish to an exchange; bind a queue (write on the *queue*, read on the *exchange*).
  Replies go through ``NS.replies``, where each process binds its exclusive reply queue under the
  queue's own name: responders (infer, aggregator) may write there, requesters (gateway, infer and
  train, which fetch adapters) may bind their reply queue to it. No role may write to the default
  exchange.
* **read**: consume from a queue; bind a queue to an exchange.

Rejected messages are re-published by the bus to ``NS.dlx``, so every consuming role may write
there. The bus stamps every message with the connection's user id, which RabbitMQ verifies.

Why not the default exchange for replies: publishing to it needs write on ``amq.default`` only,
never on the queue it routes to (RabbitMQ 3.10 and later; topic permissions apply to topic
exchanges only), so a user that may reply that way can put a message in *any* queue of the vhost
by name (tests/test_broker_permissions.py shows it). Through ``NS.replies`` a responder reaches
reply queues only. On top of the permissions, the consumers of work queues check the
broker-validated sender: the training worker's ``ALLOWED_TASK_SENDERS`` lists the aggregator's
user (tasks come from the aggregator, the feedback loop and ``npcbus task publish``), the
aggregator's ``ALLOWED_SENDERS`` the training workers' user, and a task or delta sent by anyone
else is dead-lettered with its reason (``unauthorized_sender``).

One definitions document (:func:`definitions`) serves every way of applying it:

* ``python -m npcbus.broker_setup definitions --out FILE``: write it (passwords read from the
  environment and stored only as salted SHA-256 hashes). In ``compose.yaml`` the one-shot
  ``broker-init`` service writes it to a volume that RabbitMQ loads at boot (``load_definitions``).
* ``python -m npcbus.broker_setup apply``: import it into a running broker with
  ``rabbitmqctl import_definitions`` (run where ``rabbitmqctl`` reaches the broker, as an
  operator), then wait until it is in place. The tests use this with a vhost and user names of
  their own, and ``remove`` to delete them again.

Passwords come from ``AMQP_PASSWORD_<ROLE>`` (or a file named by ``AMQP_PASSWORD_<ROLE>_FILE``,
for Docker secrets); user names are ``AMQP_USER_PREFIX`` + role; the vhost is ``AMQP_VHOST``.

Policies: the shared work queues get ``delivery-limit``, dead-lettering to ``NS.dlx`` and a length
bound; generation queues a length bound with ``reject-publish``; the dead-letter queue a length
bound that drops the oldest. The queues' own arguments (:mod:`npcbus.topology`) set the same
values; RabbitMQ takes the lower of a numeric limit set both ways and the queue argument for
names (dead-letter exchange, overflow), so policy and arguments cannot pull in different
directions. The keys used (``delivery-limit``, ``dead-letter-exchange``, ``dead-letter-routing-key``,
``max-length``, ``overflow``) are accepted by RabbitMQ 3.10 and 4.x alike.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from npcbus.settings import Settings, SettingsError, env_field, resolve_gen_queue_type
from npcbus.topology import Topology, model_route_key

ROLES = ("gateway", "infer", "train", "aggregator")
ADMIN = "admin"
DEAD_MAX_LENGTH = 100_000
WORK_MAX_LENGTH = 1_000_000


@dataclass
class BrokerSetupSettings(Settings):
    """Users, vhost and names of the broker definitions (``python -m npcbus.broker_setup``)."""

    title: ClassVar[str] = "broker setup"

    vhost: str = env_field("AMQP_VHOST", "npcbus", "Broker vhost of the deployment (the path of AMQP_URL).",
                           check=lambda s: bool(s) and "/" not in s, check_msg="give a vhost name without '/'")
    user_prefix: str = env_field("AMQP_USER_PREFIX", "npcbus-",
                                 "Broker user names are this prefix + role (gateway, infer, train, aggregator, admin).",
                                 check=lambda s: all(c.isalnum() or c in "-_." for c in s),
                                 check_msg="use letters, digits, '-', '_' or '.'")
    namespace: str = env_field("NPCBUS_NAMESPACE", "npcbus", "Prefix of every exchange and queue name.")
    base_model: str = env_field("BASE_MODEL", "", "Base model: its generation queue is declared in the definitions.")
    with_admin: bool = env_field("AMQP_ADMIN_USER", True, "Define an administrator user (management UI) too.")
    gen_queue_type: str = env_field(
        "GEN_QUEUE_TYPE", "auto",
        "Type of the generation queues: `classic` (one broker), `quorum` (a cluster: replicated, survives a node's loss) "
        "or `auto` (quorum when AMQP_URL lists several nodes). Every service of a deployment must agree.",
        check=lambda s: s in ("auto", "classic", "quorum"), check_msg="must be auto, classic or quorum")
    amqp_url: str = env_field("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/",
                              "RabbitMQ URL (user, password, host, vhost); for a cluster, a comma-separated list of the nodes' URLs.")


# ------------------------------------------------------------------------------------------------
# permissions (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Permission:
    configure: str
    write: str
    read: str

    def allows(self, kind: str, name: str) -> bool:
        return re.search(getattr(self, kind), name) is not None


def _any(names: list[str]) -> str:
    """A regex matching exactly the given (already escaped) name patterns."""
    names = list(dict.fromkeys(names))
    return "^(" + "|".join(names) + ")$" if names else "^$"


def role_permissions(namespace: str) -> dict[str, Permission]:
    """configure/write/read regexes per role over the namespaced names of :class:`Topology`.

    configure: only what the role owns: the queues it consumes (declared when it starts consuming)
    and its per-process queues. No role may configure (declare or delete) an exchange, the dead
    letter queue or a queue another role consumes: the definitions declare them, and
    :meth:`npcbus.bus.Bus.declare_topology` checks them passively where it may not declare.
    write: the exchanges the role publishes to, plus the queues it binds (write on the queue).
    read: the queues it consumes, plus the exchanges its own queues bind to."""
    t = Topology(namespace)
    e = re.escape

    def n(suffix: str) -> str:
        return e(t.name(suffix))

    per_process = {k: n(k) + r"\..+" for k in ("reply", "events", "cancel", "versions", "gen")}
    tasks, deltas, leases = n("train.tasks"), n("train.deltas"), n("train.leases")
    experience, fetch_q = n("experience.pending"), n("fetch.requests")
    x = {k: e(getattr(t, k)) for k in ("train_exchange", "versions_exchange", "fetch_exchange", "gen_exchange",
                                        "cancel_exchange", "events_exchange", "experience_exchange",
                                        "replies_exchange", "dlx")}
    gateway = Permission(
        configure=_any([per_process["reply"], per_process["events"]]),
        write=_any([x["gen_exchange"], x["cancel_exchange"], x["experience_exchange"], x["dlx"],
                    per_process["events"], per_process["reply"]]),
        read=_any([per_process["reply"], per_process["events"], x["events_exchange"], x["replies_exchange"]]),
    )
    infer = Permission(
        configure=_any([per_process["gen"], per_process["reply"], per_process["cancel"], per_process["versions"]]),
        # replies go through NS.replies (reply queues only), never the default exchange
        write=_any([x["replies_exchange"], x["events_exchange"], x["fetch_exchange"], x["dlx"], per_process["gen"],
                    per_process["cancel"], per_process["versions"], per_process["reply"]]),
        read=_any([per_process["gen"], per_process["reply"], per_process["cancel"], per_process["versions"],
                   x["gen_exchange"], x["cancel_exchange"], x["versions_exchange"], x["replies_exchange"]]),
    )
    train = Permission(
        configure=_any([tasks, per_process["reply"], per_process["versions"]]),
        write=_any([x["train_exchange"], x["fetch_exchange"], x["dlx"], tasks, per_process["versions"],
                    per_process["reply"]]),
        read=_any([tasks, per_process["reply"], per_process["versions"], x["train_exchange"],
                   x["versions_exchange"], x["replies_exchange"]]),
    )
    consumed = [deltas, leases, experience, fetch_q]
    aggregator = Permission(
        configure=_any(consumed),
        write=_any([x["replies_exchange"], x["train_exchange"], x["versions_exchange"], x["dlx"], *consumed]),
        read=_any([*consumed, x["train_exchange"], x["fetch_exchange"], x["experience_exchange"]]),
    )
    return {"gateway": gateway, "infer": infer, "train": train, "aggregator": aggregator}


def policies(namespace: str, delivery_limit: int | None = None) -> list[dict]:
    """Policies of the namespace's queues (see the module docstring)."""
    t = Topology(namespace) if delivery_limit is None else Topology(namespace, delivery_limit=delivery_limit)
    e = re.escape
    work = "^" + e(t.name("")) + r"(train\.(tasks|deltas|leases)|experience\.pending)$"
    return [
        {"name": f"{namespace}.work", "pattern": work, "apply-to": "queues", "priority": 10,
         "definition": {"delivery-limit": t.delivery_limit, "dead-letter-exchange": t.dlx,
                        "max-length": WORK_MAX_LENGTH, "overflow": "reject-publish"}},
        {"name": f"{namespace}.gen", "pattern": "^" + e(t.name("gen.")), "apply-to": "queues", "priority": 10,
         "definition": {"max-length": t.gen_max_length, "overflow": "reject-publish", "dead-letter-exchange": t.dlx}},
        {"name": f"{namespace}.fetch", "pattern": "^" + e(t.fetch_queue.name) + "$", "apply-to": "queues",
         "priority": 10, "definition": {"dead-letter-exchange": t.dlx, "max-length": 10_000,
                                        "overflow": "reject-publish"}},
        {"name": f"{namespace}.dead", "pattern": "^" + e(t.dead_queue.name) + "$", "apply-to": "queues",
         "priority": 10, "definition": {"max-length": DEAD_MAX_LENGTH, "overflow": "drop-head"}},
    ]


# ------------------------------------------------------------------------------------------------
# definitions (pure)
# ------------------------------------------------------------------------------------------------


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_name(prefix: str, role: str) -> str:
    return f"{prefix}{role}"


def definitions(namespace: str, vhost: str, passwords: dict[str, str], *, user_prefix: str = "npcbus-",
                base_model: str | None = None, with_admin: bool = True, topology: bool = True,
                gen_queue_type: str = "classic") -> dict:
    """The definitions document: vhost, a user per role (+ admin), permissions, policies, and (with
    ``topology``) the exchanges, shared queues and their bindings, declared exactly as the services
    declare them."""
    missing = [r for r in (*ROLES, *([ADMIN] if with_admin else [])) if not passwords.get(r)]
    if missing:
        raise SettingsError("no broker password for role(s) " + ", ".join(missing)
                            + ": set " + ", ".join(f"AMQP_PASSWORD_{r.upper()}" for r in missing))
    perms = role_permissions(namespace)
    users, permissions = [], []
    for role in ROLES:
        name = user_name(user_prefix, role)
        users.append({"name": name, "password_hash": password_hash(passwords[role]),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        p = perms[role]
        permissions.append({"user": name, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read})
    if with_admin:
        name = user_name(user_prefix, ADMIN)
        users.append({"name": name, "password_hash": password_hash(passwords[ADMIN]),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]})
        permissions.append({"user": name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    doc: dict[str, Any] = {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "policies": [{"vhost": vhost, **p} for p in policies(namespace)],
    }
    if topology:
        t = Topology(namespace, gen_queue_type=gen_queue_type)
        doc["exchanges"] = [{"name": x.name, "vhost": vhost, "type": x.type, "durable": x.durable,
                             "auto_delete": False, "internal": False, "arguments": {}} for x in t.exchanges()]
        queues = list(t.shared_queues())
        if base_model is not None:
            queues.append(t.gen_queue(model_route_key(base_model or "npcbus-default")))
        doc["queues"] = [{"name": q.name, "vhost": vhost, "durable": q.durable, "auto_delete": q.auto_delete,
                          "arguments": dict(q.arguments)} for q in queues]
        doc["bindings"] = [{"source": ex, "vhost": vhost, "destination": q.name, "destination_type": "queue",
                            "routing_key": rk, "arguments": {}} for q in queues for ex, rk in q.bindings]
    return doc


def passwords_from_env(environ=None, *, with_admin: bool = True) -> dict[str, str]:
    """``AMQP_PASSWORD_<ROLE>``, or the contents of the file named by ``AMQP_PASSWORD_<ROLE>_FILE``."""
    environ = os.environ if environ is None else environ
    out = {}
    for role in (*ROLES, *([ADMIN] if with_admin else [])):
        key = f"AMQP_PASSWORD_{role.upper()}"
        if environ.get(key):
            out[role] = environ[key]
        elif environ.get(key + "_FILE"):
            out[role] = Path(environ[key + "_FILE"]).read_text().strip()
    return out


# ------------------------------------------------------------------------------------------------
# applying to a running broker with rabbitmqctl
# ------------------------------------------------------------------------------------------------


def _ctl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def apply(doc: dict, *, timeout: float = 60.0) -> None:
    """Import ``doc`` with ``rabbitmqctl import_definitions`` and wait until it is in place
    (the import runs asynchronously on the broker)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(doc, fh)
        path = fh.name
    os.chmod(path, 0o644)  # the broker may run as another user
    try:
        _ctl("import_definitions", path, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if _in_place(doc):
                    return
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the imported definitions did not show up in time")
            time.sleep(0.2)
    finally:
        os.unlink(path)


def _in_place(doc: dict) -> bool:
    for v in doc.get("vhosts", []):
        vhost = v["name"]
        perms = _ctl("list_permissions", "-p", vhost, "--no-table-headers")
        users = {line.split("\t")[0] for line in perms.splitlines() if line.strip()}
        if not {p["user"] for p in doc["permissions"] if p["vhost"] == vhost} <= users:
            return False
        pols = _ctl("list_policies", "-p", vhost, "--no-table-headers")
        names = {line.split("\t")[1] for line in pols.splitlines() if "\t" in line}
        if not {p["name"] for p in doc.get("policies", []) if p["vhost"] == vhost} <= names:
            return False
        if doc.get("queues"):
            qs = _ctl("list_queues", "-p", vhost, "--no-table-headers", "name")
            have = {q.strip() for q in qs.splitlines()}
            if not {q["name"] for q in doc["queues"] if q["vhost"] == vhost} <= have:
                return False
    return True


def remove(vhost: str, users: list[str]) -> None:
    """Delete a vhost (with everything in it) and users (best effort)."""
    for args in (("delete_vhost", vhost), *(("delete_user", u) for u in users)):
        try:
            _ctl(*args)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    d = sub.add_parser("definitions", help="write the definitions JSON (passwords from AMQP_PASSWORD_<ROLE>)")
    d.add_argument("--out", default="-", help="output file (default: stdout)")
    sub.add_parser("apply", help="import the definitions into the broker with rabbitmqctl")
    sub.add_parser("permissions", help="print the permission table (no passwords needed)")
    r = sub.add_parser("remove", help="delete the vhost and the role users with rabbitmqctl")
    r.add_argument("--yes", action="store_true", help="really delete")


def run(args) -> int:
    s = BrokerSetupSettings.from_env()
    if args.action == "permissions":
        print("| role | configure | write | read |\n| --- | --- | --- | --- |")
        for role, p in role_permissions(s.namespace).items():
            print(f"| {user_name(s.user_prefix, role)} | `{p.configure}` | `{p.write}` | `{p.read}` |")
        return 0
    if args.action == "remove":
        if not args.yes:
            print("refusing without --yes", file=sys.stderr)
            return 2
        remove(s.vhost, [user_name(s.user_prefix, r) for r in (*ROLES, ADMIN)])
        return 0
    doc = definitions(s.namespace, s.vhost, passwords_from_env(with_admin=s.with_admin), user_prefix=s.user_prefix,
                      base_model=s.base_model, with_admin=s.with_admin,
                      gen_queue_type=resolve_gen_queue_type(s.gen_queue_type, s.amqp_url))
    if args.action == "definitions":
        text = json.dumps(doc, indent=2)
        if args.out == "-":
            print(text)
        else:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
            print(f"definitions written to {out}: vhost {s.vhost!r}, users "
                  + ", ".join(u["name"] for u in doc["users"]))
        return 0
    apply(doc)
    print(f"definitions applied: vhost {s.vhost!r}, users " + ", ".join(u["name"] for u in doc["users"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npcbus.broker_setup", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

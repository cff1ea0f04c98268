"""Training tasks: build them, publish them, and read a task's data back.

A :class:`npcbus.messages.TrainingTask` names an adapter, its data, a number of optimizer steps,
hyperparameters, an optional deadline and a lease. Its data is one of:

* inline examples: ``{"examples": [...]}``; each record is an NPC turn
  (``{"request": ..., "response": ...}``, trained on prompt -> canonical JSON response) or a
  plain ``{"text": ...}`` record. :func:`build_tasks` deals inline examples round-robin over the
  tasks, so every example goes to exactly one task.
* a reference: ``{"path": "...", "shard": i, "num_shards": n}``, a JSON-lines file that every
  worker can read (shipped with the package, or on a volume); the task trains on records
  ``i, i+n, i+2n, ...`` of the file. Relative paths are resolved against the worker's working
  directory, then against the package's ``data_files`` folder.

The Python API mirrors ``npcbus task publish``::

    from npcbus.tasks import publish_tasks
    tasks = await publish_tasks(bus, "npc", path="npc_dialogue.jsonl", num_tasks=6, steps=20,
                                hyperparams={"lr": 5e-3, "batch_size": 4}, deadline_s=3600)

Only the issuer's side lives here; the training worker (``workers.train_worker``) consumes the
tasks, and the aggregator re-issues a task whose lease expired without a delta.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from npcbus.messages import TrainingTask

DATA_FILES = Path(__file__).resolve().parent / "data_files"
DEFAULT_LEASE_S = 600.0
DEFAULT_STEPS = 20


class TaskDataError(ValueError):
    """A task's data cannot be read (missing file, bad shard, malformed record)."""


def new_task_id() -> str:
    return uuid.uuid4().hex[:16]


def _split_round_robin(items: Sequence[Any], n: int) -> list[list[Any]]:
    return [list(items[i::n]) for i in range(n)]


def build_tasks(adapter: str, *, examples: Sequence[dict] | None = None, path: str | None = None,
                num_tasks: int = 1, steps: int = DEFAULT_STEPS, hyperparams: dict | None = None,
                base_model: str = "", deadline: float | None = None, deadline_s: float | None = None,
                lease_s: float = DEFAULT_LEASE_S, task_ids: Sequence[str] | None = None) -> list[TrainingTask]:
    """``num_tasks`` training tasks for ``adapter`` over inline ``examples`` or a file at ``path``.

    ``deadline`` is a unix time; ``deadline_s`` the same relative to now. A worker drops a task
    whose deadline has passed, and an expired task is not re-issued.
    """
    if (examples is None) == (path is None):
        raise ValueError("give either examples or path")
    if not adapter:
        raise ValueError("adapter must not be empty")
    if num_tasks < 1:
        raise ValueError("num_tasks must be >= 1")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if lease_s <= 0:
        raise ValueError("lease_s must be > 0")
    if deadline is None and deadline_s is not None:
        deadline = time.time() + deadline_s
    if task_ids is not None and len(task_ids) != num_tasks:
        raise ValueError("task_ids must have num_tasks entries")
    if examples is not None:
        examples = list(examples)
        if len(examples) < num_tasks:
            raise ValueError(f"{len(examples)} examples cannot feed {num_tasks} tasks")
        datas = [{"examples": part} for part in _split_round_robin(examples, num_tasks)]
    else:
        datas = [{"path": str(path), "shard": i, "num_shards": num_tasks} for i in range(num_tasks)]
    now = time.time()
    return [
        TrainingTask(task_id=task_ids[i] if task_ids else new_task_id(), adapter=adapter, data=data, steps=int(steps),
                     hyperparams=dict(hyperparams or {}), base_model=base_model, deadline=deadline,
                     lease_s=float(lease_s), attempt=0, issued_at=now)
        for i, data in enumerate(datas)
    ]


async def publish_tasks(bus, adapter: str, **kw) -> list[TrainingTask]:
    """Build tasks (see :func:`build_tasks`) and publish them to the tasks queue, confirmed.

    The message's own expiry is left unset even with a deadline: a worker that takes an expired
    task dead-letters it with its reason, which is more visible than a silent broker expiry.
    """
    tasks = build_tasks(adapter, **kw)
    await publish_task_messages(bus, tasks)
    return tasks


async def publish_task_messages(bus, tasks: Iterable[TrainingTask]) -> None:
    topo = bus.topology
    await bus.publish_many(topo.train_exchange, "task", list(tasks))


def reissue(task: TrainingTask | dict) -> TrainingTask:
    """The next attempt of a task whose lease expired: same id and data, ``attempt + 1``."""
    d = dict(vars(task)) if isinstance(task, TrainingTask) else dict(task)
    d.pop("TYPE", None)
    fields = {k: d[k] for k in ("task_id", "adapter", "data", "steps", "hyperparams", "base_model", "deadline",
                                "lease_s", "attempt") if k in d}
    fields["attempt"] = int(fields.get("attempt", 0)) + 1
    fields["issued_at"] = time.time()
    return TrainingTask(**fields)


# ------------------------------------------------------------------------------------------------
# reading a task's data (worker side)
# ------------------------------------------------------------------------------------------------


def resolve_data_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute():
        q = DATA_FILES / p
        if q.is_file():
            return q
    raise TaskDataError(f"data file {path!r} not found (looked in the working directory and {DATA_FILES})")


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise TaskDataError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(rec, dict):
                raise TaskDataError(f"{path}:{i}: a record must be a JSON object")
            out.append(rec)
    return out


def task_examples(data: dict) -> list[dict]:
    """The records a task trains on (inline, or its shard of a referenced file)."""
    if not isinstance(data, dict):
        raise TaskDataError("task data must be an object")
    if "examples" in data:
        ex = data["examples"]
        if not isinstance(ex, list) or not all(isinstance(r, dict) for r in ex):
            raise TaskDataError("data.examples must be a list of objects")
        if not ex:
            raise TaskDataError("data.examples is empty")
        return ex
    if "path" in data:
        records = read_jsonl(resolve_data_path(str(data["path"])))
        shard, n = data.get("shard", 0), data.get("num_shards", 1)
        if not (isinstance(shard, int) and isinstance(n, int) and n >= 1 and 0 <= shard < n):
            raise TaskDataError(f"bad shard {shard!r} of {n!r}")
        part = records[shard::n]
        if not part:
            raise TaskDataError(f"shard {shard} of {n} of {data['path']} is empty")
        return part
    raise TaskDataError("task data needs 'examples' or 'path'")

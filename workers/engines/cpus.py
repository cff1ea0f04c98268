"""CPUs of their own for an engine's processes (``ENGINE_CPUS``).

vLLM runs its engine core (the scheduler) and its model workers in processes of their own. On a
CPU host, and for the scheduler on GPU hosts too, those processes keep cores busy: the scheduler
polls its workers in a loop. Where the inference consumer shares a machine with the broker or a
gateway, every broker hop (the request in, the first token out) then waits for a core behind that
loop, which shows in the time to first token (docs/benchmarks.md, "Inference").

:func:`start_engine` starts an engine with its processes confined to the CPUs given, and then
moves the consumer's own threads to the other CPUs:

- the engine's processes inherit the CPUs of the thread that starts them, so that thread is
  confined to ``ENGINE_CPUS`` while the engine starts; processes started from other threads do not
  (vLLM starts its engine core from one), so every process the start made is then moved there,
  thread by thread;
- vLLM-CPU binds its OpenMP threads to ``VLLM_CPU_OMP_THREADS_BIND``, which is set to the same
  list while the engine starts, unless it is set already;
- once the engine runs, every thread of the consumer's process moves to the CPUs it was allowed
  before, less ``ENGINE_CPUS`` (all of them when nothing is left).

Only engines whose ``own_processes`` attribute is true are confined (vLLM); an engine that runs in
the consumer's process (transformers) is started as it is, with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["parse_cpu_list", "format_cpu_list", "cpu_list_ok", "set_process_cpus", "start_engine"]


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0,2-3"`` -> ``{0, 2, 3}``; the empty string gives the empty set. Raises ``ValueError``."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range (use e.g. 1 or 2-7,12)")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"{part!r}: the range runs backwards")
        if b - a > 4096:
            raise ValueError(f"{part!r}: the range is too long")
        cpus.update(range(a, b + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 2, 3}`` -> ``"0,2-3"``."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cpu_list_ok(text: str) -> bool:
    """For the setting's check: a well-formed CPU list (or empty)."""
    parse_cpu_list(text)
    return True


def set_process_cpus(cpus: Iterable[int]) -> None:
    """Move every thread of this process to ``cpus``."""
    _set_cpus_of(os.getpid(), frozenset(cpus))


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _set_cpus_of(pid: int, cpus: frozenset[int]) -> None:
    """Move every thread of process ``pid`` to ``cpus`` (best effort: threads come and go)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


async def start_engine(engine, engine_cpus: str, log=None) -> dict | None:
    """``await engine.start()``, with the engine's processes on ``engine_cpus`` (a CPU list) and
    this process's threads on the CPUs it had, less those. Returns the placement
    (``{"engine": "1", "consumer": "0"}``) or None when nothing was confined."""
    cpus = parse_cpu_list(engine_cpus or "")
    if not cpus:
        await engine.start()
        return None
    if not getattr(engine, "own_processes", False):
        if log is not None:
            log.warning("ENGINE_CPUS is ignored: this engine runs in the consumer's own process",
                        engine=getattr(engine, "name", type(engine).__name__))
        await engine.start()
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("ENGINE_CPUS needs a system with sched_setaffinity (Linux)")
    allowed = frozenset(os.sched_getaffinity(0))
    if not cpus <= allowed:
        raise ValueError(f"ENGINE_CPUS={format_cpu_list(cpus)} names CPUs this process may not use "
                         f"(it may use {format_cpu_list(allowed)})")
    rest = (allowed - cpus) or allowed
    bind_set = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    if bind_set:  # read by the engine's processes as they start
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = format_cpu_list(cpus)
    before = _descendants(os.getpid())
    os.sched_setaffinity(0, cpus)  # processes started from this thread inherit its CPUs
    try:
        await engine.start()
    finally:
        # processes started from other threads (vLLM starts its engine core from one) do not
        # inherit: every process the start made is moved to the engine's CPUs, thread by thread
        for pid in _descendants(os.getpid()) - before:
            _set_cpus_of(pid, cpus)
        set_process_cpus(rest)  # this thread and any thread started meanwhile
        if bind_set:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    placement = {"engine": format_cpu_list(cpus), "consumer": format_cpu_list(rest)}
    if log is not None:
        log.info("engine processes on CPUs of their own", engine_cpus=placement["engine"],
                 consumer_cpus=placement["consumer"])
    return placement

"""ENGINE_CPUS: the engine's processes on CPUs of their own, the consumer's threads on the others."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

from workers.engines.cpus import format_cpu_list, parse_cpu_list, set_process_cpus, start_engine

HAS_AFFINITY = hasattr(os, "sched_getaffinity")


def test_cpu_lists_parse_and_format():
    assert parse_cpu_list("") == frozenset()
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0,2-3, 7") == {0, 2, 3, 7}
    assert format_cpu_list({0, 2, 3, 7}) == "0,2-3,7"
    assert format_cpu_list(parse_cpu_list("4-6,1")) == "1,4-6"
    for bad in ("a", "1-", "3-1", "-2", "1.5"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_setting_is_validated():
    from npcbus.settings import SettingsError
    from workers.infer_worker import InferSettings

    assert InferSettings.from_env({"ENGINE_CPUS": "2-3"}).engine_cpus == "2-3"
    with pytest.raises(SettingsError, match="ENGINE_CPUS"):
        InferSettings.from_env({"ENGINE_CPUS": "two"})


class _ProcessEngine:
    """An engine that, like vLLM, computes in processes of its own: a real child process that
    reports the CPUs it started on, and a long-lived one started from another thread (as vLLM
    starts its engine core); it also starts a thread in the consumer's process."""

    name = "fake"
    own_processes = True

    def __init__(self):
        self.child: dict | None = None
        self.sleeper: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        # a thread that exists before the start (so it keeps the CPUs it had), like vLLM's
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._pool.submit(lambda: None).result()

    async def start(self):
        code = ("import json, os; print(json.dumps({'cpus': sorted(os.sched_getaffinity(0)), "
                "'bind': os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}))")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        self.child = json.loads(out)
        self.thread = threading.Thread(target=self._stop.wait, daemon=True)
        self.thread.start()
        self.sleeper = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))

    def close(self):
        self._stop.set()
        self._pool.shutdown()
        if self.sleeper is not None:
            self.sleeper.kill()
            self.sleeper.wait()


@pytest.fixture
def restore_cpus():
    allowed = os.sched_getaffinity(0)
    yield allowed
    set_process_cpus(allowed)


def _thread_cpus() -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(not HAS_AFFINITY or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two or more CPUs")
async def test_engine_processes_confined_and_consumer_moved_off(restore_cpus, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    allowed = sorted(restore_cpus)
    engine_cpu = allowed[-1]
    engine = _ProcessEngine()
    try:
        placement = await start_engine(engine, str(engine_cpu))
        # the engine's process ran on the engine's CPU only, with vLLM-CPU's OpenMP bind set to it
        assert engine.child == {"cpus": [engine_cpu], "bind": str(engine_cpu)}
        # the process started from another thread was moved there too
        assert os.sched_getaffinity(engine.sleeper.pid) == {engine_cpu}
        rest = set(allowed) - {engine_cpu}
        assert placement == {"engine": str(engine_cpu), "consumer": format_cpu_list(rest)}
        # every thread of this process, the one the engine started included, is off the engine's CPU
        threads = _thread_cpus()
        assert engine.thread.native_id in threads
        assert all(cpus == rest for cpus in threads.values()), threads
        # the bind variable is not left behind for engines started later
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    finally:
        engine.close()


@pytest.mark.skipif(not HAS_AFFINITY, reason="needs Linux")
async def test_in_process_engine_and_bad_lists_change_nothing(restore_cpus):
    class InProcess(_ProcessEngine):
        own_processes = False

    logged = []

    class Log:
        def warning(self, event, **kw):
            logged.append(event)

    engine = InProcess()
    try:
        assert await start_engine(engine, "0", Log()) is None
        assert engine.child["cpus"] == sorted(restore_cpus)  # not confined
        assert logged and "ignored" in logged[0]
        assert os.sched_getaffinity(0) == restore_cpus
    finally:
        engine.close()
    not_ours = max(restore_cpus) + 1
    with pytest.raises(ValueError, match="may not use"):
        await start_engine(_ProcessEngine(), str(not_ours))
    assert os.sched_getaffinity(0) == restore_cpus
    assert await start_engine(engine := _ProcessEngine(), "") is None  # empty: no confinement
    engine.close()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.skipif(not HAS_AFFINITY or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two or more CPUs")
async def test_vllm_engine_runs_confined(model_dir, restore_cpus):
    """The real vLLM engine: every thread of its engine core and worker processes is on the
    engine's CPU, none of the consumer's is, and it generates."""
    from workers.engines import SamplingSpec, TokenEvent, make_engine
    from workers.engines.cpus import _descendants
    from workers.infer_worker import InferSettings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cpu = max(restore_cpus)
    settings = InferSettings.from_env({}, engine="vllm", max_concurrency=4, max_loras=1, dtype="float32",
                                      max_model_len=512, engine_cpus=str(cpu))
    engine = make_engine(settings, model_dir)
    before = _descendants(os.getpid())  # processes other tests of this session may have left
    try:
        assert await start_engine(engine, settings.engine_cpus) is not None
        children = _descendants(os.getpid()) - before
        assert children, "vLLM started no process of its own"
        for pid in children:
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert os.sched_getaffinity(int(tid)) == {cpu}, (pid, tid)
        assert all(cpu not in cpus for cpus in _thread_cpus().values())
        tokens = []
        async for ev in engine.generate("confined-1", "The innkeeper said", SamplingSpec(max_tokens=4, ignore_eos=True)):
            if isinstance(ev, TokenEvent):
                tokens += ev.token_ids
        assert len(tokens) == 4
    finally:
        await engine.close()

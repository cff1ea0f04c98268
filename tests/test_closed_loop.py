"""The closed loop, end to end on the compose services as local processes: a chat turn answered by
adapter version N gets a thumbs up; the gateway publishes it as experience; the feedback loop turns
it into a training task; a worker trains it; the aggregator writes and announces version N+1; the
inference consumer swaps to it; the next chat turn is answered by version N+1 and says so."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from aggregator.loop import LoopSettings, batch_task_id, judge, load_rehearsal, rehearsal_records, training_record
from npcbus.messages import Experience

from .conftest import broker_up

RESPONSE = {"dialogue": "Welcome!", "emotion": "happy", "intent": "greet", "actions": [], "relationship_change": 0,
            "end_conversation": False}


def _exp(**kw) -> Experience:
    base = dict(experience_id="e1", adapter="npc", npc={"player_input": "hi"}, response=RESPONSE, score=1.0)
    base.update(kw)
    return Experience(**base)


def test_which_experience_becomes_training_data():
    s = LoopSettings.from_env({}, adapters=["npc"], min_score=0.5)
    assert judge(_exp(), s) == "accepted"
    assert judge(_exp(score=None), s) == "unscored"
    assert judge(_exp(score=0.2), s) == "low_score"
    assert judge(_exp(score=-1.0, thumbs="down"), s) == "low_score"
    assert judge(_exp(valid=False), s) == "invalid_response"
    assert judge(_exp(valid=False), LoopSettings.from_env({}, require_valid=False)) == "accepted"
    assert judge(_exp(adapter=""), s) == "no_adapter"
    assert judge(_exp(adapter="other"), s) == "other_adapter"
    assert judge(_exp(adapter="other"), LoopSettings.from_env({})) == "accepted"
    assert judge(_exp(response={}), s) == "malformed"
    assert training_record(_exp()) == {"request": {"player_input": "hi"}, "response": RESPONSE}
    assert batch_task_id(["b", "a"]) == batch_task_id(["a", "b"]) != batch_task_id(["a"])
    with pytest.raises(Exception, match="LOOP_MIN_BATCH"):
        LoopSettings.from_env({"LOOP_BATCH_SIZE": "2", "LOOP_MIN_BATCH": "3"})


def test_rehearsal_adds_the_adapters_persona_turns_in_a_fixed_order(tmp_path):
    from npcbus.model import persona_of, sft_records

    pool = load_rehearsal()  # the shipped fine-tuning turns, by persona
    assert sum(map(len, pool.values())) == len(sft_records()) and "innkeeper" in pool
    got = rehearsal_records(pool, "innkeeper", 5, "task-a")
    assert len(got) == 5 and all(persona_of(r) == "innkeeper" for r in got)
    assert len({json.dumps(r, sort_keys=True) for r in got}) == 5  # no repeats while they last
    assert got == rehearsal_records(pool, "innkeeper", 5, "task-a") != rehearsal_records(pool, "innkeeper", 5, "task-b")
    # an adapter that is no persona's rehearses any persona's turns; 0 adds none
    assert len({persona_of(r) for r in rehearsal_records(pool, "npc", 40, "t")}) > 1
    assert rehearsal_records(pool, "npc", 0, "t") == []
    # more than the pool holds: every turn, then again
    small = {"x": [{"request": {"persona_id": "x", "player_input": "hi"}, "response": {"dialogue": "Hello there."}}]}
    assert len(rehearsal_records(small, "x", 3, "t")) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request": {"persona_id": "x"}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_rehearsal(str(bad))
    with pytest.raises(Exception, match="LOOP_REHEARSAL"):
        LoopSettings.from_env({"LOOP_REHEARSAL": "-1"})


@pytest.mark.broker
@pytest.mark.timeout(600)
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
async def test_feedback_driven_round_produces_the_version_the_next_turn_uses(request, model_dir):
    from .stack_util import shared_stack

    stack = shared_stack(request, model_dir)
    await stack.wait_gateway_ready()
    before = stack.version()
    async with stack.chat() as ws:
        _deltas, first = await ws.turn("loop-1", "Good evening! Do you have a room for the night?")
        assert first["type"] == "turn.final", first
        assert first["adapter"] == "npc" and first["adapter_version"] is not None
        answered_by = first["adapter_version"]
        await ws.send({"type": "turn.feedback", "turn_id": "loop-1", "thumbs": "up"})
        ack = await ws.expect("turn.feedback.accepted", turn_id="loop-1")
        assert ack["score"] == 1.0 and ack["adapter_version"] == answered_by
        # a turn takes one feedback; feedback on a turn that never ran is refused
        await ws.send({"type": "turn.feedback", "turn_id": "loop-1", "score": -0.5})
        assert (await ws.expect("error"))["code"] == "duplicate_feedback"
        await ws.send({"type": "turn.feedback", "turn_id": "never", "thumbs": "down"})
        assert (await ws.expect("error"))["code"] == "unknown_turn"

        # the loop publishes a task whose data is this turn; the round produces a new version
        task_id = batch_task_id([ack["experience_id"]])
        end = time.monotonic() + 240
        while not any(task_id in m.get("task_ids", []) for m in stack.manifests()):
            assert time.monotonic() < end, "no version from the feedback's task\n" + stack.sup.tails(n=15)
            await asyncio.sleep(0.5)
        made = next(m for m in stack.manifests() if task_id in m.get("task_ids", []))
        assert made["version"] > before and made["version"] > answered_by
        published = stack.service_events("loop", "training task published from experience", task_id=task_id)
        assert published and published[0]["examples"] == 1
        accepted = stack.service_events("worker", "task accepted; training", task_id=task_id)
        assert accepted, "a training worker trained the feedback's task"

        # the inference consumer swaps to it; the next turn of the same session is answered by it
        new = made["version"]
        end = time.monotonic() + 120
        n = 2
        while True:
            _deltas, final = await ws.turn(f"loop-{n}", "Thank you. And a hot meal, please?")
            assert final["type"] == "turn.final", final
            if final["adapter_version"] is not None and final["adapter_version"] >= new:
                break
            assert time.monotonic() < end, f"turns still answered by version {final['adapter_version']}, not {new}"
            n += 1
            await asyncio.sleep(1.0)
        assert final["adapter"] == "npc" and final["adapter_version"] >= new
        swapped = stack.service_events("infer", "adapter version swapped", adapter="npc")
        assert any(e["version"] >= new for e in swapped)


@pytest.mark.broker
@pytest.mark.timeout(600)
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
async def test_every_persona_has_an_adapter_and_feedback_trains_the_one_that_answered(request, model_dir):
    """After the first start every shipped persona has an adapter (version 0: the one `npcbus model
    init` trained); a persona session that names no adapter uses its persona's, and feedback on its
    turn makes a new version of that adapter, which the next turn uses."""
    from npcbus.npc import load_personas

    from .stack_util import shared_stack

    stack = shared_stack(request, model_dir)
    await stack.wait_gateway_ready()
    personas = list(load_personas())
    for pid in personas:
        first = stack.manifests(pid)
        assert first and first[0]["version"] == 0, f"persona {pid} has no adapter"
        assert first[0].get("init", {}).get("persona") == pid, first[0]
    # the moment the gateway first said it is healthy, it already offered each persona its adapter (the
    # inference consumer asks the aggregator for every adapter before its first heartbeat), so a game
    # client that starts as soon as the system is healthy gets the persona's adapter in its first session
    listed = stack.personas_at_health
    assert listed is not None and set(listed) == set(personas), listed
    assert {pid: listed[pid]["adapter"] for pid in personas} == {pid: pid for pid in personas}, listed
    assert listed["innkeeper"]["known_entities"]
    pid = "blacksmith"
    async with stack.chat(persona_id=pid, adapter=None) as ws:
        started = next(e for e in ws.received if e["type"] == "session.started")
        assert started["adapter"] == pid, started
        _deltas, first = await ws.turn("persona-1", "Can you fix my sword?")
        assert first["type"] == "turn.final", first
        assert first["adapter"] == pid and first["adapter_version"] is not None
        await ws.send({"type": "turn.feedback", "turn_id": "persona-1", "thumbs": "up"})
        ack = await ws.expect("turn.feedback.accepted", turn_id="persona-1")
        task_id = batch_task_id([ack["experience_id"]])
        end = time.monotonic() + 240
        while not any(task_id in m.get("task_ids", []) for m in stack.manifests(pid)):
            assert time.monotonic() < end, f"no {pid} version from the feedback's task\n" + stack.sup.tails(n=15)
            await asyncio.sleep(0.5)
        new = next(m for m in stack.manifests(pid) if task_id in m.get("task_ids", []))["version"]
        assert new > first["adapter_version"]
        assert not any(task_id in m.get("task_ids", []) for m in stack.manifests()), "the npc adapter trained it"
        end = time.monotonic() + 120
        n = 2
        while True:
            _deltas, final = await ws.turn(f"persona-{n}", "Show me your wares.")
            if final.get("adapter_version") is not None and final["adapter_version"] >= new:
                break
            assert time.monotonic() < end, f"turns still answered by version {final.get('adapter_version')}, not {new}"
            n += 1
            await asyncio.sleep(1.0)
        assert final["adapter"] == pid

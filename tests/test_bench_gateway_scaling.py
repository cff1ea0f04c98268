"""bench.gateway --scaling: the arithmetic that turns CPU seconds into CPU per turn and a per-core
prediction, on fixed inputs. The measurement itself runs in ``python -m bench.gateway --scaling``
(``--quick`` for a short run) against the real broker, consumers and gateways."""

from __future__ import annotations

import itertools
import json
import types

import pytest

from bench import gateway as G


def test_part_of_names():
    assert G.part_of("consumer-3") == "consumer"
    assert G.part_of("gateway-12") == "gateway"
    assert G.part_of("broker") == "broker"
    assert G.part_of("clients") == "clients"
    assert G.part_of("bench-instant") == "bench-instant"  # a dash without a number is part of the name


def test_cpu_ms_per_turn_sums_the_processes_of_a_part():
    cpu = {"consumer-1": 1.0, "consumer-2": 0.5, "gateway-1": 0.8, "gateway-2": 0.4, "broker": 0.9, "clients": 2.0}
    got = G.cpu_ms_per_turn(cpu, 1000)
    assert got == pytest.approx({"consumer": 1.5, "gateway": 1.2, "broker": 0.9, "clients": 2.0})


def test_cpu_ms_per_turn_unknown_and_empty():
    # a broker that was not found, and an unknown process of a part: the part is unknown, whatever the order
    got = G.cpu_ms_per_turn({"gateway-1": None, "gateway-2": 1.0, "consumer-1": 1.0, "broker": None}, 500)
    assert got == {"gateway": None, "consumer": pytest.approx(2.0), "broker": None}
    got = G.cpu_ms_per_turn({"gateway-1": 1.0, "gateway-2": None}, 500)
    assert got == {"gateway": None}
    assert G.cpu_ms_per_turn({"gateway-1": 1.0}, 0) == {"gateway": None}


def test_turns_per_core():
    assert G.turns_per_core({"gateway": 0.5, "consumer": 2.0, "broker": None}) == {
        "gateway": 2000.0, "consumer": 500.0, "broker": None}


def test_predict_splits_cores_by_cost():
    # costs 1 : 2 : 1 ms per turn -> 16 cores as 4 / 8 / 4, each part at 4000 turns/s
    pred = G.predict({"gateway": 1.0, "consumer": 2.0, "broker": 1.0, "clients": 5.0}, 16)
    assert pred["split"] == {"gateway": 4, "consumer": 8, "broker": 4}
    assert pred["turns_per_s"] == pytest.approx(4000.0)
    assert pred["upper_bound_turns_per_s"] == pytest.approx(4000.0)  # the split is exact here
    assert pred["turns_per_core"] == pytest.approx(250.0)  # 1000 / (1 + 2 + 1); the clients are not counted
    assert pred["left_out"] == []


def test_predict_uneven_costs_is_the_best_integer_split():
    costs = {"gateway": 1.3, "consumer": 2.1, "broker": 0.7}
    for cores in (3, 4, 7, 16, 33):
        pred = G.predict(costs, cores)
        assert sum(pred["split"].values()) == cores
        best = max(min(n * 1000.0 / costs[p] for n, p in zip(ns, costs, strict=True))
                   for ns in itertools.product(range(1, cores + 1), repeat=3) if sum(ns) == cores)
        assert pred["turns_per_s"] == pytest.approx(best)
        assert pred["turns_per_s"] <= pred["upper_bound_turns_per_s"] + 1e-9
        b = pred["bottleneck"]
        assert pred["turns_per_s"] == pytest.approx(pred["split"][b] * 1000.0 / costs[b])


def test_predict_leaves_out_unknown_parts_and_refuses_too_few_cores():
    pred = G.predict({"gateway": 1.0, "consumer": 1.0, "broker": None}, 4)
    assert pred["split"] == {"gateway": 2, "consumer": 2}
    assert pred["left_out"] == ["broker"]
    assert pred["turns_per_s"] == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        G.predict({"gateway": 1.0, "consumer": 1.0, "broker": 1.0}, 2)
    with pytest.raises(ValueError):
        G.predict({"gateway": None}, 4)


def _acc(turns: int, seconds: float, cpu: dict, lat_ms: list[float], errors: int = 0) -> dict:
    return {"turns": turns, "elapsed": seconds, "errors": errors, "latencies": [x / 1000 for x in lat_ms],
            "cpu_s": cpu, "load": [1.0]}


def test_summarize_and_figure_lines(capsys):
    acc = {(1, 1): _acc(2000, 20.0, {"gateway": 2.0, "consumer": 4.0, "broker": 2.0, "clients": 6.0}, [10, 20, 30]),
           (4, 2): _acc(1000, 20.0, {"gateway": 2.0, "consumer": 3.0, "broker": 1.0, "clients": 4.0}, [40, 50, 60], 1)}
    res = G.summarize(acc)
    one = res[(1, 1)]
    assert one["turns_per_s"] == pytest.approx(100.0)
    assert one["cost_ms"] == pytest.approx({"gateway": 1.0, "consumer": 2.0, "broker": 1.0, "clients": 3.0})
    assert one["service_ms"] == pytest.approx(4.0)
    assert one["busy_cores"] == pytest.approx(0.7)  # 14 CPU seconds in 20 s
    assert one["p50"] == pytest.approx(20.0)

    args = types.SimpleNamespace(sessions=64, think_ms=0.0, rounds=2, cores=16)
    G.emit_scaling(acc, args)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {(x["bench"], x.get("consumers"), x.get("gateways"), x.get("part")): x for x in lines}
    tps = by[("gateway.scaling_turns_per_s", 4, 2, None)]
    assert (tps["value"], tps["baseline"], tps["ratio"], tps["goal"], tps["met"]) == (50.0, 100.0, 0.5, "report", None)
    err = by[("gateway.scaling_errors", 4, 2, None)]
    assert (err["value"], err["met"]) == (1, False)
    cpu = by[("gateway.scaling_cpu_ms_per_turn", 4, 2, None)]
    assert cpu["value"] == pytest.approx(6.0) and cpu["baseline"] == pytest.approx(4.0)
    assert cpu["parts"] == {"gateway": 2.0, "consumer": 3.0, "broker": 1.0, "clients": 4.0}
    core = by[("gateway.scaling_turns_per_core", None, None, "consumer")]
    assert core["value"] == pytest.approx(1000 / 3, abs=1e-3) and core["baseline"] == pytest.approx(500.0)
    pred = by[("gateway.scaling_predicted_turns_per_s", None, None, None)]
    # from 4 x 2's costs 2 : 3 : 1 ms: 16 cores as 5 / 8 / 3 -> min(2500, 2666.7, 3000)
    assert pred["split"] == {"gateway": 5, "consumer": 8, "broker": 3}
    assert pred["value"] == pytest.approx(2500.0) and pred["baseline"] == pytest.approx(100.0)
    assert pred["bottleneck"] == "gateway" and pred["from_config"] == "4x2"
    assert pred["by_config"] == {"1x1": 4000.0, "4x2": 2500.0}

"""compose.yaml: valid by the Compose Specification's JSON Schema, and in parity with the code:
every service's command and environment runs here as a local process against the local RabbitMQ,
loaded with the same broker definitions, and comes up healthy.

The schema is vendored at tests/data/compose-spec.schema.json with its license
(tests/data/compose-spec.LICENSE, Apache 2.0): the Compose Specification's schema as shipped in the
PyPI package check-jsonschema 0.39.0 (check_jsonschema/builtin_schemas/vendor/compose-spec.json).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from npcbus import compose
from npcbus.cli import COMMANDS
from npcbus.config_cli import settings_classes

from .conftest import ROOT, broker_up

SCHEMA = ROOT / "tests" / "data" / "compose-spec.schema.json"
COMPOSE = ROOT / "compose.yaml"
NPCBUS_SERVICES = ("aggregator", "loop", "worker", "infer", "gateway")
# variables the images and libraries read themselves (not npcbus settings)
FOREIGN_ENV = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE"}


def _raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _vars(**extra) -> dict:
    v = {f"AMQP_PASSWORD_{r}": "x" for r in ("GATEWAY", "INFER", "TRAIN", "AGGREGATOR", "ADMIN")}
    v["API_TOKEN"] = "t"
    v.update(extra)
    return v


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(_raw()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors[:10])
    # ... and so does it after interpolation (what Compose validates too)
    interpolated = {k: compose._walk(v, _vars()) for k, v in _raw().items()}
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(interpolated))


def test_interpolation_follows_compose():
    v = {"A": "a", "E": ""}
    assert compose.interpolate("${A}-${B:-b}-${E:-e}-${E-e}-$A-$$A-$${A}", v) == "a-b-e--a-$A-${A}"
    with pytest.raises(compose.ComposeError, match="set X"):
        compose.interpolate("${X:?set X}", v)


def test_services_start_in_order_and_scale():
    svcs = compose.services(COMPOSE, _vars())
    order = compose.start_order(svcs)
    assert order.index("broker-init") < order.index("rabbitmq") < order.index("aggregator") < order.index("worker")
    assert order.index("aggregator") < order.index("infer") < order.index("gateway")
    assert "infer-gpu" not in svcs and "worker-gpu" not in svcs, "the gpu profile is off by default"
    for name in NPCBUS_SERVICES:
        s = svcs[name]
        assert s.local == "process" and s.restart == "unless-stopped" and s.healthcheck, name
        assert s.depends_on["rabbitmq"].condition == "service_healthy", name
        assert s.raw["image"] == "npcbus:latest" and s.raw["pull_policy"] == "never" and "build" not in s.raw, name
    # one image for every npcbus service, built once: by broker-init, the first of them to start
    builders = [n for n, s in svcs.items() if "build" in s.raw and s.raw["build"].get("dockerfile") == "deploy/Dockerfile"]
    assert builders == ["broker-init"] and svcs["broker-init"].raw["image"] == "npcbus:latest"
    assert svcs["aggregator"].depends_on["model-init"].condition == "service_completed_successfully"
    assert svcs["rabbitmq"].depends_on["broker-init"].condition == "service_completed_successfully"
    assert svcs["gateway"].depends_on["infer"].condition == "service_healthy"
    # `--scale infer=4 --scale worker=4`: nothing pins a container name or a host port on them
    for name in ("infer", "worker"):
        assert "container_name" not in svcs[name].raw and "ports" not in svcs[name].raw
    assert compose.services(COMPOSE, _vars(INFER_REPLICAS="3"))["infer"].replicas == 3
    # the gpu profile: vLLM and training on NVIDIA devices
    gpu = compose.services(COMPOSE, _vars(), profiles=("gpu",))
    for name in ("infer-gpu", "worker-gpu"):
        devices = gpu[name].raw["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert gpu[name].raw["image"] == "npcbus-gpu:latest"
    assert gpu["infer-gpu"].raw["build"]["args"]["NPCBUS_VARIANT"] == "gpu" and "build" not in gpu["worker-gpu"].raw
    assert gpu["infer-gpu"].environment["ENGINE"] == "vllm" and gpu["worker-gpu"].environment["TRAIN_DEVICE"] == "cuda"
    # the CPU default: the offline model, no weights from a hub
    assert svcs["infer"].environment["BASE_MODEL"] == "" and svcs["infer"].environment["HF_HUB_OFFLINE"] == "1"
    # Open WebUI (opt-in: the `ui` profile) talks to the gateway's OpenAI-compatible API; Prometheus
    # scrapes every service
    assert "open-webui" not in svcs
    ui = compose.services(COMPOSE, _vars(), profiles=("ui",))
    assert ui["open-webui"].environment["OPENAI_API_BASE_URL"] == "http://gateway:8080/v1"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert {"rabbitmq", "gateway", "aggregator", "loop", "infer", "worker"} <= jobs


def test_every_command_and_variable_exists_in_the_code():
    svcs = compose.services(COMPOSE, _vars(), profiles=("gpu",))
    known = {f.metadata["env"] for cls in settings_classes() for f in cls.__dataclass_fields__.values()
             if f.metadata.get("env")}
    for name, s in svcs.items():
        if s.local not in ("process", "once", "broker-init"):
            continue
        cmd = s.command
        if cmd[0] == "npcbus":
            assert tuple(cmd[1:3]) in COMMANDS or tuple(cmd[1:2]) in COMMANDS, (name, cmd)
        else:
            assert cmd[:2] == ["python", "-m"], (name, cmd)
            path = ROOT / (cmd[2].replace(".", "/") + ".py")
            assert path.is_file() and "__main__" in path.read_text(), (name, cmd)
        unknown = set(s.environment) - known - FOREIGN_ENV - {k for k in s.environment if k.startswith("AMQP_PASSWORD_")}
        assert not unknown, f"{name}: variables no settings class reads: {sorted(unknown)}"


def test_images_run_as_a_non_root_user():
    local_base = sorted((ROOT / "deploy" / "local-base").glob("*.Dockerfile"))
    assert len(local_base) == 2
    for dockerfile in (ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "rabbitmq" / "Dockerfile", *local_base):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile
    for name, s in _raw()["services"].items():
        assert str(s.get("user", "")).split(":")[0] not in ("root", "0"), name


def test_npcbus_run_runs_the_compose_services():
    from npcbus.stack import StackSettings, plan

    names = [n for n, _argv in plan(StackSettings.from_env({}), _vars())]
    svcs = compose.services(COMPOSE, _vars())
    assert names == [n for n in compose.start_order(svcs) if svcs[n].local != "skip"]
    argv = dict(plan(StackSettings.from_env({}), _vars()))
    assert argv["gateway"][-3:] == ["-m", "npcbus.cli", "gateway"] and argv["loop"][-3:] == ["-m", "npcbus.cli", "loop"]
    two = [n for n, _ in plan(StackSettings.from_env({}, infer_workers=2), _vars())]
    assert "infer-1" in two and "infer-2" in two


def test_consumers_accept_only_their_senders_role_users_or_the_single_user():
    from npcbus.stack import StackSettings, build_plan

    svcs = compose.services(COMPOSE, _vars(AMQP_USER_PREFIX="p-"))
    # tasks only from the aggregator's user, deltas only from the training workers' user
    assert svcs["worker"].environment["ALLOWED_TASK_SENDERS"] == "p-aggregator"
    assert svcs["aggregator"].environment["ALLOWED_SENDERS"] == "p-train"
    # `npcbus run` with RUN_BROKER_USERS=false: one user sends everything, and is accepted
    url = "amqp://solo:pw@127.0.0.1:5672/"
    procs = build_plan(StackSettings.from_env({}, broker_users=False), _vars(), base_env={"AMQP_URL": url})
    env = {p.service: p.env for p in procs}
    assert "broker-init" not in env
    assert env["worker"]["ALLOWED_TASK_SENDERS"] == "solo" and env["aggregator"]["ALLOWED_SENDERS"] == "solo"
    assert env["worker"]["AMQP_URL"] == url and env["gateway"]["AMQP_URL"] == url


def test_readme_main_job_runs_npcbus_run():
    text = (ROOT / "scripts" / "run.sh").read_text()
    assert re.search(r"^exec npcbus run\b", text, re.M)
    tree = ast.parse((ROOT / "npcbus" / "stack.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "build_plan" for n in tree.body)


@pytest.mark.broker
@pytest.mark.timeout(600)
@pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")
def test_compose_parity_every_service_runs_locally_and_is_healthy(request, model_dir):
    """Every compose service (but Prometheus, Open WebUI and the GPU profile) as a local process with
    its environment, against the local RabbitMQ loaded with the same definitions: all healthy, each
    connected as its role's broker user."""
    from .stack_util import shared_stack

    stack = shared_stack(request, model_dir)
    sup = stack.sup
    svcs = compose.services(COMPOSE, stack.variables)
    ran = set(sup.services())
    assert ran == {n for n, s in svcs.items() if s.local != "skip"}
    sup.wait_healthy(timeout=120)
    for p in sup.procs.values():
        if p.spec.kind == "process":
            assert p.spec.argv == compose.local_argv(svcs[p.spec.service].command)
            for k, v in svcs[p.spec.service].environment.items():
                if k in ("METRICS_PORT", "GATEWAY_PORT", "GATEWAY_HOST", "METRICS_HOST", "MODEL_DIR") \
                        or v.startswith("/data/"):
                    continue
                assert p.spec.env[k] == v, (p.name, k)
    # each service logged in as its role's user (and nobody as guest)
    users = {u for _pid, u, _n in stack.connections()}
    role = stack.roles.user
    assert users == {role("aggregator"), role("train"), role("infer"), role("gateway")}, users
    assert Path(sup.procs["broker-init"].spec.argv[-1]).is_file()

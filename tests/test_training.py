"""Local LoRA training (npcbus.training, ``npcbus train``) on the offline default model.

Kept short: a few optimizer steps on small batches of truncated examples.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npcbus import lora, training  # noqa: E402
from npcbus.tasks import DATA_FILES  # noqa: E402

FAST = {"max_length": 160, "batch_size": 2, "rank": 4, "alpha": 8.0, "lr_schedule": "constant"}


@pytest.fixture(scope="module")
def base(model_dir):
    from npcbus.model import load_model_and_tokenizer

    torch.set_num_threads(2)
    return load_model_and_tokenizer(model_dir)


@pytest.fixture(scope="module")
def npc_records():
    """The shipped alignment turns (answers to harmful or off-limits player lines): behaviour that the
    default model was not fine-tuned on (its fine-tuning saw the ordinary NPC turns), so an adapter
    has something to learn that shows on held-out records."""
    recs = training.as_records(training.load_examples(DATA_FILES / "npc_alignment.jsonl"))
    assert len(recs) > 40 and all("request" in r and "response" in r for r in recs)
    return recs


@pytest.fixture(scope="module")
def trained(base, npc_records):
    """One short run on the shipped alignment turns; held-out loss before and after."""
    model, tok = base
    train, held = npc_records[:-12], npc_records[-12:]
    before = training.heldout_loss(model, tok, held, max_length=FAST["max_length"])
    cfg = training.TrainConfig(max_steps=24, learning_rate=5e-3, seed=3, **FAST)
    seen = []
    result = training.train_lora(model, tok, train, cfg, progress=seen.append)
    return {"result": result, "before": before, "held": held, "cfg": cfg, "progress": seen}


def _with_adapter(model, state, peft_config):
    from peft import get_peft_model, set_peft_model_state_dict

    m = get_peft_model(model, training._as_lora_config(peft_config))
    set_peft_model_state_dict(m, {k: torch.from_numpy(v) for k, v in state.items()})
    return m


def test_training_lowers_heldout_loss(base, trained):
    model, tok = base
    res = trained["result"]
    m = res.metrics
    assert m["steps"] == 24 and m["samples"] == 48 and m["tokens"] > 0 and m["duration_s"] > 0
    assert all(math.isfinite(float(v)) for v in m.values())
    assert {"loss_mean", "loss_last", "grad_norm_mean", "tokens_per_s"} <= set(m)
    assert [p["step"] for p in trained["progress"]] == list(range(1, 25))
    assert trained["progress"][-1]["loss"] == pytest.approx(m["loss_last"], abs=1e-4)
    names = list(res.adapter_state)
    assert names and all(n.startswith("base_model.model.") and ".lora_" in n for n in names)
    assert any("q_proj.lora_A" in n for n in names) and any("v_proj.lora_B" in n for n in names)
    # the base model is left as it was: no LoRA layers, same loss
    assert not hasattr(model, "peft_config") or not model.peft_config
    assert training.heldout_loss(model, tok, trained["held"], max_length=FAST["max_length"]) == pytest.approx(
        trained["before"], rel=1e-6)
    tuned = _with_adapter(model, res.adapter_state, res.peft_config)
    try:
        after = training.heldout_loss(tuned, tok, trained["held"], max_length=FAST["max_length"])
    finally:
        tuned.unload()
    assert after < trained["before"] - 0.05, (trained["before"], after)


def test_saved_adapter_loads_with_peft_and_changes_outputs(base, trained, tmp_path):
    from peft import PeftModel

    model, tok = base
    res = trained["result"]
    out = training.save_adapter(tmp_path / "adapter", res.adapter_state, res.peft_config)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == FAST["rank"]
    back = training.load_adapter_state(out)
    assert back.keys() == res.adapter_state.keys()
    for k in back:
        np.testing.assert_array_equal(back[k], res.adapter_state[k])

    ids = tok("The innkeeper says", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(model, str(out))
        try:
            adapted = peft_model(input_ids=ids).logits
            # the weights PEFT loaded are exactly the saved ones
            from peft import get_peft_model_state_dict

            loaded = get_peft_model_state_dict(peft_model)
            for k in back:
                np.testing.assert_array_equal(loaded[k].numpy(), back[k])
        finally:
            peft_model.unload()
        again = model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)
    torch.testing.assert_close(plain, again)


def test_train_from_init_adapter_and_delta(base, trained, npc_records):
    """A worker's path: start from the adapter's current weights, send new - old."""
    model, tok = base
    res = trained["result"]
    cfg = training.TrainConfig(max_steps=2, learning_rate=5e-3, seed=5, **FAST)
    again = training.train_lora(model, tok, npc_records[:20], cfg, init_adapter_state=res.adapter_state,
                                peft_config=res.peft_config)
    delta = lora.compute_delta(again.adapter_state, res.adapter_state)
    assert 0 < lora.delta_norm(delta) < 100
    msg = lora.make_delta(delta, adapter="npc", base_version=0, num_samples=int(again.metrics["samples"]),
                          metrics=again.metrics)
    spec = lora.AdapterSpec.from_state("npc", res.adapter_state)
    assert lora.validate_delta(msg, spec, current_version=0, max_staleness=1, max_norm=100.0) is None
    with pytest.raises(training.TrainingError, match="do not match"):
        bad = dict(res.adapter_state)
        bad.pop(next(iter(bad)))
        training.train_lora(model, tok, npc_records[:4], cfg, init_adapter_state=bad, peft_config=res.peft_config)
    assert not getattr(model, "peft_config", None)  # still unwrapped after the failure


def test_resume_latest_continues_from_checkpoint(base, npc_records, tmp_path):
    model, tok = base
    data = npc_records[:24]
    cfg = training.TrainConfig(max_steps=4, learning_rate=5e-3, seed=11, checkpoint_every=2, keep_checkpoints=1,
                               dropout=0.1, **{**FAST, "batch_size": 1, "max_length": 128})
    straight = training.train_lora(model, tok, data, cfg, checkpoint_dir=tmp_path / "a")
    # the same run, interrupted after two steps (its checkpoint at step 2 is kept) ...
    steps = []
    first = training.train_lora(model, tok, data, cfg, checkpoint_dir=tmp_path / "b",
                                progress=lambda i: steps.append(i["step"]), should_stop=lambda: len(steps) >= 2)
    assert first.stopped_early and first.metrics["steps"] == 2
    assert [p.name for p in training.list_checkpoints(tmp_path / "b")] == ["checkpoint-000002"]
    # ... and resumed: it continues at step 3 and ends where the uninterrupted run ended
    resumed_steps = []
    second = training.train_lora(model, tok, data, cfg, checkpoint_dir=tmp_path / "b", resume=True,
                                 progress=lambda i: resumed_steps.append(i["step"]))
    assert resumed_steps == [3, 4]
    assert second.metrics["steps"] == 4 and second.metrics["samples"] == straight.metrics["samples"]
    assert second.losses[:2] == first.losses
    np.testing.assert_allclose(second.losses, straight.losses, rtol=1e-5)
    for k in straight.adapter_state:
        np.testing.assert_allclose(second.adapter_state[k], straight.adapter_state[k], rtol=1e-5, atol=1e-7)
    assert [p.name for p in training.list_checkpoints(tmp_path / "b")] == ["checkpoint-000004"]
    # a checkpoint made with another rank is refused
    other = training.TrainConfig(**{**cfg.as_dict(), "rank": 2, "max_steps": 6})
    with pytest.raises(training.TrainingError, match="checkpoint"):
        training.train_lora(model, tok, data, other, checkpoint_dir=tmp_path / "b", resume=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no CUDA GPU")
def test_4bit_without_gpu_is_a_clear_error(model_dir, capsys):
    for kw in ({"load_in_4bit": True}, {"load_in_8bit": True}):
        why = training.quantization_unavailable(**kw)
        assert why and "CUDA GPU" in why
        with pytest.raises(training.TrainingError, match="needs a CUDA GPU"):
            training.load_base_model_for_training(model_dir, **kw)
    from workers import train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    rc = train_cli.run(parser.parse_args(["--base-model", model_dir, "--load-in-4bit"]))
    assert rc == 2
    err = capsys.readouterr().err
    assert "--load-in-4bit needs a CUDA GPU" in err


def test_cli_trains_and_saves_a_peft_adapter(model_dir, tmp_path, capsys):
    from workers import train_cli

    data = tmp_path / "mix.jsonl"
    src = (DATA_FILES / "npc_dialogue.jsonl").read_text().splitlines()[:10]
    data.write_text("\n".join(src) + "\n")
    lore = tmp_path / "lore.txt"
    lore.write_text("The old mill burned in the winter.\n\nThe river road floods every spring.\n\n"
                    "Guards change at the bell.\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--base-model", model_dir, "--data", str(data), str(lore), "--output-dir", str(out),
                              "--max-steps", "2", "--batch-size", "1", "--max-length", "128", "--rank", "2",
                              "--heldout", "0.2", "--checkpoint-every", "1", "--tensorboard-dir",
                              str(tmp_path / "tb"), "--no-progress", "--device", "cpu"])
    assert train_cli.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["heldout_loss_before"] and summary["heldout_loss_after"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert [p.name for p in training.list_checkpoints(out / "checkpoints")] == ["checkpoint-000001",
                                                                                 "checkpoint-000002"]
    assert any((tmp_path / "tb").iterdir())
    # --init-adapter starts from the saved adapter, --resume-latest with nothing left to do is a no-op
    args2 = parser.parse_args(["--base-model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "out2"),
                               "--init-adapter", str(out), "--max-steps", "1", "--batch-size", "1", "--max-length",
                               "128", "--heldout", "0", "--no-progress", "--device", "cpu"])
    assert train_cli.run(args2) == 0
    assert json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["r"] == 2


def test_new_adapter_files_are_a_no_op_adapter(base, model_dir, tmp_path):
    from peft import PeftModel

    from npcbus.adapter_store import write_atomic_folder

    model, tok = base
    files = training.new_adapter_files(model_dir, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert files == training.new_adapter_files(model_dir, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)
    path = write_atomic_folder(tmp_path / "v0", files)
    state = training.load_adapter_state(path)
    a = [v for k, v in state.items() if "lora_A" in k]
    b = [v for k, v in state.items() if "lora_B" in k]
    assert a and all(np.abs(x).max() > 0 for x in a) and all((x == 0).all() for x in b)
    ids = tok("Where is the market?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        pm = PeftModel.from_pretrained(model, str(path))
        try:
            assert set(training._current_lora_state(pm)) == set(state)
            torch.testing.assert_close(pm(input_ids=ids).logits, plain)
        finally:
            pm.unload()
    with pytest.raises(training.TrainingError, match="no_such_proj"):
        training.new_adapter_files(model_dir, targets=["no_such_proj"])


def test_config_and_schedules():
    cfg = training.TrainConfig.from_hyperparams({"lr": 5e-3, "batch_size": 4.0, "steps": 20, "targets": "q_proj"})
    assert cfg.learning_rate == 5e-3 and cfg.batch_size == 4 and cfg.max_steps == 20
    assert cfg.target_modules == ("q_proj",)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        training.TrainConfig.from_hyperparams({"learning_rat": 1})
    with pytest.raises(ValueError, match="lr_schedule"):
        training.TrainConfig(lr_schedule="step")
    c = training.TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine")
    f = [training.lr_factor(s, c) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and 0 < f[-1] < 0.05
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    lin = training.TrainConfig(max_steps=4, lr_schedule="linear")
    assert [training.lr_factor(s, lin) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    const = training.TrainConfig(max_steps=4, warmup_steps=1, lr_schedule="constant")
    assert [training.lr_factor(s, const) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]


def test_load_examples_kinds(tmp_path, base):
    _, tok = base
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "The bridge is out."}\n\n{"prompt": "Q: where?\\nA:", "completion": " north"}\n')
    txt = tmp_path / "doc.txt"
    txt.write_text("First document,\nwith two lines.\n\nSecond document.\n")
    recs = training.as_records(training.load_examples([text, txt]))
    assert recs == [{"text": "The bridge is out."}, {"prompt": "Q: where?\nA:", "completion": " north"},
                    {"text": "First document,\nwith two lines."}, {"text": "Second document."}]
    ex = training.encode_examples(recs, tok, max_length=64)
    assert ex[0].labels == ex[0].input_ids and ex[0].input_ids[0] == tok.bos_token_id
    learned = [t for t in ex[1].labels if t != training.IGNORE_INDEX]
    assert learned[-1] == tok.eos_token_id and learned[:-1] == tok(" north", add_special_tokens=False)["input_ids"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(training.TrainingError, match="record 2"):
        training.load_examples(bad)
    with pytest.raises(training.TrainingError, match="unknown example kind"):
        training.encode_examples([{"foo": 1}], tok)

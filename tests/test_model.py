"""The offline default model: corpus, tokenizer, build, determinism, loading, CLI (no network)."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from npcbus import model as M

# small and quick: the default architecture's checks (head size) still apply
TINY = {"train_steps": 2, "num_layers": 2, "seq_len": 32, "batch_size": 4, "sft_steps": 2, "sft_batch_size": 2,
        "persona_steps": 1, "persona_batch_size": 2}


class NetworkBlocked(OSError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any IP connection attempt fails; the hub is told to stay offline."""

    def refuse(sock, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkBlocked("network access attempted during an offline test")
        return real_connect(sock, *args, **kwargs)

    def refuse_ex(sock, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkBlocked("network access attempted during an offline test")
        return real_connect_ex(sock, *args, **kwargs)

    def refuse_create(*args, **kwargs):
        raise NetworkBlocked("network access attempted during an offline test")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_ex)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return M.ensure_default_model(out, seed=7, **TINY)


@pytest.fixture(scope="session")
def default_model_dir():
    # the same thing belongs in tests/conftest.py for other test modules
    return M.ensure_test_model()


# ------------------------------------------------------------------------------ corpus


def test_corpus_is_shipped_and_current():
    from npcbus.corpus import generate

    total = sum((M.CORPUS_DIR / n).stat().st_size for n in M.CORPUS_FILES)
    assert 150_000 <= total <= 400_000
    # the committed files are exactly what the generator writes
    for name, text in generate.generate().items():
        assert (M.CORPUS_DIR / name).read_text(encoding="utf-8") == text, f"{name} is stale: run python -m npcbus.corpus.generate"
    assert len(M.corpus_texts()) > 500


def test_corpus_chats_parse_and_answer_in_json():
    chats = M.corpus_chats()
    assert len(chats) >= 100
    for conv in chats:
        assert conv[0]["role"] == "system"
        for msg in conv[1:]:
            if msg["role"] == "assistant":
                resp = json.loads(msg["content"])
                assert {"dialogue", "emotion", "action"} <= set(resp)
    with pytest.raises(ValueError):
        M.parse_chat("narrator: once upon a time")


def test_params_are_checked():
    with pytest.raises(ValueError, match="head size"):
        M.DefaultModelParams(hidden_size=256, num_heads=8)
    with pytest.raises(TypeError, match="unknown model parameter"):
        M.ensure_default_model("/nonexistent/never", hidden=3)


# ------------------------------------------------------------------------------ tokenizer, build


def test_tokenizer_and_chat_template(tiny_model):
    tok = M.load_tokenizer(tiny_model)
    assert tok.bos_token == M.BOS and tok.eos_token == M.EOS and tok.pad_token == M.PAD
    assert len(tok) == 4096
    ids = tok("Welcome to the Crooked Kettle.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Welcome to the Crooked Kettle."
    msgs = [{"role": "system", "content": "You are a guard."}, {"role": "user", "content": "Hello."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nYou are a guard.<|eos|><|user|>\nHello.<|eos|><|assistant|>\n"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    for role in ("system", "user", "assistant"):
        assert tok.convert_tokens_to_ids(M.ROLE_TOKENS[role]) in enc
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from safetensors.torch import load_file

    a = M.build_default_model(tmp_path / "a", seed=11, **TINY)
    b = M.build_default_model(tmp_path / "b", seed=11, **TINY)
    c = M.build_default_model(tmp_path / "c", seed=12, **TINY)
    wa, wb, wc = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype.is_floating_point and wa[k].dtype.itemsize == 4 for k in wa)  # float32
    assert all(wa[k].equal(wb[k]) for k in wa)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert any(not wa[k].equal(wc[k]) for k in wa)
    # the persona adapters are part of the build, deterministic too
    for pid in a["personas"]:
        pa, pb, pc = (tmp_path / n / M.PERSONAS_DIR / pid / "adapter_model.safetensors" for n in "abc")
        assert pa.read_bytes() == pb.read_bytes() != pc.read_bytes(), pid


def test_the_build_fine_tunes_on_npc_turns_and_trains_an_adapter_per_persona(tiny_model):
    from peft import PeftModel

    from npcbus import npc

    stamp = M.read_stamp(tiny_model)
    assert stamp["prompt_style"] == "minimal" and stamp["sft"]["steps"] == 2
    assert stamp["sft"]["records"] == len(M.sft_records()) > 8 * 300
    model, tok = M.load_model_and_tokenizer(tiny_model)
    assert npc.prompt_style_of(tok) == "minimal"  # inference renders prompts as the fine-tuning did
    assert stamp["response_order"] == npc.response_order_of(tok) == "plan_first"  # and orders the keys so
    assert npc.npc_sampling_of(tok) == stamp["npc_sampling"] == {"temperature": 0.7, "top_k": 50}
    personas = npc.load_personas()
    assert set(stamp["personas"]) == set(personas)
    for pid in personas:
        folder = Path(tiny_model) / M.PERSONAS_DIR / pid
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert stamp["personas"][pid]["records"] == sum(M.persona_of(r) == pid for r in M.sft_records())
    peft = PeftModel.from_pretrained(model, str(Path(tiny_model) / M.PERSONAS_DIR / "innkeeper"))
    assert peft.peft_config["default"].r == M.DefaultModelParams().persona_rank


def test_ensure_reuses_a_matching_build_and_rebuilds_otherwise(tiny_model):
    weights = tiny_model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert M.ensure_default_model(tiny_model, seed=7, **TINY) == tiny_model
    assert weights.stat().st_mtime_ns == before
    assert M.is_current(tiny_model, seed=7, **TINY)
    assert not M.is_current(tiny_model, seed=8, **TINY)
    stamp = M.read_stamp(tiny_model)
    assert stamp["seed"] == 7 and stamp["params"]["train_steps"] == 2
    assert stamp["corpus_sha256"] == M.corpus_hash()


def test_resolve_base_model(tiny_model, monkeypatch):
    from npcbus.settings import ModelSettings

    assert M.resolve_base_model(ModelSettings(base_model="someorg/some-model")) == "someorg/some-model"
    # an existing build with the asked seed is used as it is, whatever its training parameters
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    got = M.resolve_base_model(ModelSettings(base_model="", model_dir=str(tiny_model), model_seed=7))
    assert got == str(tiny_model)
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before
    monkeypatch.setenv("BASE_MODEL", str(tiny_model))
    assert M.resolve_base_model() == str(tiny_model)


def test_build_refuses_to_replace_a_folder_that_is_not_a_build(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        M.build_default_model(tmp_path, **TINY)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="npcbus model init"):
        M.load_model_and_tokenizer(str(tmp_path / "nothing-here"))


# ------------------------------------------------------------------------------ CLI, offline


def test_model_init_cli_offline_then_load_and_generate(tmp_path, no_network, capsys):
    import torch

    from npcbus.cli import main

    out = tmp_path / "m"
    assert main(["model", "init", str(out), "--seed", "5", "--steps", "2", "--sft-steps", "1",
                 "--persona-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "parameters:" in printed and "vocabulary:  4096" in printed and "final loss" in printed
    stamp = M.read_stamp(out)
    assert stamp["seed"] == 5 and stamp["params"]["train_steps"] == 2

    model, tok = M.load_model_and_tokenizer(out, dtype="float32")
    assert model.dtype == torch.float32 and not model.training
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.hidden_size // cfg.num_attention_heads >= 64
    enc = tok.apply_chat_template([{"role": "user", "content": "Any work in the village?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 6

    assert main(["model", "init", str(out), "--seed", "5", "--steps", "2", "--sft-steps", "1",
                 "--persona-steps", "1"]) == 0
    assert f"reused the existing build in {out}" in capsys.readouterr().out


def test_model_init_cli_builds_other_sizes(tmp_path, no_network, capsys):
    from npcbus.cli import main

    assert main(["model", "init", str(tmp_path / "bad"), "--hidden-size", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().out
    assert main(["model", "init", str(tmp_path / "bad"), "--layers", "0"]) == 2
    out = tmp_path / "wide"
    assert main(["model", "init", str(out), "--seed", "5", "--steps", "1", "--sft-steps", "0", "--persona-steps", "0",
                 "--hidden-size", "128", "--layers", "2"]) == 0
    p = M.read_stamp(out)["params"]
    assert (p["hidden_size"], p["num_layers"], p["num_heads"], p["num_kv_heads"], p["intermediate_size"]) == \
        (128, 2, 2, 2, 352)
    assert "hidden 128, 2 layers, 2 heads of 64" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the default build


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


@pytest.mark.timeout(1800)
def test_default_model_has_learned_the_corpus(default_model_dir):
    stamp = M.read_stamp(default_model_dir)
    assert stamp["params"] == M.DefaultModelParams().as_dict()
    model, tok = M.load_model_and_tokenizer(default_model_dir)
    rng = random.Random(0)
    texts = rng.sample(M.corpus_texts(), 24)
    ppl = M.perplexity(model, tok, texts)
    ppl_shuffled = M.perplexity(model, tok, [_shuffle_words(t, rng) for t in texts])
    assert ppl * 5 < ppl_shuffled, (ppl, ppl_shuffled)

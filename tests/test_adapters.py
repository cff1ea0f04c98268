"""Adapter manifest (register, resolve, versions, atomic writes), the adapter CLI, merge and
dry-run publish."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from npcbus.adapters import (
    AdapterManifest,
    AdapterToolSettings,
    ManifestError,
    ManifestSettings,
    UnknownAdapterError,
    locate_adapter,
    parse_ref,
)
from npcbus.cli import main


@pytest.fixture
def manifest(tmp_path) -> AdapterManifest:
    return AdapterManifest(tmp_path / "m" / "adapters.json")


def test_settings_default_and_env(tmp_path):
    assert ManifestSettings.from_env({}).manifest_path == ".npcbus/adapters.json"
    assert AdapterToolSettings.from_env({}).checkpoint_dir == ".npcbus/checkpoints"
    s = ManifestSettings.from_env({"ADAPTER_MANIFEST": str(tmp_path / "x.json")})
    assert AdapterManifest(s.manifest_path).path == tmp_path / "x.json"


def test_register_resolve_and_versions(manifest):
    assert manifest.list() == []
    e = manifest.register("innkeeper", base_model="org/base", source="bus", description="Marta",
                          persona_id="innkeeper")
    assert e.current_version is None and e.created and e.created == e.updated
    with pytest.raises(ManifestError, match="already registered"):
        manifest.register("innkeeper")
    with pytest.raises(ManifestError, match="bad adapter name"):
        manifest.register("Bad Name")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nobody'.*innkeeper"):
        manifest.resolve("nobody")

    manifest.set_version("innkeeper", 1, "h1")
    e = manifest.set_version("innkeeper", 2, "h2")
    assert (e.current_version, e.content_hash) == (2, "h2")
    assert [h["version"] for h in e.history] == [1, 2]
    assert manifest.set_version("innkeeper", 2, "h2").history == e.history  # same again: no-op
    with pytest.raises(ManifestError, match="older"):
        manifest.set_version("innkeeper", 1, "h1")
    with pytest.raises(ManifestError, match="already has content hash"):
        manifest.set_version("innkeeper", 2, "other")
    assert manifest.set_version("innkeeper", 1, "h1", allow_older=True).current_version == 1
    manifest.set_version("innkeeper", 3, "h3")

    # another process's view (a fresh object reading the same file)
    other = AdapterManifest(manifest.path)
    r = other.resolve("innkeeper")
    assert (r.base_model, r.current_version, r.content_hash, r.persona_id) == ("org/base", 3, "h3", "innkeeper")
    assert other.resolve_ref("innkeeper@v2") == (r, 2)
    assert other.resolve_ref("innkeeper") == (r, 3)
    with pytest.raises(ManifestError, match="no version 9"):
        other.resolve_ref("innkeeper@9")
    assert other.by_persona("innkeeper").name == "innkeeper" and other.by_persona("x") is None
    assert parse_ref("a.b-c@7") == ("a.b-c", 7)

    # replace keeps created, history and version; remove
    e2 = manifest.register("innkeeper", base_model="org/base2", path="/somewhere", replace=True)
    assert e2.created == e.created and e2.current_version == 3 and e2.path == "/somewhere"
    manifest.remove("innkeeper")
    assert "innkeeper" not in manifest


def test_file_format_is_tolerant_and_atomic(manifest):
    manifest.register("a", base_model="m")
    data = json.loads(manifest.path.read_text())
    assert data["format"] == 1 and set(data["adapters"]) == {"a"}
    data["adapters"]["a"]["future_field"] = {"x": 1}  # unknown fields are ignored
    data["adapters"]["b"] = {"name": "b", "current_version": 4}
    manifest.path.write_text(json.dumps(data))
    fresh = AdapterManifest(manifest.path)
    assert fresh.resolve("b").current_version == 4 and fresh.resolve("a").base_model == "m"
    # no temporary file is left behind
    assert sorted(p.name for p in manifest.path.parent.iterdir()) == ["adapters.json", "adapters.json.lock"]
    manifest.path.write_text("{broken")
    with pytest.raises(ManifestError, match="not valid JSON"):
        AdapterManifest(manifest.path).list()


def test_cache_follows_file_changes(manifest):
    manifest.register("a")
    reader = AdapterManifest(manifest.path)
    assert reader.resolve("a").current_version is None
    AdapterManifest(manifest.path).set_version("a", 5, "h5")
    assert reader.resolve("a").current_version == 5


def test_concurrent_writers_lose_nothing(manifest):
    manifest.register("shared")
    errors = []

    def worker(i):
        try:
            m = AdapterManifest(manifest.path)
            m.register(f"w{i}", description=str(i))
            for v in range(1, 4):
                m.set_version(f"w{i}", v, f"{i}-{v}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = AdapterManifest(manifest.path).load()
    assert set(final) == {"shared"} | {f"w{i}" for i in range(8)}
    assert all(final[f"w{i}"].current_version == 3 for i in range(8))


def test_locate_adapter_from_checkpoints(tmp_path, manifest):
    ck = tmp_path / "ck"
    for v in (0, 1, 2):
        d = ck / "smith" / f"v{v}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    (ck / "smith" / "v3").mkdir()  # incomplete: no adapter files
    manifest.register("smith", source="bus")
    assert locate_adapter("smith", manifest=manifest, checkpoint_dir=ck).path == ck / "smith" / "v2"
    manifest.set_version("smith", 1, "h")
    loc = locate_adapter("smith", manifest=manifest, checkpoint_dir=ck)
    assert (loc.path, loc.version) == (ck / "smith" / "v1", 1)
    assert locate_adapter("smith@0", manifest=manifest, checkpoint_dir=ck).path == ck / "smith" / "v0"
    assert locate_adapter(str(ck / "smith" / "v2"), manifest=manifest).entry is None
    with pytest.raises(ManifestError, match="not a PEFT adapter folder"):
        locate_adapter(str(ck / "smith" / "v3"), manifest=manifest)
    with pytest.raises(ManifestError, match="no adapter folder at"):
        locate_adapter(str(ck / "nothing"), manifest=manifest)
    manifest.register("ghost")
    with pytest.raises(ManifestError, match="no local files"):
        locate_adapter("ghost", manifest=manifest, checkpoint_dir=ck)


def test_cli_register_list_show(tmp_path, capsys):
    m = str(tmp_path / "adapters.json")
    assert main(["adapter", "list", "--manifest", m]) == 0
    assert "no adapters" in capsys.readouterr().out
    assert main(["adapter", "register", "innkeeper", "--manifest", m, "--persona-id", "innkeeper", "--source", "bus",
                 "--description", "Marta"]) == 0
    assert main(["adapter", "register", "smith", "--manifest", m, "--base-model", "org/base", "--version", "2",
                 "--content-hash", "abc"]) == 0
    capsys.readouterr()
    assert main(["adapter", "list", "--manifest", m]) == 0
    out = capsys.readouterr().out
    assert "innkeeper" in out and "smith" in out and "org/base" in out
    assert main(["adapter", "show", "smith", "--manifest", m, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["current_version"] == 2 and shown["content_hash"] == "abc"
    assert main(["adapter", "show", "nobody", "--manifest", m]) == 2
    assert "unknown adapter" in capsys.readouterr().err
    assert main(["adapter", "register", "innkeeper", "--manifest", m]) == 2
    assert main(["adapter", "register", "x", "--manifest", m, "--path", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------
# merge and publish (need the offline default model)
# --------------------------------------------------------------------------------------------


def make_lora(model_dir: str, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) weights, so that it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from npcbus.model import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(model_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_dir(model_dir, tmp_path_factory) -> Path:
    return make_lora(model_dir, tmp_path_factory.mktemp("lora") / "adapter")


def test_merge_gives_same_greedy_tokens(model_dir, lora_dir, tmp_path):
    import torch
    from peft import PeftModel

    from npcbus.adapters_cli import CHECK_PROMPTS, _greedy, merge_adapter
    from npcbus.model import load_model_and_tokenizer

    report = merge_adapter(lora_dir, model_dir, tmp_path / "merged", max_new_tokens=16)
    assert report["checked"] is True
    merged_dir = Path(report["path"])
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()

    # independently: reload both and compare greedy tokens and logits
    merged, tok = load_model_and_tokenizer(merged_dir)
    base, _ = load_model_and_tokenizer(model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(lora_dir)).eval()
    prompts = [*CHECK_PROMPTS, "The blacksmith"]
    assert _greedy(merged, tok, prompts, 20) == _greedy(with_adapter, tok, prompts, 20)
    ids = tok("The blacksmith hammered the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = with_adapter(input_ids=ids).logits
        plain, _ = load_model_and_tokenizer(model_dir)
        c = plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # the adapter does change the model


def test_merge_cli_with_manifest_name(model_dir, lora_dir, tmp_path, capsys):
    m = str(tmp_path / "adapters.json")
    assert main(["adapter", "register", "smith", "--manifest", m, "--path", str(lora_dir), "--base-model",
                 model_dir, "--version", "1"]) == 0
    e = AdapterManifest(m).resolve("smith")
    assert len(e.content_hash) == 64
    capsys.readouterr()
    assert main(["adapter", "merge", "smith", "--manifest", m, "--out", str(tmp_path / "full")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["checked"] and rep["adapter_content_hash"] == e.content_hash
    assert main(["adapter", "merge", "smith", "--manifest", m, "--out", str(tmp_path / "full")]) == 2  # exists


def test_dry_run_publish_writes_loadable_folder_and_card(model_dir, lora_dir, tmp_path, capsys, monkeypatch):
    import torch
    from peft import PeftModel

    from npcbus.adapter_store import content_hash, read_adapter_files
    from npcbus.model import load_model_and_tokenizer

    monkeypatch.delenv("HF_TOKEN", raising=False)
    m = str(tmp_path / "adapters.json")
    main(["adapter", "register", "smith", "--manifest", m, "--path", str(lora_dir), "--base-model", model_dir,
          "--version", "4", "--persona-id", "blacksmith", "--description", "Dorran at the forge."])
    capsys.readouterr()
    out = tmp_path / "staged"
    rc = main(["adapter", "publish", "smith", "--manifest", m, "--repo-id", "my-org/smith-lora", "--dry-run",
               "--out", str(out), "--license", "apache-2.0"])
    assert rc == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["dry_run"] and listing["repo_id"] == "my-org/smith-lora"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(listing["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                 "npcbus_adapter.json"]
    # the adapter files go up byte for byte
    assert content_hash(read_adapter_files(out)) == content_hash(read_adapter_files(lora_dir)) == listing["content_hash"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nlicense: apache-2.0\n")
    assert "Dorran at the forge." in card and "Version: 4" in card and listing["content_hash"] in card
    assert "offline default model" in card and "base_model:" not in card  # a local base is not a hub id
    info = json.loads((out / "npcbus_adapter.json").read_text())
    assert info["name"] == "smith" and info["version"] == 4 and info["persona_id"] == "blacksmith"
    # loadable: the staged folder gives the same outputs as the original adapter
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    base, _ = load_model_and_tokenizer(model_dir)
    a = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        la = a(input_ids=ids).logits
    base2, _ = load_model_and_tokenizer(model_dir)
    b = PeftModel.from_pretrained(base2, str(lora_dir)).eval()
    with torch.no_grad():
        lb = b(input_ids=ids).logits
    assert torch.equal(la, lb)
    # a real publish without a token fails clearly, before any network use
    rc = main(["adapter", "publish", str(lora_dir), "--repo-id", "my-org/x", "--out", str(tmp_path / "s2")])
    assert rc == 2 and "HF_TOKEN" in capsys.readouterr().err
    # --dry-run needs --out
    assert main(["adapter", "publish", str(lora_dir), "--repo-id", "my-org/x", "--dry-run"]) == 2

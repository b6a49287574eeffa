"""PeftModel.save_pretrained / from_pretrained / load_adapter: layout, round trips, loud and
all-or-nothing loading, safe file handling. Every error case checks the message and that nothing
changed (model and directory)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from zoo import Shared, assert_unchanged, perturb_trainable, snapshot_all, tiny, tiny_inputs

import lorakit
from lorakit import (
    AdapterError,
    AdapterFileError,
    BaseModelMismatchError,
    BaseModelMismatchWarning,
    ConfigError,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from lorakit.persistence import adapter_dir, loading

CONFIG = {
    "target_modules": ["emb", "fc1"],
    "modules_to_save": ["fc2"],
    "r": 4,
    "lora_alpha": 8,
    "init_lora_weights": False,
}


def _trained(tmp_path, name="saved", **overrides):
    model = get_peft_model(tiny(), LoraConfig(**{**CONFIG, **overrides}))
    perturb_trainable(model)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def _files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- layout and round trips -----------------------------------------------------------------------
def test_layout_metadata_and_roundtrip(tmp_path):
    model, path = _trained(tmp_path)
    assert _files(path) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        metadata = fh.metadata()
        keys = set(fh.keys())
    assert metadata["format"] == "pt" and metadata["lorakit_version"] == lorakit.__version__
    assert "lorakit_base_fingerprint" in metadata
    assert keys == {
        "base_model.model.emb.lora_embedding_A",
        "base_model.model.emb.lora_embedding_B",
        "base_model.model.fc1.lora_A.weight",
        "base_model.model.fc1.lora_B.weight",
        "base_model.model.fc2.weight",
        "base_model.model.fc2.bias",
    }
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    loaded = PeftModel.from_pretrained(tiny(), path)
    assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_is_trainable_resumes_training(tmp_path):
    _, path = _trained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny(), path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, p in get_peft_model(tiny(), LoraConfig(**CONFIG)).named_parameters() if p.requires_grad
    }
    assert loaded.peft_config["default"].inference_mode is False


def test_multi_adapter_subfolders_and_selected(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(**CONFIG))
    model.add_adapter("other", LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False))
    perturb_trainable(model)
    path = tmp_path / "multi"
    model.save_pretrained(path)
    assert _files(path) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(tiny(), path)
    loaded.load_adapter(path / "other", "other")
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(loaded(tiny_inputs()), model(tiny_inputs())), name
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["other"])
    assert _files(only) == [
        "README.md",
        "other",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]


def test_load_adapter_is_trainable_and_keeps_others(tmp_path):
    _, path = _trained(tmp_path)
    model = get_peft_model(tiny(), LoraConfig(target_modules=["fc1"]))
    model.load_adapter(path, "loaded", is_trainable=True)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert trainable == {"default", "loaded"}
    assert model.active_adapter == "default"


def test_resave_overwrites_and_keeps_foreign_files(tmp_path):
    model, path = _trained(tmp_path)
    (path / "optimizer.pt").write_text("trainer state")
    perturb_trainable(model, seed=1)
    model.save_pretrained(path)
    assert (path / "optimizer.pt").read_text() == "trainer state"
    assert torch.equal(PeftModel.from_pretrained(tiny(), path)(tiny_inputs()), model(tiny_inputs()))


def test_shared_modules_tied_and_noncontiguous_weights(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        Shared(),
        LoraConfig(target_modules=["proj", "out"], modules_to_save=["block"], init_lora_weights=False),
    )
    layer = model.base_model.model.proj
    layer.lora_A["default"].weight = torch.nn.Parameter(torch.randn(8, 8).T[:8])  # (8, 8) transposed view
    assert not layer.lora_A["default"].weight.is_contiguous()
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "s")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Shared(), tmp_path / "s")
    x = torch.randn(2, 8)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters(), strict=True))
    torch.testing.assert_close(loaded(x), model(x))  # strided vs contiguous matmul: last-bit noise
    assert (
        type(loaded.base_model.model.again).__name__ == "Linear"
        and loaded.base_model.model.again is loaded.base_model.model.proj
    )  # the shared module is wrapped at both paths
    block = loaded.base_model.model.block.modules_to_save["default"]
    assert block[0].weight.data_ptr() != 0 and torch.equal(block[0].weight, block[1].weight)


def test_legacy_bin_directory_loads(tmp_path):
    model, path = _trained(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    os.remove(path / "adapter_model.safetensors")
    torch.save(tensors, path / "adapter_model.bin")
    assert torch.equal(PeftModel.from_pretrained(tiny(), path)(tiny_inputs()), model(tiny_inputs()))


def test_all_linear_is_saved_as_concrete_names(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(target_modules="all-linear"))
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert saved == ["fc1", "fc2"]


# -- base fingerprint -----------------------------------------------------------------------------
def test_different_base_warns_or_errors(tmp_path):
    _, path = _trained(tmp_path)
    with pytest.warns(BaseModelMismatchWarning, match="this adapter was trained on a different base model"):
        PeftModel.from_pretrained(tiny(seed=1), path)
    other = tiny(seed=1)
    before = snapshot_all(other)
    with pytest.raises(
        BaseModelMismatchError,
        match=r"different base model: .*adapter_model.safetensors: "
        r"2 of 2 targeted modules differ \(emb: sampled",
    ):
        PeftModel.from_pretrained(other, path, on_base_mismatch="error")
    assert_unchanged(other, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(tiny(seed=1), path, on_base_mismatch="ignore")
        PeftModel.from_pretrained(tiny(), path, on_base_mismatch="error")  # same base: silent
        PeftModel.from_pretrained(tiny().to(torch.bfloat16), path, on_base_mismatch="error")


def test_file_without_fingerprint_loads_silently(tmp_path):
    _, path = _trained(tmp_path)
    weights = path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT writes it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(tiny(seed=1), path, on_base_mismatch="error")


# -- loud, all-or-nothing loading -----------------------------------------------------------------
def _rewrite(path, edit):
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _fails(model, path, error, *patterns, **kwargs):
    before = snapshot_all(model)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(model, path, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert_unchanged(model, before)
    return str(info.value)


def test_key_and_shape_problems_reported_together(tmp_path):
    _, path = _trained(tmp_path)

    def edit(t):
        t["base_model.model.act.lora_A.weight"] = torch.ones(4, 4)  # no such target
        del t["base_model.model.fc1.lora_B.weight"]  # targeted, missing
        t["base_model.model.emb.lora_embedding_A"] = torch.ones(3, 20)  # wrong rank

    _rewrite(path, edit)
    message = _fails(
        tiny(),
        path,
        AdapterError,
        "3 problem(s)",
        "the model was not changed",
        "adapter_model.safetensors",
        "act.lora_A.weight: in the file, but no module of the model has this adapter tensor",
        "fc1: targeted by the config, but the file has no 'lora_B.weight' (expected shape (16, 4))",
        "emb: lora_embedding_A has shape (3, 20) in the file, the model expects (4, 20)",
    )
    assert message.count("\n  - ") == 3


def test_config_that_targets_nothing(tmp_path):
    _, path = _trained(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["nope"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    _fails(
        tiny(),
        path,
        lorakit.TargetingError,
        "target_modules=['nope'] matches no module",
        "Modules that could be targeted: emb, fc1, fc2",
    )


@pytest.mark.parametrize(
    "damage, error, shown",
    [
        ("truncate", AdapterFileError, "is truncated"),
        ("garbage", AdapterFileError, "adapter_model.safetensors"),
        ("bad_json", AdapterFileError, "adapter_config.json' is not valid JSON"),
        ("no_config", AdapterFileError, "adapter_config.json' does not exist"),
        ("no_weights", AdapterFileError, "neither adapter_model.safetensors nor adapter_model.bin"),
        ("unsupported", ConfigError, "use_qalora=True asks for QA-LoRA"),
        ("other_peft_type", ConfigError, 'peft_type="IA3"'),
        ("missing_dir", AdapterFileError, "the path does not exist"),
        ("is_file", AdapterFileError, "the path is a file"),
    ],
)
def test_file_problems_are_clear_and_change_nothing(tmp_path, damage, error, shown):
    _, path = _trained(tmp_path)
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    data = json.loads(config.read_text())
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    elif damage == "bad_json":
        config.write_text(config.read_text()[:-5])
    elif damage == "no_config":
        config.unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage in ("unsupported", "other_peft_type"):
        data.update({"use_qalora": True} if damage == "unsupported" else {"peft_type": "IA3"})
        config.write_text(json.dumps(data))
    elif damage == "missing_dir":
        shutil.rmtree(path)
    elif damage == "is_file":
        shutil.rmtree(path)
        path.write_text("x")
    _fails(tiny(), path, error, shown)


def test_failure_after_injection_is_rolled_back(tmp_path, monkeypatch):
    _, path = _trained(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("device ran out of memory")

    monkeypatch.setattr(loading, "set_peft_model_state_dict", broken)
    _fails(tiny(), path, RuntimeError, "out of memory")
    model = get_peft_model(tiny(), LoraConfig(target_modules=["fc1"]))
    before = snapshot_all(model)
    with pytest.raises(RuntimeError):
        model.load_adapter(path, "x")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_load_adapter_errors_change_nothing(tmp_path):
    _, path = _trained(tmp_path)
    model = get_peft_model(tiny(), LoraConfig(target_modules=["fc1"]))
    before = snapshot_all(model)
    with pytest.raises(AdapterError, match="Adapter with name 'default' already exists"):
        model.load_adapter(path, "default")
    _rewrite(path, lambda t: t.pop("base_model.model.fc2.bias"))
    with pytest.raises(AdapterError, match="fc2: targeted by the config, but the file has no 'bias'"):
        model.load_adapter(path, "x")
    with pytest.raises(AdapterError, match="on_base_mismatch='maybe': must be one of warn, error, ignore"):
        model.load_adapter(path, "y", on_base_mismatch="maybe")
    assert_unchanged(model, before)


# -- safe saving ----------------------------------------------------------------------------------
def test_save_refuses_file_and_unknown_adapter_and_writes_nothing(tmp_path):
    model, path = _trained(tmp_path)
    before = _files(path), (path / "adapter_model.safetensors").read_bytes()
    target = tmp_path / "a_file"
    target.write_text("keep")
    with pytest.raises(AdapterFileError, match="a_file.*existing file, not a directory"):
        model.save_pretrained(target)
    assert target.read_text() == "keep"
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['nope'\]; existing adapters: \['default"):
        model.save_pretrained(path, selected_adapters=["nope"])
    assert (_files(path), (path / "adapter_model.safetensors").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["a_file", "saved"]


def test_save_error_midway_leaves_previous_adapter(tmp_path, monkeypatch):
    model, path = _trained(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    perturb_trainable(model, seed=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_dir.fileio, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_save_keywords(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(AdapterError, match=r"unknown keyword argument\(s\) \['max_shard_size'\]"):
        model.save_pretrained(tmp_path / "x", max_shard_size="1GB")
    assert sorted(os.listdir(tmp_path)) == []


def test_pickle_save_writes_a_tensors_only_bin_that_loads_back(tmp_path):
    """safe_serialization=False writes adapter_model.bin as PEFT does (a torch.save of plain tensors,
    readable with weights_only=True), replacing an earlier safetensors file."""
    model, path = _trained(tmp_path)
    model.save_pretrained(path, safe_serialization=False)
    assert _files(path) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    data = torch.load(path / "adapter_model.bin", weights_only=True)
    assert data.keys() == get_peft_model_state_dict(model).keys()
    loaded = PeftModel.from_pretrained(tiny(), path)
    x = tiny_inputs()
    assert torch.equal(loaded(x), model.eval()(x))


def test_malicious_legacy_bin_is_refused_and_never_runs(tmp_path):
    _, path = _trained(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"base_model.model.fc1.lora_A.weight": Evil()}, path / "adapter_model.bin")
    _fails(tiny(), path, AdapterFileError, "adapter_model.bin", "torch.load(weights_only=True)")
    assert not marker.exists()


def test_lorakit_only_task_type_survives_the_roundtrip(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(**CONFIG, task_type="OTHER"))
    model.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["task_type"] is None
    assert PeftModel.from_pretrained(tiny(), tmp_path / "t").peft_config["default"].task_type == "OTHER"


def test_add_adapter_leaves_the_new_adapter_frozen():
    model = get_peft_model(tiny(), LoraConfig(target_modules=["fc1"]))
    model.add_adapter("b", LoraConfig(target_modules=["fc2"]))
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default"}


def test_adapter_names_cannot_escape_the_directory(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(target_modules=["fc1"]))
    model.peft_config["/abs"] = model.peft_config["default"]  # as if a name had slipped through
    with pytest.raises(AdapterError, match="must be a single path component"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["/abs"])
    assert os.listdir(tmp_path) == []


def test_resized_vocabulary_is_named(tmp_path):
    from zoo import ZOO

    model = get_peft_model(ZOO["llama"].build(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path / "e")
    with safe_open(str(tmp_path / "e" / "adapter_model.safetensors"), "pt") as fh:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in fh.keys()  # noqa: SIM118 (PEFT writes it too)
    resized = ZOO["llama"].build()
    resized.resize_token_embeddings(120)
    before = snapshot_all(resized)
    with pytest.raises(AdapterError) as info:
        PeftModel.from_pretrained(resized, tmp_path / "e")
    assert (
        "model.embed_tokens: base_layer.weight has shape (100, 16) in the file, the model expects "
        "(120, 16) (was the vocabulary resized?"
    ) in str(info.value)
    assert (
        "model.embed_tokens: lora_embedding_A has shape (8, 100) in the file, the model expects (8, 120)"
        in str(info.value)
    )
    assert_unchanged(resized, before)

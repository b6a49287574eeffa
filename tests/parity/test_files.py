"""Golden interop with real PEFT 0.21.2: directories written by each library load in the other with
identical outputs, and both write the same keys and shapes for the same config.

Directories are generated here by PEFT itself (no checked-in binaries). Every trainable tensor
(LoRA factors, modules-to-save copies, trained biases) is perturbed before saving, so a tensor that
failed to load would change the output.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from zoo import ZOO, main_output, perturb_trainable

import lorakit
from lorakit import BaseModelMismatchWarning

pytestmark = pytest.mark.parity

BASE = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
CASES = {
    "bert-default": ("bert", {}),
    "bert-all-linear-lora_only": ("bert", {"target_modules": "all-linear", "bias": "lora_only"}),
    "bert_cls-seq_cls-head": ("bert_cls", {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}),
    "roberta-layers_to_transform": (
        "roberta",
        {"target_modules": ["query", "value", "dense"], "layers_to_transform": [1]},
    ),
    "gpt2-default": ("gpt2", {"fan_in_fan_out": True}),
    "gpt2-rslora-dropout": (
        "gpt2",
        {
            "target_modules": ["c_attn", "c_proj", "c_fc"],
            "use_rslora": True,
            "lora_dropout": 0.1,
            "fan_in_fan_out": True,
        },
    ),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "llama-embed-patterns-save": (
        "llama",
        {
            "target_modules": ["embed_tokens", "q_proj", "v_proj"],
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
            "modules_to_save": ["lm_head"],
        },
    ),
    "mistral-default": ("mistral", {}),
    "mistral-regex-lora_bias": ("mistral", {"target_modules": r".*\.(q_proj|o_proj)", "lora_bias": True}),
    "t5-default": ("t5", {}),
    "t5-exclude": (
        "t5",
        {"target_modules": ["q", "k", "v", "o", "wi", "wo"], "exclude_modules": r".*decoder.*"},
    ),
    "bart-default": ("bart", {}),
    "bart-all-linear-bias_all": ("bart", {"target_modules": "all-linear", "bias": "all"}),
    "mlp-conv-embedding-save-bias_all": (
        "mlp",
        {"target_modules": ["emb", "conv", "lin0"], "modules_to_save": ["lin1"], "bias": "all"},
    ),
    "mlp-lora_only": ("mlp", {"target_modules": ["conv", "lin0", "lin1"], "bias": "lora_only", "r": 2}),
}


def _out(model, arch):
    with torch.no_grad():
        return main_output(model(**ZOO[arch].inputs()))


def _contents(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


def _saved(lib, arch, kwargs, path, seed):
    config = lib.LoraConfig(**{**BASE, **kwargs})
    model = lib.get_peft_model(ZOO[arch].build(), config)
    perturb_trainable(model, seed=seed)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(autouse=True)
def _no_base_mismatch():
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        yield


@pytest.mark.parametrize("case", CASES)
def test_interop(case, tmp_path):
    arch, kwargs = CASES[case]
    base_out = _out(ZOO[arch].build(), arch)
    theirs = _saved(peft, arch, kwargs, tmp_path / "peft", seed=1)
    ours = _saved(lorakit, arch, kwargs, tmp_path / "lorakit", seed=2)

    # same keys and shapes, same config keys
    assert _contents(tmp_path / "lorakit") == _contents(tmp_path / "peft")
    our_json = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())
    their_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert our_json.keys() == their_json.keys()

    # PEFT -> lorakit
    loaded = lorakit.PeftModel.from_pretrained(ZOO[arch].build(), tmp_path / "peft")
    expected = _out(theirs, arch)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter does not change the output"
    torch.testing.assert_close(_out(loaded, arch), expected, rtol=1e-5, atol=1e-6)

    # lorakit -> PEFT
    loaded_peft = peft.PeftModel.from_pretrained(ZOO[arch].build(), tmp_path / "lorakit")
    expected = _out(ours, arch)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter does not change the output"
    torch.testing.assert_close(_out(loaded_peft, arch), expected, rtol=1e-5, atol=1e-6)


def _two_adapters(lib, path):
    model = lib.get_peft_model(ZOO["llama"].build(), lib.LoraConfig(**BASE))
    model.add_adapter("second", lib.LoraConfig(**{**BASE, "r": 2, "target_modules": "all-linear"}))
    for name in ("default", "second"):
        model.set_adapter(name)
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(True)
    perturb_trainable(model, seed=3)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "writer, reader", [(peft, lorakit), (lorakit, peft)], ids=["peft->lorakit", "lorakit->peft"]
)
def test_multi_adapter_roundtrip(writer, reader, tmp_path):
    source = _two_adapters(writer, tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    loaded = reader.PeftModel.from_pretrained(ZOO["llama"].build(), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        source.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(_out(loaded, "llama"), _out(source, "llama"), rtol=1e-5, atol=1e-6)


def test_transformers_load_adapter_reads_lorakit(tmp_path):
    ours = _saved(lorakit, "llama", {"target_modules": ["q_proj", "v_proj", "gate_proj"]}, tmp_path, seed=4)
    model = ZOO["llama"].build()
    model.load_adapter(str(tmp_path))
    torch.testing.assert_close(_out(model, "llama"), _out(ours, "llama"), rtol=1e-5, atol=1e-6)


def test_peft_legacy_bin_loads(tmp_path):
    model = peft.get_peft_model(ZOO["gpt2"].build(), peft.LoraConfig(**BASE, fan_in_fan_out=True))
    perturb_trainable(model, seed=5)
    model.eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("adapter_model")) == [
        "adapter_model.bin"
    ]
    loaded = lorakit.PeftModel.from_pretrained(ZOO["gpt2"].build(), tmp_path)
    torch.testing.assert_close(_out(loaded, "gpt2"), _out(model, "gpt2"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "init, kwargs",
    [
        ("eva", {"eva_config": {"rho": 2.0}}),
        ("mica", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    ],
)
def test_data_driven_init_files_load_both_ways(init, kwargs, tmp_path):
    """EVA and MiCA adapters are plain LoRA factors once trained: their files load without running the
    init (EVA's needs data; MiCA's SVD is skipped), the base stays as it is, MiCA's B stays frozen as
    in PEFT, and lorakit writes the same init back."""
    config = peft.LoraConfig(**{**BASE, "init_lora_weights": init, **kwargs})
    theirs = peft.get_peft_model(ZOO["llama"].build(), config)
    perturb_trainable(theirs, seed=6)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")

    fresh = ZOO["llama"].build()
    base_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = lorakit.PeftModel.from_pretrained(fresh, tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(_out(loaded, "llama"), _out(theirs, "llama"), rtol=1e-5, atol=1e-6)
    base_now = loaded.get_base_model()
    for key, value in base_state.items():  # every base weight, under its (possibly wrapped) name
        module, _, tensor = key.rpartition(".")
        holder = base_now.get_submodule(module)
        holder = getattr(holder, "base_layer", holder)
        assert torch.equal(getattr(holder, tensor), value), key
    peft_trainable = peft.PeftModel.from_pretrained(
        ZOO["llama"].build(), tmp_path / "peft", is_trainable=True
    )
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == sorted(
        n for n, p in peft_trainable.named_parameters() if p.requires_grad
    )

    loaded.save_pretrained(tmp_path / "lorakit")
    assert json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())["init_lora_weights"] == init
    back = peft.PeftModel.from_pretrained(ZOO["llama"].build(), tmp_path / "lorakit")
    torch.testing.assert_close(_out(back, "llama"), _out(theirs, "llama"), rtol=1e-5, atol=1e-6)

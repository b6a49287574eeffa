"""PeftModel's API: printing, parameter counts against PEFT, pickling, mixed batches, delegation."""

from __future__ import annotations

import copy
import pickle
import warnings

import peft
import pytest
import torch
from zoo import MODELS, SMALL_VOCAB, TOY_TARGETS, ids, llama, logits, toy

import lorakit
from lorakit import AdapterError, LoraConfig, TaskType
from lorakit.layers import LoraLayer

BUILDS = {**MODELS, "toy": toy}
TARGETS = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"], "toy": TOY_TARGETS}


def build_pair(model_name: str, **kwargs):
    """(lorakit PeftModel, PEFT PeftModel) for the same fresh base model and config."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(BUILDS[model_name](), LoraConfig(**kwargs))
        theirs = peft.get_peft_model(BUILDS[model_name](), peft.LoraConfig(**kwargs))
    return ours, theirs


COUNT_CASES = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}),
    ("llama", {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    ("llama", {"target_modules": ["q_proj"], "rank_pattern": {"layers.1.self_attn.q_proj": 2}}),
    ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc", "wte"], "fan_in_fan_out": True, "bias": "all"}),
    ("gpt2", {"target_modules": ["c_proj"], "fan_in_fan_out": True, "bias": "lora_only", "lora_bias": True}),
    ("llama", {"target_modules": ["q_proj"], "inference_mode": True}),
]


@pytest.mark.parity
@pytest.mark.parametrize(("model_name", "kwargs"), COUNT_CASES, ids=[f"{m}-{k}" for m, k in COUNT_CASES])
def test_trainable_parameter_counts_match_peft(model_name, kwargs, capsys):
    ours, theirs = build_pair(model_name, **kwargs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    assert expected.startswith("trainable params: ")


def test_trainable_count_is_lora_size():
    ours, _ = build_pair("llama", target_modules=["q_proj", "v_proj"], r=2)
    # per layer: q (16→16) and v (16→8): A (2×16) each, B (16×2) and (8×2)
    assert ours.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 32 + 16)


def test_print_shows_lora_parts():
    model = lorakit.get_peft_model(
        llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"], lora_dropout=0.1)
    )
    text = str(model)
    for part in (
        "lora_A",
        "lora_B",
        "lora_dropout",
        "lora_embedding_A",
        "lora_embedding_B",
        "base_layer",
        "Dropout(p=0.1",
        "(default): Linear(in_features=16, out_features=8",
    ):
        assert part in text, part


@pytest.mark.parity
def test_state_dict_names_are_peft_names():
    ours, theirs = build_pair("llama", target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    assert set(ours.state_dict()) == set(theirs.state_dict())


def _round_trips(model_name: str, merge: bool):
    """(model, input, [pickled copy, deep copy]), each copy checked to give the model's output, config
    and active adapter."""
    targets = TARGETS[model_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_peft_model(
            BUILDS[model_name](), LoraConfig(target_modules=targets, init_lora_weights=False)
        )
    if merge:
        model.merge_adapter()
    x = ids(seq=4) if model_name == "toy" else ids()
    expected = logits(model, x)
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for clone in clones:
        assert torch.equal(logits(clone, x), expected)
        assert clone.peft_config == model.peft_config
        assert clone.active_adapter == "default"
    return model, x, clones


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "toy"])
def test_pickle_and_deepcopy_round_trip(model_name):
    _round_trips(model_name, merge=False)


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "toy"])
def test_pickle_and_deepcopy_of_a_merged_model_round_trip_and_unmerge(model_name):
    model, x, clones = _round_trips(model_name, merge=True)
    for clone in clones:
        clone.unmerge_adapter()
        assert torch.allclose(logits(clone, x), logits(model, x), atol=1e-5)
        with clone.disable_adapter():
            base = logits(clone, x)
        with model.disable_adapter():
            assert torch.equal(base, logits(model, x))


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "toy"])
def test_mixed_batch_equals_each_adapter_alone(model_name):
    targets = TARGETS[model_name]
    kwargs = {"modules_to_save": ["lm_head"]} if model_name == "llama" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_peft_model(
            BUILDS[model_name](), LoraConfig(target_modules=targets, init_lora_weights=False, **kwargs)
        )
        torch.manual_seed(5)
        model.add_adapter("other", LoraConfig(target_modules=targets, init_lora_weights=False, r=3, **kwargs))
    if model_name == "llama":
        with torch.no_grad():
            model.get_base_model().lm_head.modules_to_save["other"].weight.mul_(1.5)
    x = ids(batch=5, seq=4) if model_name == "toy" else ids(batch=5)
    names = ["default", "__base__", "other", "default", "other"]
    mixed = logits(model, x, adapter_names=names)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = logits(model, x)
    with model.disable_adapter():
        alone["__base__"] = logits(model, x)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], alone[name][row], atol=1e-5), (row, name)
    model.set_adapter("default")
    assert torch.equal(logits(model, x), alone["default"])  # no hook left behind


def test_mixed_batch_unknown_name_lists_adapters():
    model = lorakit.get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError) as info:
        model(ids(batch=2), adapter_names=["default", "nope"])
    assert "nope" in str(info.value) and "default" in str(info.value)


@pytest.mark.parametrize("beams", [1, 2])
def test_mixed_batch_generate(beams):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_peft_model(
            MODELS["gpt2"](), LoraConfig(target_modules=["c_attn"], init_lora_weights=False)
        )
    x = ids(batch=2, seq=3)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "num_beams": beams}
    mixed = model.generate(input_ids=x, adapter_names=["default", "__base__"], **kwargs)
    adapted = model.generate(input_ids=x, **kwargs)
    with model.disable_adapter():
        base = model.generate(input_ids=x, **kwargs)
    assert torch.equal(mixed[0], adapted[0])
    assert torch.equal(mixed[1], base[1])


def test_backward_reaches_only_trainable_lora_weights():
    model = lorakit.get_peft_model(
        llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.train()
    x = ids()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".lora_" in n for n in with_grad)


def test_default_init_starts_as_base_model():
    base = llama()
    x = ids()
    expected = logits(base, x)
    model = lorakit.get_peft_model(base, LoraConfig(target_modules="all-linear"))
    assert torch.equal(logits(model, x), expected)


def test_forwarded_attributes():
    base = llama()
    model = lorakit.get_peft_model(base, LoraConfig())
    assert model.config is base.config
    assert model.get_base_model() is base
    assert model.get_input_embeddings() is base.get_input_embeddings()
    assert model.device == base.device
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert model.active_peft_config is model.peft_config["default"]
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018


def test_inference_mode_freezes_everything():
    model = lorakit.get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())


def test_several_active_adapters_add_up():
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["lin"], init_lora_weights=False))
    x = ids(seq=4)
    with model.disable_adapter():
        base = logits(model, x)
    layer = model.get_base_model().lin
    assert isinstance(layer, LoraLayer)
    h = torch.nn.functional.embedding(x, model.get_base_model().emb.weight)
    model.set_adapter(["default", "b"])
    assert model.active_adapter == ["default", "b"]
    both = layer(h)
    expected = layer.base_layer(h) + layer.lora_branch(h, "default") + layer.lora_branch(h, "b")
    assert torch.allclose(both, expected, atol=1e-6)
    assert not torch.allclose(logits(model, x), base)


def test_inject_adapter_in_model_records_config_and_trains():
    model = lorakit.inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), llama())
    assert set(model.peft_config) == {"default"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lorakit.inject_adapter_in_model(LoraConfig(target_modules=["v_proj"]), model, adapter_name="b")
    assert set(model.peft_config) == {"default", "b"}


@pytest.mark.parametrize("task", [TaskType.CAUSAL_LM, "CAUSAL_LM", None])
def test_get_peft_model_task_types(task):
    model = lorakit.get_peft_model(llama(), LoraConfig(task_type=task))
    assert isinstance(model, lorakit.PeftModel)
    out = model(input_ids=ids())
    assert out.logits.shape == (3, 5, SMALL_VOCAB)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("model_name", "kwargs"),
    [
        (
            "llama",
            {
                "target_modules": ["q_proj", "embed_tokens"],
                "lora_dropout": 0.1,
                "modules_to_save": ["lm_head"],
            },
        ),
        ("gpt2", {"target_modules": ["c_attn", "wte"], "fan_in_fan_out": True}),
    ],
)
def test_print_is_peft_print(model_name, kwargs):
    ours, theirs = build_pair(model_name, **kwargs)
    assert str(ours) == str(theirs)


def test_train_mode_dropout_only_on_lora_branch():
    model = lorakit.get_peft_model(
        llama(), LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    )
    x = ids()
    exact = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    model.train()
    torch.manual_seed(0)
    first = logits(model, x)
    torch.manual_seed(0)
    assert torch.equal(logits(model, x), first)  # the masks follow torch.manual_seed
    assert not torch.allclose(logits(model, x), first)
    assert not torch.allclose(first, exact)
    torch.manual_seed(0)
    with_grad = model(input_ids=x).logits  # the autograd path draws the same masks
    assert torch.equal(with_grad.detach(), first)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), base)
    model.eval()
    assert torch.equal(logits(model, x), exact)


@pytest.mark.parity
def test_add_adapter_trainability_matches_peft():
    kwargs = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    ours, theirs = build_pair("llama", **kwargs)
    second = {"target_modules": ["q_proj", "o_proj"], "r": 4, "modules_to_save": ["lm_head"]}
    ours.add_adapter("other", LoraConfig(**second))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_any_attribute_of_the_user_model_is_forwarded():
    """PEFT users reach the model's submodules and fields through the wrapper (peft_model.lin0)."""
    base = toy()
    base.custom_field = 5
    model = lorakit.get_peft_model(base, LoraConfig(target_modules=["lin"]))
    assert model.head is base.head and model.lin is base.lin
    assert model.custom_field == 5
    assert model.base_model.head is base.head
    assert model.model is base  # PEFT code reads peft_model.model
    assert model.modules_to_save is None


def test_get_peft_model_twice_warns_and_replaces_the_adapter():
    base = toy()
    first = lorakit.get_peft_model(base, LoraConfig(target_modules=["lin"], r=2))
    first.merge_adapter()
    with pytest.raises(AdapterError, match="merged"), pytest.warns(UserWarning, match="for a second time"):
        lorakit.get_peft_model(base, LoraConfig(target_modules=["lin", "conv1"], r=4))
    first.unmerge_adapter()
    with pytest.warns(UserWarning, match="for a second time"):
        second = lorakit.get_peft_model(base, LoraConfig(target_modules=["lin", "conv1"], r=4))
    assert second.base_model.targeted_module_names == ["lin", "conv1"]
    assert base.lin.r == {"default": 4} and base.conv1.r == {"default": 4}
    second.unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unloaded: a fresh start, no warning
        lorakit.get_peft_model(base, LoraConfig(target_modules=["lin"]))


def test_mixed_model_activates_several_adapters_and_saves(tmp_path):
    model = lorakit.get_peft_model(
        toy(), LoraConfig(target_modules=["lin"], init_lora_weights=False), "a", mixed=True
    )
    assert isinstance(model, lorakit.PeftMixedModel)
    model.add_adapter("b", LoraConfig(target_modules=["conv1"], init_lora_weights=False))
    model.set_adapter(["a", "b"])
    x = ids(seq=4)
    out = logits(model, x)
    model.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    loaded = lorakit.PeftMixedModel.from_pretrained(toy(), tmp_path / "a", "a")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.set_adapter(["a", "b"])
    assert torch.equal(logits(loaded, x), out)


def test_add_adapter_keywords_set_dtype_and_device():
    base = toy().to(torch.bfloat16)
    model = lorakit.get_peft_model(base, LoraConfig(target_modules=["lin"]), autocast_adapter_dtype=False)
    model.add_adapter("f32", LoraConfig(target_modules=["lin"]))
    model.add_adapter("bf16", LoraConfig(target_modules=["lin"]), autocast_adapter_dtype=False)
    model.add_adapter("meta", LoraConfig(target_modules=["lin"]), low_cpu_mem_usage=True)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_A" in n}
    assert dtypes["base_model.model.lin.lora_A.default.weight"] == torch.bfloat16
    assert dtypes["base_model.model.lin.lora_A.f32.weight"] == torch.float32
    assert dtypes["base_model.model.lin.lora_A.bf16.weight"] == torch.bfloat16
    assert model.get_base_model().lin.lora_A["meta"].weight.is_meta


def test_a_config_naming_another_base_model_warns():
    base = toy()
    base.name_or_path = "my/base"
    with pytest.warns(UserWarning, match="renamed from 'other/base' to 'my/base'"):
        lorakit.get_peft_model(base, LoraConfig(target_modules=["lin"], base_model_name_or_path="other/base"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], base_model_name_or_path=None))

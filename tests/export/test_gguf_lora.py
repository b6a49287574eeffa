"""GGUF LoRA export: the file holds llama.cpp's keys and, read back with the ``gguf`` package, gives
every module's ΔW = s·B·A in llama.cpp's layout; what GGUF cannot express is refused before any write."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from lorakit import ExportError, LoraConfig, TaskType, get_peft_model
from lorakit.cli.main import main
from lorakit.export import export_gguf
from lorakit.export.gguf_lora import permute_rows

HEADS, KV_HEADS, HIDDEN = 4, 2, 32
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_OF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _llama(tie: bool = True, model_type: str = "llama") -> Any:
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in cls[model_type])
    config = config_cls(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=48,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def _adapter(tmp_path: Path, base: Any, name: str = "adapter", **options: Any) -> tuple[Path, Any]:
    """Save ``base`` (its config) and an adapter with random A and B; returns (adapter folder, model)."""
    base.config.save_pretrained(tmp_path / "base")
    options = {"r": 4, "lora_alpha": 8, "target_modules": LINEAR, "init_lora_weights": False, **options}
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, base_model_name_or_path=str(tmp_path / "base"), **options
    )
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    # GGUF lists dims innermost first; reversed, they are torch's (rows, columns)
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    return fields, tensors


def _llamacpp_delta(tensors: dict[str, np.ndarray], name: str, alpha: float) -> torch.Tensor:
    """ΔW as llama.cpp computes it from a pair: scale · B A, scale = alpha / r (1 when alpha is 0)."""
    a = torch.from_numpy(tensors[f"{name}.lora_a"].astype(np.float32))
    b = torch.from_numpy(tensors[f"{name}.lora_b"].astype(np.float32))
    scale = alpha / b.shape[1] if alpha else 1.0
    return scale * b @ a


def _layer(model: Any, path: str) -> Any:
    return model.get_base_model().get_submodule(path)


def test_permute_rows_is_llama_cpps_rotary_interleave() -> None:
    # one head of dim 4: rows (x0, x1 | y0, y1) → (x0, y0, x1, y1)
    assert permute_rows(torch.arange(4.0).unsqueeze(1), 1).squeeze(1).tolist() == [0, 2, 1, 3]
    # two heads of dim 4 each permute on their own
    assert permute_rows(torch.arange(8.0).unsqueeze(1), 2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_every_linear_pair_gives_the_adapters_delta_in_llama_cpps_layout(tmp_path: Path) -> None:
    folder, model = _adapter(tmp_path, _llama())
    result = export_gguf(folder, tmp_path / "a.gguf")
    fields, tensors = _read(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert not result.folded_scaling and result.pairs == 2 * len(LINEAR)
    assert len(tensors) == 2 * result.pairs
    for layer in range(2):
        for kind in LINEAR:
            block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            path = f"model.layers.{layer}.{block}.{kind}"
            expected = _layer(model, path).delta_weight("default")  # (out, in), HF's row order
            if kind == "q_proj":
                expected = permute_rows(expected, HEADS)
            elif kind == "k_proj":
                expected = permute_rows(expected, KV_HEADS)
            got = _llamacpp_delta(tensors, f"blk.{layer}.{GGUF_OF[kind]}.weight", 8.0)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_embedding_lora_is_written_transposed_as_llama_cpp_gathers_it(tmp_path: Path) -> None:
    folder, model = _adapter(tmp_path, _llama(tie=False), target_modules=["embed_tokens", "q_proj"])
    export_gguf(folder, tmp_path / "e.gguf")
    _, tensors = _read(tmp_path / "e.gguf")
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (50, 4) and b.shape == (HIDDEN, 4)  # (vocab, r) and (dim, r)
    delta = 2.0 * torch.from_numpy(a) @ torch.from_numpy(b).T  # (vocab, dim): the row a token id picks
    torch.testing.assert_close(delta, _layer(model, "model.embed_tokens").delta_weight("default"))


@pytest.mark.parametrize(
    "options",
    [
        {"use_rslora": True},
        {"alpha_pattern": {"v_proj": 32}},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    ],
)
def test_scalings_one_alpha_cannot_express_are_folded_into_b(tmp_path: Path, options: dict[str, Any]) -> None:
    folder, model = _adapter(tmp_path, _llama(), **options)
    result = export_gguf(folder, tmp_path / "f.gguf")
    fields, tensors = _read(tmp_path / "f.gguf")
    assert result.folded_scaling and fields["adapter.lora.alpha"] == 0.0
    for kind, name in [("v_proj", "blk.1.attn_v.weight"), ("q_proj", "blk.0.attn_q.weight")]:
        layer = 1 if kind == "v_proj" else 0
        expected = _layer(model, f"model.layers.{layer}.self_attn.{kind}").delta_weight("default")
        if kind == "q_proj":
            expected = permute_rows(expected, HEADS)
        torch.testing.assert_close(_llamacpp_delta(tensors, name, 0.0), expected, rtol=1e-6, atol=1e-7)


def test_a_rank_pattern_keeps_one_alpha_over_each_pairs_rank(tmp_path: Path) -> None:
    folder, _ = _adapter(tmp_path, _llama(), rank_pattern={"q_proj": 2})
    assert not export_gguf(folder, tmp_path / "r.gguf").folded_scaling  # α/r per pair is llama.cpp's rule


def test_qwen2_keeps_hfs_row_order(tmp_path: Path) -> None:
    folder, model = _adapter(tmp_path, _llama(model_type="qwen2"), target_modules=["q_proj"])
    export_gguf(folder, tmp_path / "q.gguf", dtype="f16")
    fields, tensors = _read(tmp_path / "q.gguf")
    assert (
        fields["general.architecture"] == "qwen2"
        and tensors["blk.0.attn_q.weight.lora_a"].dtype == np.float16
    )
    expected = _layer(model, "model.layers.0.self_attn.q_proj").delta_weight("default")
    torch.testing.assert_close(
        _llamacpp_delta(tensors, "blk.0.attn_q.weight", 8.0), expected, rtol=2e-3, atol=2e-3
    )


def _fake_base_gguf(path: Path, base: Any, drop: str | None = None, wrong: str | None = None) -> Path:
    """A base GGUF with the metadata and tensor shapes of ``base`` (zeros: only shapes are read)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_block_count(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key, value in base.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None or name == drop:
            continue
        shape = tuple(value.shape)
        if name == wrong:
            shape = (shape[0] + 2, *shape[1:])
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_base_gguf_supplies_the_heads_and_is_checked_name_by_name(tmp_path: Path) -> None:
    base = _llama()
    folder, _ = _adapter(tmp_path, base)
    good = _fake_base_gguf(tmp_path / "base.gguf", base)
    assert export_gguf(folder, tmp_path / "ok.gguf", base=good).pairs == 14
    bad = _fake_base_gguf(
        tmp_path / "bad.gguf", base, drop="blk.1.ffn_up.weight", wrong="blk.0.attn_k.weight"
    )
    with pytest.raises(ExportError) as info:
        export_gguf(folder, tmp_path / "no.gguf", base=bad)
    assert "blk.1.ffn_up.weight (missing)" in str(info.value) and "blk.0.attn_k.weight (base (18, 32)" in str(
        info.value
    )
    assert not (tmp_path / "no.gguf").exists()


@pytest.mark.filterwarnings("ignore:the model ties its input embedding")  # the tied cases, on purpose
@pytest.mark.parametrize(
    ("options", "base_kwargs", "message"),
    [
        ({"use_dora": True}, {}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, {"tie": False}, "modules_to_save"),
        ({"lora_bias": True}, {}, "lora_bias"),
        ({"target_modules": ["lm_head", "q_proj"]}, {"tie": True}, "ties it to the token embeddings"),
        ({"target_modules": ["embed_tokens"]}, {"tie": True}, "would apply it to the head as well"),
    ],
)
def test_what_gguf_cannot_express_is_refused_before_writing(
    tmp_path: Path, options: dict[str, Any], base_kwargs: dict[str, Any], message: str
) -> None:
    folder, _ = _adapter(tmp_path, _llama(**base_kwargs), **options)
    with pytest.raises(ExportError, match=message):
        export_gguf(folder, tmp_path / "x.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".x.gguf*")) == []


def test_lora_on_experts_is_refused_with_its_reason(tmp_path: Path) -> None:
    from zoo import moe

    config = LoraConfig(
        target_modules=["q_proj"], target_parameters=["experts.down_proj"], init_lora_weights=False
    )
    get_peft_model(moe("qwen3_moe"), config).save_pretrained(tmp_path / "experts")
    with pytest.raises(ExportError, match=r"target_parameters=\['experts.down_proj'\]"):
        export_gguf(tmp_path / "experts", tmp_path / "x.gguf", base=tmp_path / "none")
    assert not (tmp_path / "x.gguf").exists()


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    from zoo import gpt2

    folder, _ = _adapter(tmp_path, gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(
        ExportError, match=r"'gpt2' is not supported; supported: \['llama', 'mistral', 'qwen2'\]"
    ):
        export_gguf(folder, tmp_path / "x.gguf")


def test_the_command_writes_the_file_or_reports_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = _adapter(tmp_path, _llama())
    assert main(["export", str(folder), "--to", "gguf", "--out", str(tmp_path / "c.gguf")]) == 0
    assert "14 LoRA pairs for llama.cpp's 'llama' (alpha 8)" in capsys.readouterr().out
    again = ["export", str(folder), "--out", str(tmp_path / "c.gguf")]
    assert main(again) == 2 and "pass --overwrite" in capsys.readouterr().err  # never replaced unasked
    assert main([*again, "--overwrite", "--outtype", "f16"]) == 0
    assert gguf.GGUFReader(str(tmp_path / "c.gguf")).tensors[0].tensor_type == gguf.GGMLQuantizationType.F16
    capsys.readouterr()
    dora, _ = _adapter(tmp_path, _llama(), name="dora", use_dora=True)
    assert main(["export", str(dora), "--out", str(tmp_path / "d.gguf")]) == 2
    assert capsys.readouterr().err.startswith("lorakit export: error: ")

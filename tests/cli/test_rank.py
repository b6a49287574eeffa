"""``lorakit rank``, ``resize`` and ``extract`` on tiny adapters and models."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from zoo import llama_wide

from lorakit import LoraConfig, get_peft_model
from lorakit.cli.main import main


@pytest.fixture
def adapter(tmp_path):
    model = get_peft_model(
        llama_wide(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    llama_wide().save_pretrained(tmp_path / "base")
    return tmp_path


def test_rank_table_json_and_plot(adapter, capsys):
    assert main(["rank", str(adapter / "adapter"), "--plot", str(adapter / "rank.png")]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "v_proj" in out and "suggested rank:" in out
    assert (adapter / "rank.png").stat().st_size > 5000
    assert main(["rank", str(adapter / "adapter"), "--json", "--base", str(adapter / "base")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == 4
    module = data["modules"][0]
    assert len(module["singular_values"]) == 8 and module["relative_update"] > 0
    assert set(module["ranks_for_energy"]) == {"0.90", "0.95", "0.99"}
    assert 1 <= data["suggested_rank"] <= 8


@pytest.mark.parity
def test_resize_writes_an_adapter_peft_loads(adapter, capsys):
    out = adapter / "small"
    assert main(["resize", str(adapter / "adapter"), "--rank", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max relative error" in printed
    loaded = peft.PeftModel.from_pretrained(llama_wide(), out)
    ranks = {m.r["default"] for m in loaded.modules() if hasattr(m, "r") and isinstance(m.r, dict) and m.r}
    assert ranks == {3}
    assert main(["resize", str(adapter / "adapter"), "--energy", "0.5", "--out", str(adapter / "e")]) == 0


@pytest.mark.parity
def test_extract_writes_an_adapter_that_reproduces_the_tuned_model(adapter, capsys):
    tuned = llama_wide()
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight += 0.1 * torch.randn(32, 2) @ torch.randn(2, 32)
    tuned.save_pretrained(adapter / "tuned")
    out = adapter / "extracted"
    assert (
        main(
            [
                "extract",
                "--base",
                str(adapter / "base"),
                "--tuned",
                str(adapter / "tuned"),
                "--rank",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "1 low-rank modules" in capsys.readouterr().out
    loaded = peft.PeftModel.from_pretrained(llama_wide(), out)
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "argv",
    [
        ["rank", "/nonexistent/adapter"],
        ["resize", "/nonexistent/adapter", "--rank", "2", "--out", "/tmp/x"],
        [
            "extract",
            "--base",
            "/nonexistent/a",
            "--tuned",
            "/nonexistent/b",
            "--rank",
            "2",
            "--out",
            "/tmp/x",
        ],
    ],
)
def test_bad_paths_are_one_line_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lorakit {argv[0]}: error:") and "nonexistent" in err[-1]


def test_resize_rejects_a_bad_rank(adapter, capsys):
    assert main(["resize", str(adapter / "adapter"), "--rank", "0", "--out", str(adapter / "z")]) == 2
    assert "rank=0" in capsys.readouterr().err

"""``lorakit train``'s initialisations and variants (issue 19): --init, --use-rslora, --use-dora,
--loraplus-ratio each change what is trained, and the run's record and adapter say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import sentiment_rows, tiny_bert, write_rows

from lorakit.cli.main import main
from lorakit.cli.settings import TrainSettings
from lorakit.cli.training import build_model, first_batches, loraplus_optimizer, plan_run

FAST = ["--max-steps", "4", "--save-steps", "4", "--threads", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    tiny_bert(root / "bert")
    write_rows(sentiment_rows(), root / "sentiment.csv")
    return root


def settings(files: Path, **changes: object) -> TrainSettings:
    return TrainSettings(
        model=str(files / "bert"),
        data=str(files / "sentiment.csv"),
        text_column="sentence",
        label_column="sentiment",
        batch_size=8,
        init_batches=2,
        threads=1,
        **changes,  # type: ignore[arg-type]
    )


def built(files: Path, **changes: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model ``lorakit train`` would train (seed 0), and its LoRA A/B tensors by name."""
    from transformers import AutoTokenizer, set_seed

    from lorakit.cli.tasks import encode

    plan = plan_run(settings(files, **changes))
    labels = ["neg", "pos"]
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    feats = encode(plan.task, plan.rows, tokenizer, plan.settings, plan.label_column, labels)
    model = build_model(plan, labels, first_batches(plan, tokenizer, feats))
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return model, tensors


def test_loraplus_optimizer_gives_b_ratio_times_the_learning_rate(files: Path) -> None:
    model, _ = built(files)
    assert loraplus_optimizer(model, settings(files)) is None  # unset: the Trainer's own AdamW
    optimizer = loraplus_optimizer(model, settings(files, lr=1e-3, loraplus_ratio=16.0))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert lr_of[id(p)] == pytest.approx(16e-3), name
        elif "lora_A" in name:
            assert lr_of[id(p)] == pytest.approx(1e-3), name


def test_eva_and_lora_ga_start_away_from_the_default_init(files: Path) -> None:
    _, default = built(files)
    _, eva = built(files, init="eva")
    a_names = [n for n in default if "lora_A" in n]
    assert a_names
    assert any(n not in eva or not torch.equal(default[n], eva[n]) for n in a_names)
    assert all(torch.count_nonzero(eva[n]) == 0 for n in eva if "lora_B" in n)  # EVA keeps B = 0
    _, ga = built(files, init="lora-ga")
    assert all(not torch.equal(default[n], ga[n]) for n in a_names)
    assert any(torch.count_nonzero(ga[n]) > 0 for n in ga if "lora_B" in n)  # LoRA-GA: B from the gradient


@pytest.mark.slow
def test_eva_run_records_rank_pattern_and_settings(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "eva"
    argv = ["train", "--model", str(files / "bert"), "--data", str(files / "sentiment.csv")]
    argv += ["--text-column", "sentence", "--label-column", "sentiment", "--init", "eva"]
    argv += ["--init-batches", "2", "--batch-size", "8", "--out", str(out), *FAST]
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    assert isinstance(config["rank_pattern"], dict)  # EVA's redistributed ranks (where not r)
    from safetensors.torch import load_file

    for key, tensor in load_file(str(out / "adapter_model.safetensors")).items():
        if "lora_A" in key:
            module = key.split(".lora_A")[0].removeprefix("base_model.model.")
            assert tensor.shape[0] == config["rank_pattern"].get(module, config["r"]), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["init"] == "eva" and metrics["config"]["init_batches"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, key, value",
    [
        (["--init", "pissa"], "init_lora_weights", "pissa"),
        (["--init", "olora"], "init_lora_weights", "olora"),
        (["--init", "gaussian"], "init_lora_weights", "gaussian"),
        (["--init", "lora-ga", "--init-batches", "2"], "init_lora_weights", "lora_ga"),
        (["--use-rslora"], "use_rslora", True),
        (["--use-dora"], "use_dora", True),
        (["--loraplus-ratio", "16"], "init_lora_weights", True),
    ],
)
def test_each_flag_reaches_the_adapter_and_the_record(
    files: Path, tmp_path: Path, flags: list[str], key: str, value: object
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", str(files / "bert"), "--data", str(files / "sentiment.csv")]
    argv += ["--text-column", "sentence", "--label-column", "sentiment", "--out", str(out), *FAST, *flags]
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())[key] == value
    recorded = json.loads((out / "metrics.json").read_text())["config"]
    setting = flags[0].removeprefix("--").replace("-", "_")
    assert recorded[setting] == (flags[1].replace("-", "-") if len(flags) > 1 else True) or (
        setting == "loraplus_ratio" and recorded[setting] == 16.0
    )
    if "--use-dora" in flags:
        from safetensors.torch import load_file

        assert any("lora_magnitude_vector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    if "--loraplus-ratio" in flags:
        state = torch.load(out / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
        initial = sorted({g["initial_lr"] for g in state["param_groups"]})
        assert initial[-1] == pytest.approx(16 * 1e-2) and 1e-2 in [pytest.approx(x) for x in initial]

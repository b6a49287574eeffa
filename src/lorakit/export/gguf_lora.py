"""A PEFT-format LoRA adapter as a GGUF LoRA adapter, which llama.cpp applies to the base model's GGUF.

llama.cpp's format (``src/llama-adapter.cpp``, written by its ``convert_lora_to_gguf.py``):

- keys ``general.type = "adapter"``, ``general.architecture`` (must equal the base GGUF's),
  ``adapter.type = "lora"``, ``adapter.lora.alpha``;
- per adapted weight ``<gguf name>.lora_a`` and ``<gguf name>.lora_b``, e.g.
  ``blk.0.attn_q.weight.lora_a``. In torch's (row-major) terms ``lora_a`` is A (r, in) and
  ``lora_b`` is B (out, r); for ``token_embd.weight`` ``lora_a`` is Aᵀ (vocab, r) (llama.cpp
  gathers its rows by token id, see ``llm_build_inp_embd``);
- llama.cpp computes ``y = W x + s · B (A x)`` with ``s = scale · alpha / r`` where ``r`` is each
  pair's rank, or ``s = scale`` when alpha is 0 (``scale`` is the user's ``--lora-scaled``).

Two facts of the base's own conversion carry over to the adapter:

- names: HF module paths become GGUF names through the ``gguf`` package's tensor name map;
- llama.cpp's Llama conversion permutes the rows of ``q_proj`` and ``k_proj`` (rotary halves
  interleaved, ``LlamaModel.permute``); ΔW's rows are B's rows, so B gets the same permutation.

When one ``alpha`` over each pair's rank reproduces PEFT's scaling (no rsLoRA, one alpha for every
module) it is written as is, like llama.cpp's converter; otherwise each module's scaling is folded
into its B in float32 and ``alpha`` is 0. Everything a GGUF adapter cannot hold is refused before
a byte is written, with every reason at once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ExportError
from lorakit.model.targeting import rank_and_alpha
from lorakit.persistence.adapter_dir import read_adapter
from lorakit.persistence.keys import parse_key
from lorakit.rank.factors import ModuleFactors, module_name, split_factors

__all__ = ["export_gguf", "GgufExport", "ARCHITECTURES", "BaseShape"]


@dataclasses.dataclass(frozen=True)
class _Arch:
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's conversion interleaves the rotary halves of q_proj/k_proj rows


# HF model_type → how llama.cpp converts it (conversion/llama.py and qwen.py of llama.cpp). Only
# dense decoder layouts whose weights map one to one; fused or expert weights would need splitting.
ARCHITECTURES = {
    "llama": _Arch("llama", True),
    "mistral": _Arch("llama", True),
    "qwen2": _Arch("qwen2", False),
}
_DTYPES = {"f32": torch.float32, "f16": torch.float16}


@dataclasses.dataclass(frozen=True)
class BaseShape:
    """What the export needs to know of the base model, from its GGUF file or its config.json."""

    model_type: str
    n_head: int
    n_head_kv: int
    n_layer: int
    tied_embeddings: bool
    tensors: dict[str, tuple[int, ...]] | None = None  # GGUF name → shape (torch order), from a GGUF


@dataclasses.dataclass(frozen=True)
class GgufExport:
    """What was written: the file, its tensor pairs, the alpha key, whether scalings were folded."""

    path: Path
    pairs: int
    alpha: float
    folded_scaling: bool
    architecture: str


def export_gguf(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    dtype: str = "f32",
) -> GgufExport:
    """Write the adapter folder ``adapter`` as the GGUF LoRA adapter ``out`` (atomically).

    ``base``: the base model's GGUF file (names and shapes are then checked against it, as
    llama.cpp will), or its transformers folder / hub id; default: the adapter's
    ``base_model_name_or_path``. ``dtype``: ``"f32"`` (exact) or ``"f16"``.
    """
    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    files = read_adapter(adapter)
    config = files.config
    if config.target_parameters:
        raise ExportError(
            f"{adapter} cannot be exported to GGUF: LoRA on parameters (target_parameters="
            f"{config.target_parameters}, e.g. MoE experts) stacks one pair per expert; the export "
            "writes one lora_a/lora_b pair per 2-D weight"
        )
    shape = base_shape(base if base is not None else config.base_model_name_or_path)
    modules, rest = split_factors(config, files.tensors)
    # PEFT also saves the base weights of adapted embeddings (save_embedding_layers): not adapter data
    rest = {k: v for k, v in rest.items() if parse_key(k).part != "base_layer"}
    problems = _problems(config, modules, rest, shape)
    arch = ARCHITECTURES.get(shape.model_type)
    if arch is None:
        problems.append(
            f"base architecture {shape.model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    names = _gguf_names(modules, shape, arch, problems)
    if problems:
        raise ExportError(f"{adapter} cannot be exported to GGUF: " + "; ".join(problems))
    assert arch is not None
    alphas = {float(rank_and_alpha(config, module_name(m.prefix))[1]) for m in modules}
    native = not config.use_rslora and len(alphas) == 1
    alpha = alphas.pop() if native else 0.0
    tensors = {}
    for module, name in zip(modules, names, strict=True):
        a, b = _pair(module, name, shape, arch, fold=not native)
        tensors[f"{name}.lora_a"] = a.to(_DTYPES[dtype]).numpy()
        tensors[f"{name}.lora_b"] = b.to(_DTYPES[dtype]).numpy()
    _write(Path(out), arch.gguf, alpha, tensors, Path(adapter).resolve().name)
    return GgufExport(Path(out), len(modules), alpha, not native, arch.gguf)


def _problems(
    config: Any, modules: list[ModuleFactors], rest: dict[str, torch.Tensor], shape: BaseShape
) -> list[str]:
    problems = []
    if config.use_dora:
        problems.append(
            "DoRA (use_dora=True) rescales whole weight columns, which llama.cpp's W + s·B·A cannot"
        )
    if config.lora_bias:
        problems.append("lora_bias=True adds a bias to B, which GGUF adapters have no tensor for")
    init = config.init_lora_weights
    if isinstance(init, str) and init.split("_")[0].lower() in {"pissa", "olora", "corda"}:
        problems.append(
            f"init_lora_weights={init!r} changed the base weights themselves; convert it to a plain "
            "LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    if rest:
        kinds = sorted({module_name(k) for k in rest})
        problems.append(
            f"tensors other than LoRA pairs (modules_to_save heads, biases, magnitudes): {kinds[:6]}"
            + (" ..." if len(kinds) > 6 else "")
            + "; a GGUF adapter holds lora_a/lora_b pairs only (merge with `lorakit merge` instead)"
        )
    conv = [module_name(m.prefix) for m in modules if m.a.dim() != 2]
    if conv:
        problems.append(f"convolution LoRA has no GGUF form: {conv}")
    if not modules:
        problems.append("the adapter holds no LoRA pair")
    return problems


def _gguf_names(
    modules: list[ModuleFactors], shape: BaseShape, arch: _Arch | None, problems: list[str]
) -> list[str]:
    """Each module's GGUF weight name (``blk.0.attn_q.weight``), checked against the base."""
    if arch is None:
        return []
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], shape.n_layer)
    names, unknown, mismatched = [], [], []
    for module in modules:
        path = module_name(module.prefix)
        name = table.get_name(path + ".weight", try_suffixes=(".weight",))
        if name is None:
            unknown.append(path)
            names.append("")
            continue
        names.append(name)
        if name == "output.weight" and shape.tied_embeddings:
            problems.append(
                f"{path} adapts the output head, but this base ties it to the token embeddings and "
                "its GGUF has no output.weight"
            )
        elif name == "token_embd.weight" and shape.tied_embeddings:
            # llama.cpp finds a LoRA by tensor name, and a tied head *is* token_embd.weight: it would
            # apply the embedding's pair to the head's product too (and abort on the shapes)
            problems.append(
                f"{path} adapts the token embeddings of a base whose output head is tied to them; "
                "llama.cpp would apply it to the head as well"
            )
        elif shape.tensors is not None:
            expected = shape.tensors.get(name)
            embedding = name == "token_embd.weight"
            got = (
                (module.a.shape[1], module.b.shape[0])
                if embedding
                else (module.b.shape[0], module.a.shape[1])
            )
            if expected is None:
                mismatched.append(f"{path} → {name} (missing)")
            elif tuple(expected) != got:
                mismatched.append(f"{path} → {name} (base {tuple(expected)}, adapter {got})")
    if unknown:
        problems.append(f"modules with no GGUF tensor name for {arch.gguf}: {unknown}")
    if mismatched:
        problems.append(f"the base GGUF does not fit: {mismatched}")
    return names


def _pair(
    module: ModuleFactors, name: str, shape: BaseShape, arch: _Arch, fold: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) in llama.cpp's layout, float32."""
    a, b = module.a.float(), module.b.float()  # (r, in), (out, r)
    if fold:
        b = b * module.scaling
    if arch.permute_qk and name.endswith(".attn_q.weight"):
        b = permute_rows(b, shape.n_head)
    elif arch.permute_qk and name.endswith(".attn_k.weight"):
        b = permute_rows(b, shape.n_head_kv)
    if name == "token_embd.weight":
        a = a.t()  # (vocab, r): llama.cpp gathers rows of lora_a by token id
    return a.contiguous(), b.contiguous()


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each of ``heads`` heads, interleave the two rotary
    halves of the rows (HF's rotate-half layout → GGML's adjacent pairs). (out, ...) → same shape."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def base_shape(base: str | os.PathLike[str] | None) -> BaseShape:
    """Heads, layers and tied embeddings of the base: from a ``.gguf`` file (with its tensor shapes),
    or from a transformers config (folder or hub id)."""
    if base is None:
        raise ExportError("the adapter names no base model (base_model_name_or_path); pass the base")
    path = Path(base)
    if path.suffix == ".gguf":
        return _gguf_shape(path)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the base model's config from {str(base)!r}: {exc}") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    return BaseShape(
        model_type=str(text.model_type),
        n_head=heads,
        n_head_kv=int(getattr(text, "num_key_value_heads", None) or heads),
        n_layer=int(text.num_hidden_layers),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _gguf_shape(path: Path) -> BaseShape:
    import gguf

    if not path.is_file():
        raise ExportError(f"base GGUF file {str(path)!r} does not exist")
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            raise ExportError(f"{path} has no {key!r}: not a model GGUF file?")
        return field.contents()

    arch = str(value("general.architecture"))
    tensors = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    model_type = next((k for k, v in ARCHITECTURES.items() if v.gguf == arch), arch)
    heads = int(value(f"{arch}.attention.head_count"))
    kv = reader.get_field(f"{arch}.attention.head_count_kv")
    return BaseShape(
        model_type=model_type,
        n_head=heads,
        n_head_kv=int(kv.contents()) if kv is not None else heads,
        n_layer=int(value(f"{arch}.block_count")),
        tied_embeddings="output.weight" not in tensors,
        tensors=tensors,
    )


def _write(out: Path, arch: str, alpha: float, tensors: dict[str, Any], name: str) -> None:
    """Write to a temporary file beside ``out``, then rename it into place: no half-written adapter."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, array in tensors.items():
            writer.add_tensor(key, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

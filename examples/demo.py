"""A minute with lorakit: LoRA on a tiny GPT-2, one training step, merge, and the invariants.

Run with ``make demo``. No download: the model is built from a config with random weights.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorakit import LoraConfig, TaskType, get_peft_model


def main() -> None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64))
    config = LoraConfig(r=8, lora_alpha=16, task_type=TaskType.CAUSAL_LM)  # default targets: c_attn
    model = get_peft_model(base, config)
    print(model)
    model.print_trainable_parameters()

    ids = torch.randint(0, 500, (4, 32))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        with model.disable_adapter():
            base_out = model(input_ids=ids).logits
    print(f"max |merged - unmerged| = {(merged - unmerged).abs().max().item():.2e}")
    print(f"max |adapter - base|    = {(unmerged - base_out).abs().max().item():.2e}")


if __name__ == "__main__":
    main()

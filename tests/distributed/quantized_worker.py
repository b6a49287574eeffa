"""QLoRA under DDP: ``torchrun --nproc_per_node=2 quantized_worker.py <model folder> <out dir>``.

Every rank loads the same tiny Llama in NF4 (quantizing on CPU is deterministic), adds the same
adapter (same seed), wraps it with DDP on gloo and trains on its half of a batch; rank 0 saves. Rank
0 then trains a single-process copy on the whole batch (equal halves: the mean loss is the same) and
writes ``<out dir>/ddp.json`` for ``test_quantized.py``.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import lorakit
from lorakit.distributed import wrap_ddp

STEPS = 3


def _base(folder: str) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.float32
    )


def _model(folder: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial adapter on every rank
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return lorakit.get_peft_model(_base(folder), config)


def _train(model: torch.nn.Module, ids: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(folder: str, out: Path) -> None:
    faulthandler.dump_traceback_later(100, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    ids = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(1))
    model = _model(folder)
    ddp = wrap_ddp(model)
    _train(ddp, ids[2 * rank : 2 * rank + 2])
    state = lorakit.get_peft_model_state_dict(model)  # DDP keeps whole replicas
    gathered: list[dict[str, torch.Tensor]] = [{}, {}]
    dist.all_gather_object(gathered, state)
    model.save_pretrained(out / "adapter")  # writes on rank 0 only
    results: dict = {}
    if rank == 0:
        results["identical_on_ranks"] = all(torch.equal(gathered[0][k], gathered[1][k]) for k in gathered[0])
        single = _model(folder)
        _train(single, ids)
        expected = lorakit.get_peft_model_state_dict(single)
        results["max_diff_single_process"] = max(
            (state[k] - expected[k]).abs().max().item() for k in expected
        )
        initial = lorakit.get_peft_model_state_dict(_model(folder))
        results["moved"] = max((state[k] - initial[k]).abs().max().item() for k in initial)
        reloaded = lorakit.PeftModel.from_pretrained(_base(folder), out / "adapter")
        loaded = lorakit.get_peft_model_state_dict(reloaded)
        results["saved_equals_trained"] = all(torch.equal(loaded[k], state[k]) for k in state)
    dist.barrier()
    if rank == 0:
        (out / "ddp.json").write_text(json.dumps(results, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

"""The engines, unmodified: DDP, FSDP2 (``fully_shard``), FSDP1 (``use_orig_params=True``) and
DeepSpeed ZeRO-2/3, each training the scenario model and handing it to the shared checks.

``SCENARIOS[engine]``: (name, fn(ref, work_dir) -> results) run in order on every rank;
``LAST[engine]``: controls that may leave the process group unusable, run at the very end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scenario as S
import torch
import torch.distributed as dist
from torch import nn

import lorakit
from lorakit import distributed as ld
from lorakit.errors import AdapterError, AdapterFileError, DistributedError, TargetingError
from lorakit.persistence import adapter_dir


def _rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _frozen(peft: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(ld.canonical_name(n), p) for n, p in peft.named_parameters() if not p.requires_grad]


def _clone(pairs: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pairs}


def _train(
    step: Callable[[torch.Tensor, bool], None], optimizer_step: Callable[[], None], accum: int
) -> None:
    """5 steps; each rank's batch split into ``accum`` micro-batches (the last one syncs)."""
    rank, world = _rank_world()
    micro = S.local_batch(rank, world).chunk(accum)
    for _ in range(S.STEPS):
        for i, mb in enumerate(micro):
            step(mb, i == len(micro) - 1)
        optimizer_step()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=S.LR)


# -- DDP -------------------------------------------------------------------------------------------
def ddp(accum: int = 1, reentrant: bool = False) -> Callable[[tuple, Path], dict[str, Any]]:
    def run(ref: tuple, work: Path) -> dict[str, Any]:
        peft = S.peft_model()
        if reentrant:
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        peft.train()
        before = _clone(_frozen(peft))
        model = ld.wrap_ddp(peft)
        opt = _sgd(model)

        def step(mb: torch.Tensor, sync: bool) -> None:
            with contextlib.nullcontext() if sync else model.no_sync():
                (model(input_ids=mb, labels=mb).loss / accum).backward()

        _train(step, lambda: (opt.step(), opt.zero_grad()), accum)
        out = S.trained_checks(model, _logits(peft), before, _clone(_frozen(peft)), work, ref)
        if reentrant and dist.get_rank() == 0:
            out["reentrant_modules"] = len(ld.reentrant_checkpointed_modules(peft))
        return out

    return run


def _logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x).logits

    return forward


def ddp_controls(ref: tuple, work: Path) -> dict[str, Any]:
    """Negative controls that must fail: no gradient sync, rank-dependent init, injection after
    wrapping, reentrant checkpointing with find_unused_parameters=True."""
    rank, world = _rank_world()
    out: dict[str, Any] = {}
    peft = S.peft_model()  # no DDP: each rank trains on its half alone
    opt = _sgd(peft)
    batch = S.local_batch(rank, world)
    for _ in range(S.STEPS):
        peft(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    out["no_sync_detected"] = S.raises(lambda: ld.check_adapters_in_sync(peft), DistributedError, "differs")
    local = lorakit.get_peft_model_state_dict(peft)
    out["no_sync_off_reference"] = S.all_ranks(S.max_diff(local, ref[1]))
    skewed = S.peft_model(adapter_seed=rank)  # rank-dependent init
    out["rank_init_detected"] = S.raises(
        lambda: ld.check_adapters_in_sync(skewed), DistributedError, "differs"
    )
    ld.broadcast_adapters(skewed)
    out["rank_init_fixed_by_broadcast"] = S.passes(lambda: ld.check_adapters_in_sync(skewed))
    wrapped = torch.nn.parallel.DistributedDataParallel(S.base_model())
    out["inject_after_ddp_refused"] = S.raises(
        lambda: lorakit.get_peft_model(wrapped, S.lora_config()), TargetingError, "Inject first"
    )
    ckpt = S.peft_model()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    out["reentrant_find_unused_refused"] = S.raises(
        lambda: ld.wrap_ddp(ckpt, find_unused_parameters=True), DistributedError, "reentrant"
    )
    return out


def ddp_moe(ref: tuple, work: Path) -> dict[str, Any]:
    """LoRA on the experts of a Qwen3-MoE (``target_parameters``) under DDP: the same adapter on
    every rank as one process training on the whole batch; rank 0 saves a PEFT-format adapter that
    lorakit and PEFT both reload to the engine's logits."""
    import peft as hf_peft
    import zoo

    def fresh() -> lorakit.PeftModel:
        base = zoo.moe("qwen3_moe").train()  # vocab 100 > the scenario's 96
        torch.manual_seed(S.SEED)
        config = lorakit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
        return lorakit.get_peft_model(base, config)

    single = fresh()
    initial = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(single).items()}
    opt = _sgd(single)
    for _ in range(S.STEPS):
        single(input_ids=S.global_batch(), labels=S.global_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    reference = lorakit.get_peft_model_state_dict(single)
    peft = fresh()
    model = ld.wrap_ddp(peft)
    opt = _sgd(model)
    _train(
        lambda mb, _sync: model(input_ids=mb, labels=mb).loss.backward(),
        lambda: (opt.step(), opt.zero_grad()),
        1,
    )
    gathered = ld.gather_adapter_state_dict(model, rank0_only=False)
    digests = S.all_ranks(S.digest(gathered))
    peft.save_pretrained(str(work))  # every rank; rank 0 writes
    # PEFT's default is_main_process=True must not make every rank write (they raced on one folder)
    peft.save_pretrained(str(work / "by-rank" / f"rank{dist.get_rank()}"))
    peft.eval()
    logits = _logits(peft)(S.eval_batch())
    dist.barrier()
    if dist.get_rank() != 0:
        return {}
    reloaded = lorakit.PeftModel.from_pretrained(zoo.moe("qwen3_moe"), str(work))
    by_peft = hf_peft.PeftModel.from_pretrained(zoo.moe("qwen3_moe"), str(work))
    with torch.no_grad():
        ours, theirs = (m(input_ids=S.eval_batch()).logits for m in (reloaded, by_peft))
    return {
        "identical_on_ranks": len(set(digests)) == 1,
        "matches_reference": S.max_diff(gathered, reference),
        "adapter_moved": S.max_diff(gathered, initial),
        "expert_keys_saved": sum(".experts." in k for k in gathered),
        "ranks_that_wrote": sorted(p.name for p in (work / "by-rank").iterdir()),
        "reload_logits": float((ours - logits).abs().max()),
        "peft_reload_logits": float((theirs - logits).abs().max()),
    }


# -- FSDP2 -----------------------------------------------------------------------------------------
def _fully_shard(peft: lorakit.PeftModel) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in peft.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(peft, mesh=mesh)


def _whole_frozen(peft: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in _frozen(peft)
    }


def fsdp2(accum: int = 1, checkpointing: bool = False) -> Callable[[tuple, Path], dict[str, Any]]:
    def run(ref: tuple, work: Path) -> dict[str, Any]:
        peft = S.peft_model()
        if checkpointing:
            peft.gradient_checkpointing_enable()  # non-reentrant: transformers' and lorakit's default
        peft.train()
        before = _clone(_frozen(peft))
        _fully_shard(peft)
        opt = _sgd(peft)

        def step(mb: torch.Tensor, sync: bool) -> None:
            peft.set_requires_gradient_sync(sync)  # type: ignore[operator]
            (peft(input_ids=mb, labels=mb).loss / accum).backward()

        _train(step, lambda: (opt.step(), opt.zero_grad()), accum)
        return S.trained_checks(peft, _logits(peft), before, _whole_frozen(peft), work, ref)

    return run


def _uneven_roundtrip(shard: Callable[[lorakit.PeftModel], nn.Module]) -> str:
    """r=3 splits unevenly across 2 ranks: gather gives back the unsharded adapter exactly, and a
    broadcast load of new values arrives whole (collective)."""
    torch.manual_seed(1)
    peft = lorakit.get_peft_model(
        S.base_model(), lorakit.LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    before = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(peft).items()}
    model = shard(peft)
    gathered = ld.gather_adapter_state_dict(model, rank0_only=False)
    new = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in before.items()}
    ld.load_adapter_state_dict(model, new if dist.get_rank() == 0 else None)
    back = ld.gather_adapter_state_dict(model, rank0_only=False)
    ok = S.max_diff(gathered, before) == 0.0 and S.max_diff(back, new) == 0.0
    diffs = (S.max_diff(gathered, before), S.max_diff(back, new))
    return "ok" if all(S.all_ranks(ok)) else f"mismatch: {diffs}"


def _fully_shard_returning(peft: lorakit.PeftModel) -> nn.Module:
    _fully_shard(peft)
    return peft


def fsdp2_controls(ref: tuple, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"uneven_shards_roundtrip": _uneven_roundtrip(_fully_shard_returning)}
    plain = S.base_model()
    from torch.distributed.fsdp import fully_shard

    fully_shard(plain)
    out["inject_after_shard_refused"] = S.raises(
        lambda: lorakit.get_peft_model(plain, S.lora_config()), TargetingError, "Inject first"
    )
    peft = S.peft_model()
    _fully_shard(peft)
    out["naive_save_refused"] = S.raises(
        lambda: adapter_dir.save_adapters(peft.get_base_model(), peft.peft_config, work / "naive"),
        AdapterFileError,
        "not whole",
    )
    out["naive_merge_refused"] = S.raises(peft.merge_adapter, AdapterError, "sharded")
    out["distributed_merge_refused"] = S.raises(lambda: ld.merge_adapter(peft), DistributedError, "FSDP")
    return out


def rank0_only_save(work: Path) -> dict[str, Any]:
    """PEFT's hang: only rank 0 saves a sharded adapter. Must fail with a message, not hang."""
    peft = S.peft_model()
    _fully_shard(peft)
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() != 0:
        store.wait(["rank0_done"], __import__("datetime").timedelta(seconds=60))
        return {}
    import os

    os.environ["LORAKIT_COLLECTIVE_TIMEOUT"] = "3"
    start = time.monotonic()
    outcome = S.raises(lambda: peft.save_pretrained(str(work / "rank0_only")), DistributedError, "every rank")
    store.set("rank0_done", "1")
    return {"rank0_only_save_fails": outcome, "seconds": time.monotonic() - start}


# -- FSDP1 -----------------------------------------------------------------------------------------
def _fsdp1(peft: nn.Module, use_orig_params: bool = True) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(
        peft,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )


def fsdp1(ref: tuple, work: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    peft = S.peft_model()
    peft.train()
    before = _clone(_frozen(peft))
    model = _fsdp1(peft)
    opt = _sgd(model)

    def step(mb: torch.Tensor, sync: bool) -> None:
        model(input_ids=mb, labels=mb).loss.backward()

    _train(step, lambda: (opt.step(), opt.zero_grad()), 1)
    with FSDP.summon_full_params(model, writeback=False):
        after = _clone(_frozen(peft))
    return S.trained_checks(model, _logits(model), before, after, work, ref)


def fsdp1_controls(ref: tuple, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"uneven_shards_roundtrip": _uneven_roundtrip(_fsdp1)}
    peft = S.peft_model()
    model = _fsdp1(peft)
    out["naive_save_refused"] = S.raises(
        lambda: adapter_dir.save_adapters(peft.get_base_model(), peft.peft_config, work / "naive"),
        AdapterFileError,
        "not whole",
    )
    out["inject_after_wrap_refused"] = S.raises(
        lambda: lorakit.get_peft_model(model, S.lora_config()), TargetingError, "Inject first"
    )
    frozen = S.peft_model()
    frozen.requires_grad_(False)  # FSDP1 without use_orig_params refuses units mixing frozen and trainable
    hidden = _fsdp1(frozen, use_orig_params=False)
    out["flat_params_refused"] = S.raises(
        lambda: ld.gather_adapter_state_dict(hidden), DistributedError, "use_orig_params=True"
    )
    return out


# -- DeepSpeed ZeRO --------------------------------------------------------------------------------
def _deepspeed(peft: nn.Module, stage: int) -> Any:
    import importlib

    import deepspeed

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    # DeepSpeed's CPU backend JIT-compiles an optional shared-memory all-reduce kernel on first use
    # (minutes of C++ compilation on 2 cores, and a lock that a killed run leaves behind). Without it
    # DeepSpeed uses torch.distributed's gloo collectives, which is what these tests are about.
    ds_torch_comm.build_shm_op = lambda: None

    # persistence threshold 0: partition even the tiny test parameters (ZeRO-3 keeps small ones whole)
    zero_cfg = {"stage": stage, "stage3_param_persistence_threshold": 0}
    config = {
        "train_batch_size": S.GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": S.GLOBAL_BATCH // 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero_cfg,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=peft, optimizer=_sgd(peft), config=config)
    return engine


def _ds_whole_frozen(peft: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    pairs = _frozen(peft)
    zero3 = [p for _, p in pairs if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None) if zero3 else contextlib.nullcontext():
        return _clone(pairs)


def zero(stage: int) -> Callable[[tuple, Path], dict[str, Any]]:
    def run(ref: tuple, work: Path) -> dict[str, Any]:
        peft = S.peft_model()
        peft.train()
        before = _clone(_frozen(peft))
        engine = _deepspeed(peft, stage)
        naive = _zero3_naive(peft, work) if stage == 3 else {}  # while every parameter is partitioned

        def step(mb: torch.Tensor, sync: bool) -> None:
            engine.backward(engine(input_ids=mb, labels=mb).loss)

        _train(step, engine.step, 1)
        out = S.trained_checks(engine, _logits(engine), before, _ds_whole_frozen(peft), work, ref)
        if stage == 3:
            out.update(_zero3_merge(peft, engine))
        return {**out, **naive} if dist.get_rank() == 0 else out

    return run


def _zero3_naive(peft: lorakit.PeftModel, work: Path) -> dict[str, Any]:
    """PEFT's ZeRO-3 failures: a save that writes empty tensors, a merge that does nothing."""
    return {
        "naive_save_refused": S.raises(
            lambda: adapter_dir.save_adapters(peft.get_base_model(), peft.peft_config, work / "naive"),
            AdapterFileError,
            "not whole",
        ),
        "naive_merge_refused": S.raises(peft.merge_adapter, AdapterError, "sharded"),
    }


def _zero3_merge(peft: lorakit.PeftModel, engine: Any) -> dict[str, Any]:
    forward = _logits(engine)
    unmerged = forward(S.eval_batch())
    out: dict[str, Any] = {
        "inject_after_wrap_refused": S.raises(
            lambda: lorakit.get_peft_model(engine, S.lora_config()), TargetingError, "Inject first"
        ),
    }
    ld.merge_adapter(engine)
    merged_layers = sum(bool(m.merged_adapters) for m in peft.modules() if hasattr(m, "merged_adapters"))
    merged = forward(S.eval_batch())
    ld.unmerge_adapter(engine)
    again = forward(S.eval_batch())
    if dist.get_rank() == 0:
        out["zero3_merge_logits"] = float((merged - unmerged).abs().max())
        out["zero3_unmerge_logits"] = float((again - unmerged).abs().max())
        out["zero3_merged_layers"] = merged_layers
    return out


# -- EVA: each rank's layer inputs are gathered, so every rank computes one SVD of all of them --------
def eva_gather(ref: tuple, work: Path) -> dict[str, Any]:
    """Each rank feeds its own half of each batch; the components and ranks equal one process's on
    the whole batches, and are identical on every rank."""
    rank, world = _rank_world()
    gens = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    batches = [torch.randint(1, S.VOCAB, (S.GLOBAL_BATCH, 12), generator=g) for g in gens]
    config = lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights="eva", eva_config={"tau": 0.9}
    )
    mine = [{"input_ids": b.chunk(world)[rank]} for b in batches]
    got = lorakit.get_eva_state_dict(
        lorakit.get_peft_model(S.base_model(), config), mine, show_progress_bar=False
    )
    want = lorakit.get_eva_state_dict(
        lorakit.get_peft_model(S.base_model(), config),
        [{"input_ids": b} for b in batches],
        gather_distributed_inputs=False,
        show_progress_bar=False,
    )
    flat = torch.cat([got[k].flatten() for k in sorted(got)])
    copies = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    same_shapes = {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    return {
        "eva_identical_on_ranks": all(torch.equal(c, flat) for c in copies),
        "eva_matches_reference": max((got[k] - want[k]).abs().max().item() for k in want)
        if same_shapes
        else 1.0,
    }


SCENARIOS: dict[str, list[tuple[str, Callable[[tuple, Path], dict[str, Any]]]]] = {
    "ddp": [
        ("ddp", ddp()),
        ("ddp_accum", ddp(accum=2)),
        ("ddp_reentrant_ckpt", ddp(reentrant=True)),
        ("controls", ddp_controls),
        ("eva_gather", eva_gather),
        ("moe_experts", ddp_moe),
    ],
    "fsdp2": [
        ("fsdp2", fsdp2()),
        ("fsdp2_accum", fsdp2(accum=2)),
        ("fsdp2_ckpt", fsdp2(checkpointing=True)),
        ("controls", fsdp2_controls),
    ],
    "fsdp1": [("fsdp1", fsdp1), ("controls", fsdp1_controls)],
    "zero": [("zero2", zero(2)), ("zero3", zero(3))],
}
LAST: dict[str, list[tuple[str, Callable[[Path], dict[str, Any]]]]] = {
    "fsdp2": [("rank0_only_save", rank0_only_save)],
}

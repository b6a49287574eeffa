"""lorakit under ``torch.distributed``: DDP, FSDP2 (``fully_shard``), FSDP1 (``use_orig_params=True``)
and DeepSpeed ZeRO stay unmodified; lorakit decides which tensors are the adapter and moves them.

The rules, in the order a training script meets them:

1. **Inject before wrapping**, on every rank: ``get_peft_model`` refuses a model that an engine
   already wrapped or sharded.
2. **Same initial adapter on every rank**: seed every rank alike before injection
   (``torch.manual_seed(seed)``), or call :func:`broadcast_adapters` after injection and before
   wrapping. :func:`check_adapters_in_sync` verifies either.
3. **Collectives are called on every rank**: :func:`gather_adapter_state_dict`,
   :func:`load_adapter_state_dict`, :func:`load_pretrained`, :func:`merge_adapter`,
   ``PeftModel.save_pretrained`` of a sharded adapter. They wait at most
   ``LORAKIT_COLLECTIVE_TIMEOUT`` seconds (300) for the other ranks, then raise
   :class:`~lorakit.errors.DistributedError` instead of hanging.
"""

from lorakit.distributed.ddp import check_ddp, reentrant_checkpointed_modules, wrap_ddp
from lorakit.distributed.group import (
    default_timeout,
    is_active,
    is_main_process,
    process_group_scope,
    rank,
    world_size,
)
from lorakit.distributed.persist import (
    adapter_is_sharded,
    load_pretrained,
    merge_adapter,
    save_pretrained,
    unmerge_adapter,
)
from lorakit.distributed.state import (
    adapter_parameter_names,
    adapter_root,
    broadcast_adapters,
    check_adapters_in_sync,
    gather_adapter_state_dict,
    load_adapter_state_dict,
)
from lorakit.model.engines import canonical_name

__all__ = [
    "is_active",
    "process_group_scope",
    "rank",
    "world_size",
    "is_main_process",
    "default_timeout",
    "adapter_root",
    "adapter_parameter_names",
    "canonical_name",
    "broadcast_adapters",
    "check_adapters_in_sync",
    "gather_adapter_state_dict",
    "load_adapter_state_dict",
    "load_pretrained",
    "save_pretrained",
    "merge_adapter",
    "unmerge_adapter",
    "adapter_is_sharded",
    "check_ddp",
    "wrap_ddp",
    "reentrant_checkpointed_modules",
]

"""One launch per engine: ``torchrun --nproc_per_node=2 worker.py <engine> <out_dir>``.

Each rank runs every scenario of the engine and its negative controls; rank 0 writes
``<out_dir>/<engine>.json`` (scenario → check → value) that ``test_torchrun_engines.py`` asserts on. A
rank that hangs dumps every thread's stack and exits (``faulthandler``), so no launch can hang.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import engines  # beside this script (sys.path[0]); engines and scenario import the zoo from PYTHONPATH
import scenario as S
import torch
import torch.distributed as dist

HANG_LIMIT_S = float(os.environ.get("LORAKIT_TEST_HANG_LIMIT", "100"))


def _run(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        outcome = fn()
    except Exception as exc:  # noqa: BLE001 - a failed scenario is reported, the others still run
        outcome = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"}
        print(f"[rank {dist.get_rank()}] {name}: {outcome['error']}", file=sys.stderr, flush=True)
    if dist.get_rank() == 0:
        results[name] = outcome


def main(engine: str, out_dir: Path) -> None:
    faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    ref = S.reference()
    results: dict[str, Any] = {}
    for name, fn in engines.SCENARIOS[engine]:
        work = out_dir / engine / name
        work.mkdir(parents=True, exist_ok=True)
        _run(results, name, lambda fn=fn, work=work: fn(ref, work))
        dist.barrier()
    for name, fn in engines.LAST.get(engine, []):  # may leave the group unusable: run last
        _run(results, name, lambda fn=fn: fn(out_dir / engine))
    if dist.get_rank() == 0:
        (out_dir / f"{engine}.json").write_text(json.dumps(results, indent=1, default=str))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

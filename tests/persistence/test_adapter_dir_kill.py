"""Crash safety of save_pretrained, with real processes killed by SIGKILL at random moments.

Two swap strategies are exercised: Linux's atomic exchange of directories, and (every third
kill) the portable fallback that moves the old directory aside, which loading repairs.

A worker process imports torch and lorakit once, then forks savers. Each saver writes, in a loop,
two adapters ("default" and a subfolder "other") into one directory, every tensor filled with the
iteration number ``i`` and the rank alternating with ``i``'s parity (r=2 for even, r=4 for odd), so
a torn save would show as a shape mismatch or as two values in one directory. The test kills the
saver with SIGKILL after a random delay and then checks that the directory loads and holds exactly
one complete iteration for both adapters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from zoo import tiny

from lorakit import PeftModel
from lorakit import fileio as files

pytestmark = pytest.mark.slow

KILLS = 40

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from lorakit import LoraConfig, get_peft_model
    from zoo import tiny

    def build(r):
        config = LoraConfig(target_modules=["emb", "fc1"], r=r, modules_to_save=["fc2"])
        model = get_peft_model(tiny(), config)
        model.add_adapter("other", LoraConfig(target_modules=["fc1"], r=r))
        return model

    models = {{2: build(2), 4: build(4)}}

    def save(i):
        model = models[2 if i % 2 == 0 else 4]
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.fill_(i)
        model.save_pretrained({out!r})

    save(0)
    i = 0
    import lorakit.fileio as files
    for line in sys.stdin:
        start, mode = line.split()
        i = int(start)  # each saver numbers its saves from its own start, so they can be told apart
        pid = os.fork()
        if pid == 0:
            if mode == "fallback":  # as on a system without renameat2(RENAME_EXCHANGE)
                files._exchange = lambda a, b: False
            while True:
                i += 1
                save(i)
        print(pid, flush=True)
        os.waitpid(pid, 0)
""")


def _adapter_values(path, adapter):
    """Load one adapter; every saved tensor must hold one value, and r must match its parity."""
    where = path / adapter if adapter != "default" else path
    model = PeftModel.from_pretrained(tiny(), where, on_base_mismatch="error")
    values = {
        float(v)
        for n, p in model.named_parameters()
        if "lora_" in n or "modules_to_save" in n
        for v in p.detach().unique()
    }
    assert len(values) == 1, f"{adapter}: mixed iterations {sorted(values)}"
    (value,) = values
    r = json.loads((where / "adapter_config.json").read_text())["r"]
    assert r == (2 if int(value) % 2 == 0 else 4), f"{adapter}: r={r} but iteration {value}"
    return value


def test_kill_minus_9_while_saving_leaves_a_complete_adapter(tmp_path, subprocess_env):
    out = tmp_path / "adapter"
    script = WORKER.format(out=str(out))
    worker = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env,  # this checkout's lorakit and the zoo
    )
    rng = random.Random(0)
    seen, interrupted, previous = [], 0, 0.0
    try:
        for k in range(1, KILLS + 1):
            mode = "exchange" if k % 3 else "fallback"
            worker.stdin.write(f"{1000 * k} {mode}\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)  # let the worker reap it before the directory is inspected
            interrupted += any(True for _ in files._staging_dirs(out.absolute()))
            values = {_adapter_values(out, "default"), _adapter_values(out, "other")}
            assert len(values) == 1, f"default and other come from different saves: {values}"
            value = values.pop()
            assert value == previous or 1000 * k < value < 1000 * (k + 1), (value, previous, k)
            seen.append(value)
            previous = value
    finally:
        worker.kill()
        worker.wait()
    print(
        f"\nkill test: {KILLS} SIGKILLs, {interrupted} landed mid-save (staging dir left behind), "
        f"adapter intact after all {len(seen)}; iterations seen: {[int(v) for v in seen]}"
    )
    assert len(seen) == KILLS
    completed = sum(1 for a, b in zip([0.0] + seen, seen, strict=False) if b != a)
    print(f"kills after which a newer save was found: {completed}")
    assert completed > 0, "no saver ever completed a save: the kills were too early"
    assert interrupted > 0, "no kill landed during a save: the test did not exercise a crash"

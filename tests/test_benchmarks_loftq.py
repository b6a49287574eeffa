"""Smoke test of the LoftQ benchmark (``benchmarks/loftq.py``) on a toy model: it reports a ratio
per setting, below 1 where LoftQ must help. (The SmolLM2 numbers come from ``python -m
benchmarks.loftq``.)"""

from __future__ import annotations

import pytest

from benchmarks import common
from benchmarks import loftq as LB

pytest.importorskip("bitsandbytes")


def test_ratios_for_each_round_count() -> None:
    base = common.build_base(common.QUICK)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    results = LB.measure(base, {"input_ids": common.batch(common.QUICK)}, iters=[1, 2], r=4, alpha=8)
    assert all(v.equal(base.state_dict()[k]) for k, v in before.items())  # the original is untouched
    for key in ("loftq_iter_1", "loftq_iter_2"):
        entry = results[key]
        assert entry["layers"] == 14 and entry["per_layer"]["range"][1] < 1.0 and entry["outputs"] > 0
    assert results["loftq_iter_2"]["per_layer"]["median"] <= results["loftq_iter_1"]["per_layer"]["median"]
    assert results["peft_fit_per_layer"]["median"] > 0

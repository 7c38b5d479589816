"""diffkit.eval.adapter_cost, the ``lora`` benchmark: speed is recorded, not asserted; only that it
times every kind on the same inputs and that merging leaves the base model's function."""

import math

import torch

from diffkit import bench
from diffkit.eval import adapter_cost


def test_lora_bench_quick_runs():
    figures = bench.BENCHES["lora"](torch.device("cpu"), True)
    assert figures["settings"] == {"batch": 4, "rank": 4}
    assert set(figures) == {"settings", *adapter_cost.KINDS}
    for kind in adapter_cost.KINDS:
        ratios = figures[kind]
        assert set(ratios) == {"unmerged_over_base", "merged_over_base",
                               "full_finetune_step_over_this", "train_step_over_lora"}
        assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert figures["lora"]["train_step_over_lora"] == 1.0

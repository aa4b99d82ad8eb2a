"""clipft.train.step: the device-side sums the loop reads (`StepStats`) and the loss seam of `train_step`.
The step itself is tested against its contract in tests/train/test_loop.py (NaN guard, no host reads)."""

from __future__ import annotations

import torch

from clipft.train.step import StepStats, step_values


def _out(loss: float, skipped: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), "skipped": torch.tensor(skipped)}


def test_stepstats_sums_good_steps_and_counts_runs_of_skipped_ones():
    stats = StepStats(torch.device("cpu"))
    stats.new_epoch()
    for loss, skipped in [(2.0, 0.0), (float("nan"), 1.0), (float("nan"), 1.0), (1.0, 0.0)]:
        stats.add(_out(loss, skipped))
    seen = stats.read(step=4)
    assert seen["ep_loss"] == 3.0 and seen["ep_good"] == 2 and seen["ep_skipped"] == 2  # NaN never summed
    assert seen["bad_run"] == 0 and seen["worst_run"] == 2
    assert step_values(_out(0.5, 0.0)) == {"loss": 0.5, "skipped": 0.0}

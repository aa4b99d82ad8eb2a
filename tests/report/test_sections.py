"""report.sections: loss spikes are found from the logged steps (NaN counts as one)."""

from clipft.report.sections import loss_spikes


def test_loss_spikes():
    steps = [{"step": s, "loss": v} for s, v in enumerate([2.0, 2.0, 2.0, 2.0, 5.0, 2.0, float("nan")])]
    assert [r["step"] for r in loss_spikes(steps)] == [4, 6]
    assert loss_spikes(steps[:4]) == []

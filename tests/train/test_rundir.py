"""clipft.train.rundir: the run-directory layout and its readers (what report, ablate and visualize use)."""

from __future__ import annotations

import json

from clipft.config import Config, save_config
from clipft.train.rundir import RunFiles, read_records, resolve_run_config, write_epochs_csv


def test_layout_records_and_epochs_csv(tmp_path):
    run = RunFiles(tmp_path)
    assert [p.name for p in (run.config, run.metrics, run.epochs_csv, run.last, run.best, run.summary, run.curves)] \
        == ["config.json", "metrics.jsonl", "epochs.csv", "last.pt", "best.pt", "summary.json", "loss_curves.png"]
    assert read_records(run.metrics) == []  # no log yet
    recs = [{"type": "step", "step": 1}, {"type": "epoch", "epoch": 1, "val": {"image_to_text": {"R@1": 5.0}}}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    assert read_records(run.metrics) == recs and read_records(run.metrics, "epoch") == recs[1:]
    write_epochs_csv(run.epochs_csv, read_records(run.metrics, "epoch"))
    assert run.epochs_csv.read_text().splitlines() == ["epoch,image_to_text_R@1", "1,5.0"]


def test_resumed_run_starts_from_its_saved_config(tmp_path):
    saved = Config()
    saved.train.epochs = 7
    save_config(saved, tmp_path / "config.json")
    assert resolve_run_config(tmp_path, overrides=["train.lr=0.5"]).train.epochs == 7
    assert resolve_run_config(tmp_path, resume=False).train.epochs == Config().train.epochs


def test_a_named_config_is_not_replaced_by_the_saved_one_on_resume(tmp_path):
    saved = Config()
    saved.train.epochs = 7
    save_config(saved, tmp_path / "config.json")
    named = resolve_run_config(tmp_path, base=Config(), explicit=True)  # --config demo / FILE on a rerun
    assert named.train.epochs == Config().train.epochs  # compared with the stored run, never ignored


def test_a_torn_last_line_is_dropped_with_a_warning_and_a_damaged_one_is_refused(tmp_path, caplog):
    import pytest

    from clipft.config import ConfigError
    path = tmp_path / "metrics.jsonl"
    good = [{"type": "step", "step": 1}, {"type": "epoch", "epoch": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"type": "step", "st')
    with caplog.at_level("WARNING"):
        assert read_records(path) == good
    assert "line 3 is incomplete" in caplog.text and str(path) in caplog.text
    path.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ConfigError, match=r"line 2 is not a JSON record"):
        read_records(path)

"""RUN/commands.txt (clipft.train.commandlog): one line per clipft command run against a run directory."""

from __future__ import annotations

import re
import shutil

from clipft import __version__
from clipft.cli.commands import main
from clipft.train.commandlog import read_commands, record_command

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d)  clipft (\S+)  (clipft .*)$")


def test_a_line_has_the_date_the_version_and_the_quoted_command(tmp_path, monkeypatch):
    assert not record_command(tmp_path, ["report", str(tmp_path)])  # no config.json: not a run directory
    assert not (tmp_path / "commands.txt").exists()
    (tmp_path / "config.json").write_text("{}")
    assert record_command(tmp_path, ["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--set", "a.b=c d"])
    assert record_command(tmp_path, ["report", str(tmp_path)], exit_code=2)
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 writes
    assert not record_command(tmp_path, ["train", "--out", str(tmp_path)])
    lines = read_commands(tmp_path)
    assert len(lines) == 2
    m = LINE.match(lines[0])
    assert m and m.group(2) == __version__
    assert m.group(3) == f"clipft evaluate --checkpoint {tmp_path / 'best.pt'} --set 'a.b=c d'"
    assert lines[1].endswith(f"clipft report {tmp_path}  # exit 2")


def test_train_evaluate_visualize_and_report_are_recorded(trained_run, coco_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("last.pt", "*.png", "metrics_*", "report*",
                                                                    "zeroshot*"))
    ckpt = str(run / "best.pt")
    commands = [["evaluate", "--checkpoint", ckpt, "--data", str(coco_root), "--quiet"],
                ["visualize", "heatmap", "--checkpoint", ckpt, "--data", str(coco_root), "--quiet"],
                ["visualize", "curves", "--run", str(run)],
                ["report", str(run), "--no-draw"]]
    for argv in commands:
        assert main(argv) == 0
    lines = read_commands(run)
    assert "clipft train --data" in lines[0]  # the fixture's own training command
    assert [LINE.match(line).group(3) for line in lines[-4:]] == ["clipft " + " ".join(a) for a in commands]
    assert main(["report", str(tmp_path / "nope")]) == 2 and not (tmp_path / "nope").exists()


def test_which_directory_a_command_acts_on():
    from clipft.cli.commands import build_parser
    from clipft.train.commandlog import run_dir_of
    p = build_parser()
    assert str(run_dir_of(p.parse_args(["train", "--data", "D", "--out", "R"]))) == "R"
    assert str(run_dir_of(p.parse_args(["demo", "--out", "R"]))) == "R"
    assert str(run_dir_of(p.parse_args(["evaluate", "--checkpoint", "R/best.pt", "--data", "D"]))) == "R"
    assert str(run_dir_of(p.parse_args(["visualize", "curves", "--run", "R"]))) == "R"
    assert str(run_dir_of(p.parse_args(["report", "R"]))) == "R"
    assert run_dir_of(p.parse_args(["make-data", "shapes", "--out", "D"])) is None

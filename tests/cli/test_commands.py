"""clipft.cli.commands: the front door. Bad values and nonsense get one line (never a traceback), every option
has a help text, Ctrl-C says what was kept, and a failed start leaves nothing behind."""

from __future__ import annotations

import argparse

import pytest

from clipft.cli import commands as cli
from clipft.cli.commands import build_parser, int_range, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _run(argv, capsys) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr); argparse's usage errors count as exit code 2."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# --------------------------------------------------------------------------- integers and nonsense

def test_int_range():
    assert int_range(1)("3") == 3 and int_range(0, 5)("5") == 5
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_range(1, 9)(bad)


@pytest.mark.parametrize("argv", [
    ["make-data", "shapes", "--out", "X", "--train", "-5"],
    ["make-data", "shapes", "--out", "X", "--image-size", "0"],
    ["inspect-data", "--data", "X", "--n", "0"],
    ["prepare-images", "--data", "X", "--size", "3"],
    ["prepare-images", "--data", "X", "--workers", "0"],
    ["zeroshot", "--checkpoint", "X", "--image", "a.png", "--labels", "a", "--top-k", "0"],
    ["visualize", "heatmap", "--checkpoint", "X", "--data", "Y", "--n", "0"],
    ["download", "coco", "--out", "X", "--retries", "-1"],
    ["ablate", "--out", "X", "--seeds", "-2"],
    ["demo", "--train-images", "1"],
])
def test_bad_cli_integers_are_usage_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(argv, capsys)
    assert rc == 2 and "must be" in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_nonsense_is_refused_in_one_line(coco_root, tmp_path, capsys):
    rc, err = _run(["make-data", "shapes", "--out", str(tmp_path / "empty"), "--train", "0", "--val", "0"], capsys)
    assert rc == 2 and "empty dataset" in err and not (tmp_path / "empty").exists()
    rc, err = _run(["report", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such run directory" in err
    rc, err = _run(["report", str(coco_root)], capsys)  # a dataset, not a run
    assert rc == 2 and "not a run directory" in err and not (coco_root / "report.md").exists()
    rc, err = _run(["validate", "--data", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such file or directory" in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size must be in [2, 1048576], got 0"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.epochs=0", "train.epochs must be in [1, 100000]"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
    ("eval.zeroshot_templates=a photo", "every template needs {}"),
])
def test_bad_config_values_fail_before_any_work(override, message, coco_root, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _run(["train", "--data", str(coco_root), "--out", str(out), "--set", override], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_failed_train_leaves_no_run_directory(coco_root, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _run(["train", "--data", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert rc == 2 and not out.exists()
    # Fails after config.json was written (the backbone is checked when the model is built): removed too,
    # so a rerun does not resume the config that failed.
    rc, err = _run(["train", "--data", str(coco_root), "--out", str(out), "--set", f"text.encoder={tiny_clip_dir}",
                    "--set", "model.backbone=resnet9", "--set", "model.image_weights=none", "--quiet"], capsys)
    assert rc == 2 and "resnet9" in err and not out.exists()


# --------------------------------------------------------------------------- the guard and Ctrl-C

def test_unexpected_error_is_one_line_and_debug_keeps_the_traceback(monkeypatch, tmp_path, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")
    from clipft.cli import tool_commands  # report's command lives there; the parser is built inside main
    monkeypatch.setattr(tool_commands, "cmd_report", boom)
    rc, err = _run(["report", str(tmp_path)], capsys)
    assert rc == cli.EXIT_UNEXPECTED
    assert err == ("clipft: error: report: unexpected ZeroDivisionError: division by zero "
                   "(run with --debug for the traceback)\n")
    for argv in (["--debug", "report", str(tmp_path)], ["report", str(tmp_path), "--debug"]):
        with pytest.raises(ZeroDivisionError):
            main(argv)


def test_interrupt_says_what_was_kept(monkeypatch, tmp_path, capsys):
    def interrupt(args):
        raise KeyboardInterrupt
    for name in ("cmd_train", "cmd_cache_text", "cmd_evaluate"):
        monkeypatch.setattr(cli, name, interrupt)
    monkeypatch.chdir(tmp_path)  # D and C exist: missing inputs are refused before the command runs
    (tmp_path / "D").mkdir()
    import zipfile
    with zipfile.ZipFile(tmp_path / "C", "w") as z:  # a zip like any torch.save file: an empty C is refused first
        z.writestr("C/data.pkl", b"")
    out = tmp_path / "run"
    assert main(["train", "--data", "D", "--out", str(out)]) == 130
    assert "no checkpoint yet" in capsys.readouterr().err
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    assert main(["train", "--data", "D", "--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(["cache-text", "--data", "D"]) == 130
    err = capsys.readouterr().err
    assert "checkpoint" not in err and "cached" in err
    assert main(["evaluate", "--checkpoint", "C", "--data", "D"]) == 130
    assert "no metrics were written" in capsys.readouterr().err


# --------------------------------------------------------------------------- help texts

def test_every_option_has_a_help_text():
    parser = build_parser()
    assert "The usual way through" in parser.description and "argv" not in parser.description
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in _subparsers(parser).items()
               for a in sub._actions if a.help is None]
    assert missing == []


def test_train_help_names_the_defaults_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without --config the built-in defaults apply: ResNet50" in text
    assert "coco-rn50" in text and "demo" in text


def test_demo_help_shows_its_default_out(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "runs/demo" in capsys.readouterr().out


# --------------------------------------------------------------------------- checkpoint commands

def test_evaluate_refuses_model_keys_that_contradict_the_checkpoint(trained_run, coco_root, capsys):
    rc, err = _run(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(coco_root),
                    "--set", "model.backbone=resnet50", "--quiet"], capsys)
    assert rc == 2 and "model.backbone=resnet50 (the checkpoint has 'resnet18')" in err


def test_checkpoint_directory_suggests_best_pt(trained_run, coco_root, capsys):
    rc, err = _run(["evaluate", "--checkpoint", str(trained_run), "--data", str(coco_root), "--quiet"], capsys)
    assert rc == 2 and f"did you mean {trained_run / 'best.pt'}" in err


def test_cache_text_loads_the_encoder_once(coco_root, tiny_clip_dir, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="clipft.text")
    assert main(["cache-text", "--data", str(coco_root), "--split", "train", "val", "--quiet",
                 "--set", f"text.encoder={tiny_clip_dir}", "--set", f"text.cache_dir={tmp_path}"]) == 0
    loads = [r for r in caplog.records if "CLIP text tower" in r.getMessage()]
    assert len(loads) == 1
    out = capsys.readouterr().out
    assert out.startswith("train: ") and "\nval: " in out
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

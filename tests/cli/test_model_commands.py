"""The take-away and search commands are registered by cli_models, with ranges on their integers."""

import pytest

from clipft.cli.commands import build_parser, main


@pytest.mark.parametrize("command", ["export", "embed", "index", "search", "serve"])
def test_commands_are_registered(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0 and f"usage: clipft {command}" in capsys.readouterr().out


def test_integer_options_have_ranges(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: exit 2, one line naming the option
        main(["search", "a dog", "--index", str(tmp_path), "--k", "0"])
    assert e.value.code == 2 and "argument --k: must be >= 1, got 0" in capsys.readouterr().err
